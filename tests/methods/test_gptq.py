"""GPTQ on real data (stories260K, TinyStories): beats round-to-nearest per layer and in perplexity,
writes exact checkpoints that plain transformers and quantcli load alike, handles GPT-2 Conv1D."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import quantcli
from quantcli.config.quantize import CalibrationConfig, EvalConfig, QuantizeConfig
from quantcli.errors import InputError
from quantcli.formats import save
from quantcli.formats.compressed_tensors.scheme import CONV1D_NOTE
from quantcli.methods import available_methods, get_method
from quantcli.quant import ops
from quantcli.quant.intgrid import IntLayout
from quantcli.quant.layers import select_modules
from quantcli.quant.records import QuantizedModel, QuantizeRequest
from quantcli.sources.datasets import calibration_batch, read_documents
from quantcli.sources.models import EMBEDDED_MODEL, load_model, load_tokenizer

available_methods()  # fill the registry first: it skips discovery once any method module is imported
from quantcli.quant.gptq_solver import gptq_quantize  # noqa: E402

SOURCE = str(EMBEDDED_MODEL)
CALIB = CalibrationConfig(samples=32, seq_len=128)
EVAL = EvalConfig(max_tokens=4096)
GATE, DOWN = "model.layers.2.mlp.gate_proj", "model.layers.2.mlp.down_proj"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """64-wide matrices gain nothing from threads, and spinning ones crawl on a shared 2-core box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(SOURCE)


@pytest.fixture(scope="module")
def calibration(tokenizer) -> torch.Tensor:
    """The same windows the pipeline draws for ``CALIB``."""
    return calibration_batch(read_documents(CALIB.dataset), tokenizer, CALIB.samples, CALIB.seq_len, CALIB.seed)


def run_gptq(source: str, tokenizer, calibration: torch.Tensor, bits: int = 4, **options) -> QuantizedModel:
    """GPTQ in memory, as the pipeline calls it at its defaults: the embedding/head kept, kept tensors and scales
    in bfloat16."""
    from quantcli.quant.keptdtype import round_kept

    model = load_model(source, torch.float32, "cpu")
    method = get_method("gptq")
    config = method.make_config(bits, options)
    selection = select_modules(model, tables=False)
    result = method.quantize(
        QuantizeRequest(
            source,
            model,
            tokenizer,
            selection.names,
            "cpu",
            torch.float32,
            config,
            calibration,
            tables=selection.tables,
            scale_dtype="bfloat16",
        )
    )
    round_kept(result.model, set(result.records), torch.bfloat16)
    return result


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def pipeline(tmp: Path, method: str, model: str = SOURCE, evaluate: bool = True, **options):
    config = QuantizeConfig(
        bits=4,
        model=model,
        method=method,
        output=tmp / method,
        method_options=options,
        calibration=CALIB,
        eval=EVAL if evaluate else None,
        device="cpu",
    )
    return quantcli.quantize(config)


@pytest.fixture(scope="module")
def layer_inputs(calibration):
    """Real weights and calibration inputs ``X`` (``[tokens, in]``) of two layers of block 2."""
    model = load_model(SOURCE, torch.float32, "cpu")
    modules = dict(model.named_modules())
    seen: dict[str, torch.Tensor] = {}
    handles = [
        modules[n].register_forward_pre_hook(lambda m, a, n=n: seen.update({n: a[0].reshape(-1, a[0].shape[-1])}))
        for n in (GATE, DOWN)
    ]
    logits(model, calibration)
    for handle in handles:
        handle.remove()
    return {name: (modules[name].weight.data.clone(), seen[name]) for name in (GATE, DOWN)}


@pytest.mark.parametrize(
    "name, bits, group_size, act_order, symmetric",
    [
        (GATE, 4, 32, False, True),
        (GATE, 4, 32, True, True),
        (GATE, 3, 32, False, True),
        (DOWN, 3, None, False, True),
        (GATE, 4, 32, True, False),
        (DOWN, 4, None, False, False),
        (DOWN, 4, 43, True, True),
        (DOWN, 4, 43, False, True),
    ],
)
def test_layer_error_below_round_to_nearest(layer_inputs, name, bits, group_size, act_order, symmetric):
    weight, x = layer_inputs[name]
    result, notes = gptq_quantize(
        weight, 2 * x.T @ x / x.shape[0], IntLayout(bits, symmetric, group_size), act_order=act_order
    )
    gptq = ops.dequantize(result.q, result.scale, result.zero_point, group_size)
    rtn = ops.fake_quantize(weight, bits, symmetric, group_size)
    assert bool((result.zero_point == 0).all()) == symmetric

    def proxy_loss(quantized: torch.Tensor) -> float:
        return ((weight - quantized) @ x.T).pow(2).sum().item()

    assert notes == []
    assert proxy_loss(gptq) < 0.8 * proxy_loss(rtn)
    low, high = ops.int_range(bits)
    assert int(result.q.min()) >= low and int(result.q.max()) <= high
    assert torch.equal(ops.quantize(gptq, result.scale, result.zero_point, bits, group_size), result.q)


