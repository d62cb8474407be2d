"""Library messages name options the way the caller gave them: the config path (which is also the
recipe key) from Python, the flag from the command line. No message spells a flag itself."""

import ast
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

import quantcli
from quantcli.cli.app import app
from quantcli.cli.flags import SECTION_FLAGS, flag, program_commands
from quantcli.config.allocation import TARGETS, AllocationConfig
from quantcli.config.gates import GateLimits
from quantcli.config.quantize import CalibrationConfig, EvalConfig, QuantizeConfig
from quantcli.config.recipes import config_from_mapping
from quantcli.errors import NO_VALUE, InputError, option
from quantcli.measure.speed import BenchConfig

runner = CliRunner()
PACKAGE = Path(quantcli.__file__).parent
CLI_PACKAGE = "cli"  # the command line's own texts
FLAG = re.compile(r"(?<![\w-])--[a-z]")
# Not error messages: result data stored in quantcli.json or printed in --json, where no token may go.
RESULT_TEXTS = {
    ("layers.py", "matched --skip-modules"),
    (
        "layers.py",
        " kept 16-bit (the default for rtn/gptq, the only embedding vLLM serves: --embeddings 8 or 4 quantizes it;"
        " bitsandbytes methods quantize Linear layers only)",
    ),
    (
        "scheme.py",
        "stored dense (fake-quantized): compressed-tensors cannot pack GPT-2 Conv1D so that transformers reloads it;"
        " --format gguf stores GPT-2 packed (llama.cpp reads it)",
    ),
    (
        "moe.py",
        "fused experts (3-D parameters) kept in 16 bits: rtn, gptq, blockround and awq"
        " (compressed-tensors; all but awq also --format gguf) quantize each expert where transformers'"
        " conversion mapping gives the per-expert layout; a bitsandbytes checkpoint cannot hold them"
        " (transformers' bitsandbytes integration quantizes nn.Linear only)",
    ),
    (
        "compare.py",
        "Warning: these perplexities come from each checkpoint's report.json with different settings; pass --base "
        "MODEL to evaluate all alike.",
    ),
}


def cli_error(*args: str) -> str:
    result = runner.invoke(app, list(args))
    assert result.exit_code == 2, result.output
    return result.stderr


def python_error(build) -> str:
    with pytest.raises(InputError) as error:
        build()
    return f"error: {error.value}\n"


@pytest.mark.parametrize(
    "args, build, python_text, cli_text",
    [
        (
            ["--resume"],
            lambda: QuantizeConfig(4, resume=True),
            "resume continues an interrupted low_memory run. Add low_memory=True.",
            "--resume continues an interrupted --low-memory run. Add --low-memory.",
        ),
        (
            ["--seq-len", "0"],
            lambda: QuantizeConfig(4, calibration=CalibrationConfig(seq_len=0)),
            "calibration sequence length (calibration.seq_len) must be a positive integer, got 0.",
            "calibration sequence length (--seq-len) must be a positive integer, got 0.",
        ),
        (
            ["--calib-samples", "200000"],
            lambda: CalibrationConfig(samples=200_000),
            "calibration samples (calibration.samples) must be an integer from 1 to 100,000, got 200000.",
            "calibration samples (--calib-samples) must be an integer from 1 to 100,000, got 200000.",
        ),
        (
            ["--no-eval", "--max-ppl-increase", "2"],
            lambda: QuantizeConfig(4, eval=None, gates=GateLimits(max_ppl_increase=2)),
            "gates.max_ppl_increase needs perplexity before and after. Drop eval=None (use eval.max_tokens to keep it "
            "fast).",
            "--max-ppl-increase needs perplexity before and after. Drop --no-eval (use --max-tokens to keep it fast).",
        ),
        (
            ["--format", "gguf", "--gguf-type", "Q8_0"],
            lambda: QuantizeConfig(4, format="gguf", gguf_type="Q8_0"),
            "gguf_type='Q8_0' stores 8-bit codes, but bits is 4. Drop bits (the type sets it).",
            "--gguf-type Q8_0 stores 8-bit codes, but --bits is 4. Drop --bits (the type sets it).",
        ),
        (
            ["--target-kl", "0.1", "--method", "bnb-nf4"],
            lambda: QuantizeConfig(4, method="bnb-nf4", allocation=AllocationConfig(target_kl=0.1)),
            "allocation allocates with method='rtn' or gptq, not bnb-nf4.",
            "--target-* allocates with --method rtn or gptq, not bnb-nf4.",
        ),
    ],
)
def test_the_same_mistake_names_the_field_from_python_and_the_flag_from_the_cli(args, build, python_text, cli_text):
    assert python_error(build) == f"error: {python_text}\n"
    bits = [] if args[0].startswith("--target") else ["--bits", "4"]  # a target chooses the bits: --bits is refused
    assert cli_error("quantize", *bits, *args) == f"error: {cli_text}\n"


