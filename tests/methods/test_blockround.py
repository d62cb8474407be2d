"""blockround and GPTAQ on real data (stories260K, TinyStories): GPTAQ lowers each layer's error against the
full-precision model's outputs; blockround lowers each block's output error below GPTQ's and the model's KL,
writes checkpoints that plain transformers loads with quantcli's logits, is deterministic, and refuses bad options."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import quantcli
from quantcli.config.quantize import CalibrationConfig, QuantizeConfig
from quantcli.errors import InputError
from quantcli.methods import available_methods, get_method
from quantcli.quant.layers import select_modules
from quantcli.quant.records import QuantizeRequest
from quantcli.sources.datasets import calibration_batch, read_documents
from quantcli.sources.models import EMBEDDED_MODEL, load_model, load_tokenizer

available_methods()  # fill the registry first: it skips discovery once any method module is imported
from quantcli.quant.gptq_solver import gptq_quantize  # noqa: E402
from quantcli.quant.intgrid import IntLayout  # noqa: E402

SOURCE = str(EMBEDDED_MODEL)
CALIB = CalibrationConfig(samples=32, seq_len=128)
GATE = "model.layers.2.mlp.gate_proj"


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(SOURCE)


@pytest.fixture(scope="module")
def calibration(tokenizer) -> torch.Tensor:
    return calibration_batch(read_documents(CALIB.dataset), tokenizer, CALIB.samples, CALIB.seq_len, CALIB.seed)


@pytest.fixture(scope="module")
def heldout(tokenizer) -> torch.Tensor:
    """Other windows of the same text, never calibrated on."""
    return calibration_batch(read_documents(CALIB.dataset), tokenizer, 8, CALIB.seq_len, 123)


def quantized(method: str, calibration, bits: int = 4, **options):
    """In memory, as the pipeline calls it at its defaults: the embedding kept, kept tensors and scales in bfloat16."""
    from quantcli.quant.keptdtype import round_kept

    model = load_model(SOURCE, torch.float32, "cpu")
    selection = select_modules(model, tables=False)
    config = get_method(method).make_config(bits, {"group_size": 32, **options})
    request = QuantizeRequest(
        SOURCE, model, None, selection.names, "cpu", torch.float32, config, calibration, scale_dtype="bfloat16"
    )
    result = get_method(method).quantize(request)
    round_kept(result.model, set(result.records), torch.bfloat16)
    return result


def kl_to_original(model, ids: torch.Tensor) -> float:
    with torch.no_grad():
        ours = model(input_ids=ids).logits.log_softmax(-1)
        theirs = load_model(SOURCE, torch.float32, "cpu")(input_ids=ids).logits.log_softmax(-1)
    return float((theirs.exp() * (theirs - ours)).sum(-1).mean())


@pytest.fixture(scope="module")
def runs(calibration):
    """gptq and blockround at 3 and 4 bits, blockround twice at 4 (for determinism)."""
    return {
        (method, bits, copy): quantized(method, calibration, bits, **({"iterations": 32} if method != "gptq" else {}))
        for method, bits, copy in [
            ("gptq", 4, 0),
            ("blockround", 4, 0),
            ("blockround", 4, 1),
            ("gptq", 3, 0),
            ("blockround", 3, 0),
        ]
    }


def test_gptaq_lowers_the_error_against_the_full_precision_outputs(calibration):
    """One layer, inputs ``X̃`` from the original model and ``X`` from a gptq-quantized one: with the cross term
    the layer's ``||W X̃ - Q X||²`` is lower than GPTQ's on ``X`` alone."""
    inputs = {}
    for key, model in (("original", load_model(SOURCE, torch.float32, "cpu")), ("quantized", None)):
        model = model or quantized("gptq", calibration, 3).model
        module = dict(model.named_modules())[GATE]
        handle = module.register_forward_pre_hook(lambda m, a, key=key: inputs.update({key: a[0].flatten(0, 1)}))
        with torch.no_grad():
            model(input_ids=calibration)
        handle.remove()
    weight = dict(load_model(SOURCE, torch.float32, "cpu").named_modules())[GATE].weight.detach()
    x_fp, x = inputs["original"], inputs["quantized"]
    hessian, cross = 2 / len(x) * x.t() @ x, 2 / len(x) * (x_fp - x).t() @ x
    errors = {}
    for name, term in (("gptq", None), ("gptaq", cross)):
        layer, _ = gptq_quantize(weight, hessian, IntLayout(3, True, 32, "signed"), act_order=True, cross=term)
        dequantized = (layer.q.float().reshape(len(weight), -1, 32) * layer.scale[..., None]).reshape(weight.shape)
        errors[name] = float((x_fp @ weight.t() - x @ dequantized.t()).square().sum())
    assert errors["gptaq"] < 0.99 * errors["gptq"]  # measured: 0.978


def test_gptaq_option_runs_the_whole_model(calibration, heldout):
    plain, gptaq = quantized("gptq", calibration, 3), quantized("gptq", calibration, 3, target="full-precision")
    assert kl_to_original(gptaq.model, heldout) < kl_to_original(plain.model, heldout)


def test_each_block_ends_below_gptqs_output_error(runs):
    for bits in (3, 4):
        error = runs["blockround", bits, 0].stats["block_output_error"]
        assert error["blocks"] == 5 and error["tuned"] < 0.9 * error["start"]


def test_kl_on_unseen_windows_below_gptqs(runs, heldout):
    for bits in (3, 4):
        assert kl_to_original(runs["blockround", bits, 0].model, heldout) < 0.9 * kl_to_original(
            runs["gptq", bits, 0].model, heldout
        )


def test_scale_tuning_moves_scales_and_ends_below_codes_alone(runs, calibration):
    """``scales``: the groups' scales move too (in their own dtype), and the blocks end below the error of
    tuning the codes alone from the same GPTQ start."""
    tuned = quantized("blockround", calibration, 4, iterations=32, scales=True)
    codes_only, start = runs["blockround", 4, 0], runs["gptq", 4, 0]
    assert tuned.stats["block_output_error"]["tuned"] < codes_only.stats["block_output_error"]["tuned"]
    moved = [name for name in start.records if not torch.equal(tuned.records[name].scale, start.records[name].scale)]
    assert moved and all(tuned.records[name].scale.dtype == start.records[name].scale.dtype for name in moved)
    assert tuned.options["scales"] is True


def test_rtn_start_is_round_to_nearest_then_tuned(calibration):
    """``start: rtn`` untuned writes method rtn's exact weights (clip search and refit off by default there; given,
    they move the scales); tuned from there, the blocks end well below their round-to-nearest start."""
    untuned = quantized("blockround", calibration, 3, iterations=0, start="rtn").model.state_dict()
    rtn = quantized("rtn", calibration, 3).model.state_dict()
    assert all(torch.equal(untuned[key], rtn[key]) for key in rtn)
    clipped = quantized("blockround", calibration, 3, iterations=0, start="rtn", clip_search=True).model.state_dict()
    assert not all(torch.equal(clipped[key], rtn[key]) for key in rtn)
    tuned = quantized("blockround", calibration, 3, iterations=32, start="rtn")
    error = tuned.stats["block_output_error"]
    assert error["blocks"] == 5 and error["tuned"] < 0.8 * error["start"] and tuned.options["start"] == "rtn"
    assert error["kept_gptq"] == []  # 32 steps from rtn end below GPTQ's codes in every block


def test_rtn_start_keeps_gptqs_codes_where_tuning_cannot_rescue_a_block(calibration):
    """One step cannot take round-to-nearest's 3-bit codes below GPTQ's: every block keeps GPTQ's, and the
    model is GPTQ's quality, not round-to-nearest's."""
    one_step = quantized("blockround", calibration, 3, iterations=1, start="rtn")
    error = one_step.stats["block_output_error"]
    assert error["kept_gptq"] == [0, 1, 2, 3, 4] and error["tuned"] < 0.95 * error["start"]
    gptq = quantized("gptq", calibration, 3, clip_search=False, refit_scales=False)
    rtn = quantized("rtn", calibration, 3)
    ids = calibration[:4]
    assert kl_to_original(one_step.model, ids) < 0.8 * kl_to_original(rtn.model, ids)
    assert kl_to_original(one_step.model, ids) < 1.2 * kl_to_original(gptq.model, ids)


def test_batch_is_the_windows_of_every_pass_and_step(calibration):
    """``batch``: every forward pass of a decoder block, the tuning's steps included, takes that many windows
    (the last mini-batch what is left: 32 = 6 x 5 + 2)."""
    model = load_model(SOURCE, torch.float32, "cpu")
    sizes = []

    def count(module, args, kwargs):
        sizes.append(len(args[0] if args else kwargs["hidden_states"]))

    model.model.layers[1].register_forward_pre_hook(count, with_kwargs=True)
    config = get_method("blockround").make_config(4, {"group_size": 32, "iterations": 8, "batch": 5})
    names = select_modules(model, tables=False).names
    request = QuantizeRequest(SOURCE, model, None, names, "cpu", torch.float32, config, calibration)
    result = get_method("blockround").quantize(request)
    assert set(sizes) == {5, 2} and result.options["batch"] == 5
    assert result.stats["block_output_error"]["tuned"] < result.stats["block_output_error"]["start"]


def test_deterministic(runs):
    first, second = (runs["blockround", 4, copy].model.state_dict() for copy in (0, 1))
    assert all(torch.equal(first[key], second[key]) for key in first)


@pytest.mark.parametrize(
    "options",
    [{"group_size": 32}, {"group_size": 32, "symmetric": False, "bits": 3}, {"group_size": 32, "scales": True}],
)
def test_checkpoint_reloads_with_quantcli_logits(tmp_path: Path, calibration, options):
    """Written as compressed-tensors: plain transformers (symmetric) and quantcli load it with the logits of the
    model quantcli tuned in memory."""
    from transformers import AutoModelForCausalLM

    bits = options.pop("bits", 4)
    config = QuantizeConfig(
        bits=bits,
        model=SOURCE,
        method="blockround",
        output=tmp_path / "out",
        eval=None,
        method_options={**options, "iterations": 8},
        calibration=CALIB,
        device="cpu",
    )
    report = quantcli.quantize(config)
    assert report.stats["block_output_error"]["tuned"] < report.stats["block_output_error"]["start"]
    in_memory = quantized("blockround", calibration, bits, **options, iterations=8).model
    ids = calibration[:2]
    with torch.no_grad():
        expected = in_memory(input_ids=ids).logits
        assert torch.equal(quantcli.load(tmp_path / "out", device="cpu")[0](input_ids=ids).logits, expected)
        if options.get("symmetric", True):
            assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path / "out")(input_ids=ids).logits, expected)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"iterations": -1}, "blockround iterations must be 0 or more steps per block, got -1"),
        ({"learning_rate": 0.0}, "blockround learning_rate must be above 0 and at most 1"),
        ({"batch": 0}, "blockround batch must be 1 or more calibration windows per step, got 0"),
        ({"target": "fp"}, "gptq target must be one of quantized, full-precision, got 'fp'"),
        ({"seed": 1.5}, "option seed of method blockround must be int"),
        ({"start": "awq"}, "blockround start must be one of gptq, rtn, got 'awq'"),
        (
            {"start": "rtn", "target": "full-precision"},
            "blockround start rtn rounds each layer to nearest, so GPTQ's target is not used: drop the method option",
        ),
        ({"start": "rtn", "importance": True}, "blockround start rtn takes llama.cpp's scales without an imatrix"),
    ],
)
def test_bad_options_say_the_fix(options, message):
    with pytest.raises(InputError, match=message):
        get_method("blockround").make_config(4, options)


def test_scale_tuning_is_refused_where_the_format_owns_the_scales(tmp_path):
    """NF4's absmax is bitsandbytes', a GGUF type's scales are llama.cpp's: ``scales`` is refused, not ignored."""
    from typer.testing import CliRunner

    from quantcli.cli.app import app

    with pytest.raises(InputError, match="bitsandbytes computes NF4's absmax itself"):
        get_method("blockround-nf4").make_config(4, {"scales": True})
    args = ["quantize", SOURCE, "--bits", "4", "-m", "blockround", "-O", "scales=true", "--no-eval"]
    result = CliRunner().invoke(app, [*args, "--format", "gguf", "--gguf-type", "Q4_0", "-o", str(tmp_path / "q")])
    assert result.exit_code == 2 and not (tmp_path / "q").exists()
    assert result.stderr.startswith("error: scales=True is not used with --format gguf: a GGUF type's scales are")


STREAM = {
    "method": "blockround",
    "bits": 4,
    "group_size": 32,
    "eval": None,
    "iterations": 8,
    "calibration": {"samples": 16, "seq_len": 64, "seed": 3},
}


@pytest.mark.parametrize(
    "target, scales, batch", [("quantized", False, 8), ("full-precision", False, 8), ("quantized", True, 3)]
)
def test_streaming_is_bit_identical_to_in_memory_and_resumes(tmp_path, target, scales, batch):
    """--low-memory writes the in-memory run's tensors; interrupted after 3 blocks, --resume continues both the
    quantized and the full-precision stream from the saved activations to the same tensors (also in uneven
    mini-batches: 16 windows by 3)."""
    from quantcli.config.recipes import config_from_mapping
    from quantcli.errors import ResumableInterrupt
    from quantcli.run.pipeline import quantize
    from tests.run.test_streaming import tensors
    from tests.support.hostile import LAYERS_PER_BLOCK, StopAfter

    recipe = {**STREAM, "model": SOURCE, "target": target, "scales": scales, "batch": batch}
    quantize(config_from_mapping({**recipe, "output": tmp_path / "memory"}))
    streamed = {**recipe, "low_memory": True}
    quantize(config_from_mapping({**streamed, "output": tmp_path / "streamed"}))
    with pytest.raises(ResumableInterrupt, match="interrupted after 3 of 7 layer groups"):
        quantize(config_from_mapping({**streamed, "output": tmp_path / "resumed"}), StopAfter(3 * LAYERS_PER_BLOCK + 1))
    report = quantize(config_from_mapping({**streamed, "output": tmp_path / "resumed", "resume": True}))
    assert report.stats["resumed_shards"] == 3
    memory = tensors(tmp_path / "memory")
    for other in (tensors(tmp_path / "streamed"), tensors(tmp_path / "resumed")):
        assert sorted(other) == sorted(memory) and all(torch.equal(memory[key], other[key]) for key in memory)


def test_nf4_codes_tuned_in_a_plain_bitsandbytes_checkpoint(tmp_path, calibration, prompt_ids):
    """blockround-nf4: the tuned NF4 codes on bitsandbytes' absmax, the block errors below gptq-nf4's start; plain
    transformers + bitsandbytes loads the file with quantcli's logits, and --low-memory writes the same tensors."""
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM

    from quantcli.config.recipes import config_from_mapping
    from quantcli.run.pipeline import quantize
    from tests.run.test_streaming import tensors

    recipe = {**STREAM, "method": "blockround-nf4", "model": SOURCE}
    recipe.pop("group_size")
    report = quantize(config_from_mapping({**recipe, "output": tmp_path / "memory"}))
    quantize(config_from_mapping({**recipe, "output": tmp_path / "streamed", "low_memory": True}))
    error = report.stats["block_output_error"]
    assert report.format == "bitsandbytes" and error["tuned"] < error["start"]
    memory, streamed = tensors(tmp_path / "memory"), tensors(tmp_path / "streamed")
    assert sorted(memory) == sorted(streamed) and all(torch.equal(memory[k], streamed[k]) for k in memory)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "memory").eval()
    assert type(plain.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    with torch.no_grad():
        ours = quantcli.load(tmp_path / "memory")[0](input_ids=prompt_ids).logits
        assert torch.equal(plain(input_ids=prompt_ids).logits, ours)


def test_mixture_of_experts_tunes_and_refuses_gptaq(tmp_path):
    """Experts are tuned with the rest of their block; GPTAQ, which pairs each layer's tokens, is refused."""
    from quantcli.errors import UnavailableError
    from tests.promises.test_moe import _build

    folder = _build("mixtral", tmp_path / "moe")
    recipe = {"bits": 4, "model": folder, "method": "blockround", "eval": None, "calibration": CALIB}
    report = quantcli.quantize(QuantizeConfig(**recipe, output=tmp_path / "out", method_options={"iterations": 4}))
    assert report.stats["block_output_error"]["blocks"] == 2
    assert report.stats["block_output_error"]["tuned"] <= report.stats["block_output_error"]["start"]
    with pytest.raises(UnavailableError, match="routed experts do not keep. Use the method option target 'quantized'"):
        quantcli.quantize(
            QuantizeConfig(**recipe, output=tmp_path / "gptaq", method_options={"target": "full-precision"})
        )