@pytest.mark.parametrize(
    "name, bits, group_size, act_order, symmetric",
    [
        (GATE, 4, None, True, True),
        (GATE, 4, 32, True, True),
        (GATE, 3, None, False, True),
        (DOWN, 4, None, True, True),
        (DOWN, 4, None, True, False),
    ],
)
def test_clip_search_lowers_every_rows_output_error(layer_inputs, name, bits, group_size, act_order, symmetric):
    weight, x = layer_inputs[name]
    layout = IntLayout(bits, symmetric, group_size)

    def row_errors(clip_search: bool) -> torch.Tensor:
        result, _ = gptq_quantize(
            weight, 2 * x.T @ x / x.shape[0], layout, act_order=act_order, clip_search=clip_search
        )
        low, high = ops.int_range(bits)
        assert int(result.q.min()) >= low and int(result.q.max()) <= high
        quantized = ops.dequantize(result.q, result.scale, result.zero_point, group_size)
        assert torch.equal(ops.quantize(quantized, result.scale, result.zero_point, bits, group_size), result.q)
        return ((weight - quantized) @ x.T).pow(2).sum(dim=1)

    plain, searched = row_errors(False), row_errors(True)
    assert bool((searched <= plain * (1 + 1e-5)).all())  # the full range is one of the candidates
    assert searched.sum() < 0.95 * plain.sum()


def test_clip_search_in_several_passes_matches_one(layer_inputs, monkeypatch):
    """Big layers stack fewer candidates per pass (PASS_ELEMENTS); the choice must not change."""
    import quantcli.quant.gptq_solver as gptq

    weight, x = layer_inputs[DOWN]
    hessian, layout = 2 * x.T @ x / x.shape[0], IntLayout(4, True, None)
    one_pass, _ = gptq_quantize(weight, hessian, layout, act_order=True, clip_search=True)
    monkeypatch.setattr(gptq, "PASS_ELEMENTS", weight.numel() * 3)
    three_per_pass, _ = gptq_quantize(weight, hessian, layout, act_order=True, clip_search=True)
    assert torch.equal(one_pass.q, three_per_pass.q) and torch.equal(one_pass.scale, three_per_pass.scale)


@pytest.mark.parametrize("name, group_size, symmetric", [(GATE, 32, True), (DOWN, None, True), (GATE, 32, False)])
def test_clip_prepass_picks_each_rows_best_rounded_clip(layer_inputs, name, group_size, symmetric):
    """The first clip each row's GPTQ runs get is the factor whose round-to-nearest weights have the lowest
    output error."""
    from quantcli.quant.gptq_solver import CLIP_SHRINKS, _clip_by_rounding

    weight, x = layer_inputs[name]
    layout = IntLayout(4, symmetric, group_size)
    errors = []
    for shrink in CLIP_SHRINKS:
        scale, zero_point = ops.compute_qparams(weight * shrink, 4, symmetric, group_size)
        rounded = ops.dequantize(ops.quantize(weight, scale, zero_point, 4, group_size), scale, zero_point, group_size)
        errors.append(((weight - rounded) @ x.T).pow(2).sum(dim=1))
    errors = torch.stack(errors)
    picked = _clip_by_rounding(weight, 2 * x.T @ x / x.shape[0], layout, None, weight.dtype)[0]
    chosen = errors[[CLIP_SHRINKS.index(round(float(f), 2)) for f in picked], torch.arange(weight.shape[0])]
    assert bool((chosen <= errors.min(dim=0).values * (1 + 1e-4)).all())
    assert len(set(picked.tolist())) > 1  # rows differ: the search is per row


def test_unseen_inputs_round_to_nearest(layer_inputs):
    weight, _ = layer_inputs[GATE]
    result, _ = gptq_quantize(weight, torch.zeros(64, 64), IntLayout(4, True, 32))
    assert torch.equal(
        ops.dequantize(result.q, result.scale, result.zero_point, 32), ops.fake_quantize(weight, 4, True, 32)
    )


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """gptq and rtn INT4 g32 through the whole pipeline, evaluated on the eval split."""
    tmp = tmp_path_factory.mktemp("stories")
    return tmp, pipeline(tmp, "gptq", group_size=32), pipeline(tmp, "rtn", group_size=32)