def test_negative_and_valued_flags_from_the_eval_and_bench_commands():
    assert python_error(lambda: EvalConfig(bos="document")) == (
        "error: eval.bos='document' is now eval.protocol='documents' eval.bos='start' (documents come from rows or"
        " eval.doc_separator; a blank line is not one).\n"
    )
    assert cli_error("eval", "--bos", "document") == (
        "error: --bos document is now --protocol documents --bos start (documents come from rows or --doc-separator; a "
        "blank line is not one).\n"
    )
    assert python_error(lambda: BenchConfig(warmup=-1)) == "error: warmup must be 0 or more, got -1.\n"
    assert cli_error("bench", "--warmup", "-1") == "error: --warmup must be 0 or more, got -1.\n"


def test_a_recipe_names_the_recipe_key(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("bits: 4\ncalibration:\n  seq_len: 0\n")
    assert python_error(lambda: config_from_mapping({"bits": 4, "calibration": {"seq_len": 0}})) == (
        "error: calibration sequence length (calibration.seq_len) must be a positive integer, got 0.\n"
    )
    assert (
        cli_error("quantize", "--config", str(recipe))
        == "error: calibration sequence length (--seq-len) must be a positive integer, got 0.\n"
    )


def _library_files() -> list[Path]:
    return [path for path in sorted(PACKAGE.rglob("*.py")) if path.relative_to(PACKAGE).parts[0] != CLI_PACKAGE]


def _message_strings(tree: ast.AST):
    """Every string constant (f-string parts too) except docstrings."""
    docstrings = {
        id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
    }
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            yield node


def test_no_library_message_spells_a_flag():
    found = []
    for path in _library_files():
        for node in _message_strings(ast.parse(path.read_text())):
            text = re.sub(r"`quantcli [^`]*`", "", node.value)  # a whole command to run is quoted as typed
            if FLAG.search(text) and (path.name, node.value) not in RESULT_TEXTS:
                found.append(f"{path.relative_to(PACKAGE)}:{node.lineno}: {node.value!r}")
    assert not found, "name options with quantcli.errors.option(), not a --flag:\n" + "\n".join(found)


def _named_options() -> set[tuple[str, object]]:
    """(path, value) of every option() call with a literal path in the library, plus the computed ones."""
    named = set()
    for path in _library_files():
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and getattr(node.func, "id", None) == "option"
                and isinstance(node.args[0], ast.Constant)
            ):
                value = (
                    node.args[1].value if len(node.args) > 1 and isinstance(node.args[1], ast.Constant) else NO_VALUE
                )
                named.add((node.args[0].value, value))
    named |= {(f"allocation.{name}", NO_VALUE) for name in TARGETS}  # option(f"allocation.{name}")
    named |= {(f"gates.{name}", NO_VALUE) for name in GateLimits.__dataclass_fields__}
    named |= {
        (name, NO_VALUE)
        for name in ("prompt_tokens", "new_tokens", "repeats", "output", "plot", "eval.seq_len", "calibration.seq_len")
    }
    return named


def test_every_option_the_library_names_is_a_flag_of_the_cli():
    commands = program_commands()
    named = _named_options()
    assert len(named) > 50
    for path, value in sorted(named, key=str):
        spelled = flag(path, value, commands)
        assert spelled is not None, f"option({path!r}) names no flag of the CLI"
        if value is False:
            assert not spelled.endswith(" False"), f"{path} has no negative flag"
    quantize = {spelling for param in commands[0].params for spelling in param.opts}
    for glob in SECTION_FLAGS.values():
        assert any(re.fullmatch(glob.replace("*", ".+"), spelling) for spelling in quantize), glob


def test_the_running_command_picks_its_own_spelling():
    eval_first = program_commands(app.registered_commands[1].callback)
    assert flag("eval.dataset", NO_VALUE, eval_first) == "--dataset"
    assert flag("eval.dataset", NO_VALUE, program_commands()) == "--eval-dataset"
    assert flag("symmetric", False, program_commands()) == "--asymmetric"
    assert flag("eval", None, program_commands()) == "--no-eval"
    assert flag("no_such_option", NO_VALUE, program_commands()) is None
    assert (
        str(InputError(f"{option('calibration.seq_len', 8)} and {option('eval', None)}"))
        == "calibration.seq_len=8 and eval=None"
    )