def test_perplexity_below_round_to_nearest(checkpoints):
    _, gptq, rtn = checkpoints
    assert gptq.perplexity_after.settings == rtn.perplexity_after.settings
    assert gptq.perplexity_delta["absolute"] < 0.6 * rtn.perplexity_delta["absolute"]
    assert gptq.stats["calibration_tokens"] == CALIB.samples * CALIB.seq_len
    assert gptq.stats["peak_rss_bytes"] > 0 and gptq.stats["decoder_blocks"] == "model.layers (5)"
    assert gptq.layers[DOWN].group_size == 43 and DOWN not in gptq.fallbacks
    assert gptq.grouping["changed_widths"] == {"172": 43}


def test_checkpoint_loads_everywhere_with_identical_logits(checkpoints, tokenizer, calibration):
    from transformers import AutoModelForCausalLM

    tmp, _, _ = checkpoints
    ids = calibration[:2]
    plain = logits(AutoModelForCausalLM.from_pretrained(tmp / "gptq"), ids)
    ours = logits(quantcli.load(tmp / "gptq", device="cpu")[0], ids)
    in_memory = logits(run_gptq(SOURCE, tokenizer, calibration, group_size=32).model, ids)
    assert torch.equal(plain, ours) and torch.equal(ours, in_memory)


@pytest.fixture(scope="module")
def act_order_runs(tokenizer, calibration):
    """Two identical act-order runs, with their weights copied before anything saves (saving mutates)."""
    runs = [run_gptq(SOURCE, tokenizer, calibration, group_size=32, act_order=True) for _ in range(2)]
    return runs, [{key: value.clone() for key, value in run.model.state_dict().items()} for run in runs]


def test_act_order_keeps_the_plain_group_layout(act_order_runs, tmp_path):
    quantized = act_order_runs[0][0]
    assert quantized.layers[GATE].scheme == "group" and quantized.layers[GATE].group_size == 32
    save(quantized, tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as tensors:
        assert not [key for key in tensors.keys() if "g_idx" in key]
        assert tuple(tensors.get_tensor(f"{GATE}.weight_scale").shape) == (172, 64 // 32)


def test_asymmetric_checkpoint_reloads_with_identical_logits(tmp_path, tokenizer, calibration):
    """Asymmetric pack-quantized: quantcli.load reads it through the library's decompressor (plain
    transformers cannot build such models yet: llm-compressor#1618, see the README)."""
    report = pipeline(tmp_path, "gptq", evaluate=False, group_size=32, symmetric=False)
    assert report.options["symmetric"] is False
    with safe_open(str(tmp_path / "gptq" / "model.safetensors"), "pt") as tensors:
        assert f"{GATE}.weight_zero_point" in tensors.keys()
    ids = calibration[:2]
    in_memory = logits(run_gptq(SOURCE, tokenizer, calibration, group_size=32, symmetric=False).model, ids)
    assert torch.equal(logits(quantcli.load(tmp_path / "gptq", device="cpu")[0], ids), in_memory)

    # the same files from another writer (no quantcli.json): still read through the library's decompressors
    foreign = shutil.copytree(
        tmp_path / "gptq", tmp_path / "foreign", ignore=shutil.ignore_patterns("quantcli.json", "report.json")
    )
    model, _, metadata = quantcli.load(foreign, device="cpu")
    assert metadata is None and torch.equal(logits(model, ids), in_memory)


def test_deterministic(act_order_runs):
    first, second = act_order_runs[1]
    assert all(torch.equal(first[key], second[key]) for key in first)


def test_gpt2_conv1d_quantizes_and_reloads(tmp_path, tokenizer, calibration):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=512, n_positions=128, bos_token_id=1, eos_token_id=2)
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2")
    tokenizer.save_pretrained(tmp_path / "gpt2")
    report = pipeline(tmp_path, "gptq", model=str(tmp_path / "gpt2"), evaluate=False, group_size=32)
    in_memory = run_gptq(str(tmp_path / "gpt2"), tokenizer, calibration, group_size=32)
    assert report.stats["decoder_blocks"] == "transformer.h (2)"
    assert report.fallbacks["transformer.h.0.mlp.c_fc"] == CONV1D_NOTE
    reloaded = quantcli.load(tmp_path / "gptq", device="cpu")[0]
    assert torch.equal(logits(reloaded, calibration[:2]), logits(in_memory.model, calibration[:2]))


@pytest.mark.parametrize(
    "bits, options, message",
    [
        (4, {"damp": 0}, "damp must be between 0 and 1"),
        (4, {"damp": 2.0}, "damp must be between 0 and 1"),
        (4, {"block_size": 0}, "block_size must be a positive number"),
        (4, {"group_size": 0}, "group size must be a positive integer or -1"),
        (4, {"desc_act": True}, "do not apply to method gptq"),
        (4, {"act_order": "yes"}, "act_order of method gptq must be bool"),
        (2, {}, "supports bits 8, 4, 3"),
    ],
)
def test_bad_options_say_the_fix(bits, options, message):
    with pytest.raises(InputError, match=message):
        get_method("gptq").make_config(bits, options)
