"""Fuzz the GGUF reader and the --resume state (issue 25): random byte flips and truncations of a valid file.

    python tools/fuzz_inputs.py --variants 500 --seed 0 --out fuzz.json     # both targets

Each variant is read by quantcli in a forked child with a time bound (``--timeout``) and a 8 GiB address
space limit, so a hang or a memory blow-up is seen, not suffered. Outcomes:

* ``refused``: a QuantCliError (the CLI's one ``error:`` line, exit 2 or 3);
* ``same``: it loaded, and gives the original's logits and tokens (GGUF) or tensors (resume);
* ``changed``: it loaded into another model (exit 0 with a wrong model: a failure for the resume state;
  for GGUF, counted with the metadata key the flip hit, since a GGUF file carries no checksum);
* ``crash``: any other exception (an internal error, exit 1); ``hang``: over the time bound.

The GGUF variants are quantcli's own Q8_0 file of stories260K with 1 to 8 bytes flipped in its header
(metadata and tensor infos: flips in tensor data give a valid file with other weights, which no reader
can tell) or cut at a random length. The resume variants are the resume.json of a real interrupted
``--low-memory`` run of stories260K with 1 to 8 bytes flipped or cut. Exit 1 on any crash, hang or
changed resume state.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import resource
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

PROMPT = "Once upon a time there was a little cat who"


def _child(job: Callable[[], str], queue: Any) -> None:
    resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))
    from quantcli.errors import QuantCliError

    try:
        queue.put(job())
    except QuantCliError as error:
        queue.put("refused" if "\n" not in str(error) else "crash: multi-line message")
    except BaseException as error:
        queue.put(f"crash: {type(error).__name__}: {str(error)[:200]}")


def run_bounded(job: Callable[[], str], timeout: float) -> str:
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_child, args=(job, queue))
    child.start()
    child.join(timeout)
    if child.is_alive():
        child.kill()
        child.join()
        return "hang"
    return queue.get() if not queue.empty() else f"crash: exit {child.exitcode}"


def mutate(data: bytes, rng: random.Random, region: int) -> tuple[bytes, str]:
    """1 to 8 random bytes flipped within ``data[:region]``, or ``data`` cut at a random length."""
    if rng.random() < 0.25:
        cut = rng.randrange(len(data))
        return data[:cut], f"cut at {cut}"
    out = bytearray(data)
    where = sorted(rng.randrange(region) for _ in range(rng.randint(1, 8)))
    for at in where:
        out[at] ^= rng.randrange(1, 256)
    return bytes(out), f"flip at {where}"


def gguf_header_end(path: Path) -> int:
    import gguf

    return int(gguf.GGUFReader(path).data_offset)


def make_gguf(folder: Path) -> Path:
    from quantcli.config.recipes import config_from_mapping
    from quantcli.run.pipeline import quantize

    quantize(
        config_from_mapping({"bits": 8, "format": "gguf", "gguf_type": "Q8_0", "eval": None, "output": folder / "q8"})
    )
    return next((folder / "q8").glob("*.gguf"))


def gguf_job(path: Path, reference: Any) -> Callable[[], str]:
    def job() -> str:
        import torch

        from quantcli.sources.gguf_input import load_model, load_tokenizer

        model, tokenizer = load_model(path, torch.float32, "cpu"), load_tokenizer(path)
        ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
        if ids.tolist() != reference[0].tolist():
            return "changed: tokenizer"
        with torch.no_grad():
            logits = model(input_ids=ids).logits
        return "same" if logits.shape == reference[1].shape and torch.equal(logits, reference[1]) else "changed: logits"

    return job


def fuzz_gguf(count: int, seed: int, timeout: float, work: Path) -> Counter:
    import torch

    from quantcli.sources.gguf_input import load_model, load_tokenizer

    original = make_gguf(work)
    ids = load_tokenizer(original)(PROMPT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        reference = (ids, load_model(original, torch.float32, "cpu")(input_ids=ids).logits)
    data, region, rng = original.read_bytes(), gguf_header_end(original), random.Random(seed)
    control = run_bounded(gguf_job(original, reference), timeout)
    if control != "same":  # the harness itself must see the untouched file as the original
        raise SystemExit(f"the untouched GGUF file gives {control!r}, not 'same': the fuzzer is broken")
    outcomes: Counter = Counter()
    for index in range(count):
        variant, how = mutate(data, rng, region)
        path = work / "variants" / f"v{index}" / original.name
        path.parent.mkdir(parents=True)
        path.write_bytes(variant)
        outcome = run_bounded(gguf_job(path, reference), timeout)
        outcomes[outcome.split(":")[0] if outcome.startswith(("refused", "same")) else outcome] += 1
        if outcome.startswith(("crash", "hang", "changed")):
            print(f"gguf variant {index} ({how}): {outcome}{_field_at(original, how)}", file=sys.stderr)
        shutil.rmtree(path.parent)
    return outcomes


def _field_at(path: Path, how: str) -> str:
    """The metadata keys whose value holds the flipped offsets (what a flip that changed the model hit)."""
    import gguf

    if not how.startswith("flip"):
        return ""
    offsets = json.loads(how.removeprefix("flip at "))
    fields = gguf.GGUFReader(path).fields.values()
    hit = {
        field.name
        for field in fields
        for at in offsets
        if field.offset <= at < field.offset + sum(part.nbytes for part in field.parts)
    }
    return f" in {', '.join(sorted(hit)) or 'the tensor infos'}"


STREAM = {"bits": 4, "method": "rtn", "eval": None, "low_memory": True}


def make_staging(work: Path) -> tuple[Path, dict[str, Any], Path]:
    """The staging folder of a --low-memory run interrupted after 2 of 5 blocks, and the uninterrupted result."""
    import contextlib

    from safetensors.torch import load_file

    from quantcli.config.recipes import config_from_mapping
    from quantcli.errors import ResumableInterrupt
    from quantcli.run.pipeline import quantize
    from quantcli.sources.models import EMBEDDED_MODEL

    model = Path(shutil.copytree(EMBEDDED_MODEL, work / "model"))
    quantize(config_from_mapping({**STREAM, "model": str(model), "output": work / "whole"}))
    whole = {}
    for file in sorted((work / "whole").glob("*.safetensors")):
        whole.update(load_file(file))

    class StopAfter:
        finished = 0

        @contextlib.contextmanager
        def task(self, description: str, total: Any = None) -> Any:
            def advance(count: int) -> None:
                self.finished += count
                if self.finished > 14:
                    raise KeyboardInterrupt

            yield advance

    with contextlib.suppress(ResumableInterrupt):
        quantize(config_from_mapping({**STREAM, "model": str(model), "output": work / "out"}), StopAfter())
    (staging,) = work.glob(".out.partial-*")
    return model, whole, staging


def resume_job(model: Path, whole: dict[str, Any], staging: Path, variant: bytes) -> Callable[[], str]:
    def job() -> str:
        import torch
        from safetensors.torch import load_file

        from quantcli.config.recipes import config_from_mapping
        from quantcli.run.pipeline import quantize

        target = staging.parent / "resumed"
        own = staging.with_name(f".resumed.partial-{os.getpid()}")
        shutil.copytree(staging, own)
        (own / "resume.json").write_bytes(variant)
        report = quantize(config_from_mapping({**STREAM, "model": str(model), "output": target, "resume": True}))
        resumed = {}
        for file in sorted(target.glob("*.safetensors")):
            resumed.update(load_file(file))
        same = resumed.keys() == whole.keys() and all(torch.equal(resumed[key], whole[key]) for key in whole)
        return ("same" if report.stats["resumed_shards"] == 2 else "same: started over") if same else "changed: tensors"

    return job


def fuzz_resume(count: int, seed: int, timeout: float, work: Path) -> Counter:
    model, whole, staging = make_staging(work)
    data, rng = (staging / "resume.json").read_bytes(), random.Random(seed)
    control = run_bounded(resume_job(model, whole, staging, data), timeout)
    if control != "same":  # the untouched state must resume to the uninterrupted result
        raise SystemExit(f"the untouched resume state gives {control!r}, not 'same': the fuzzer is broken")
    for leftover in [*work.glob(".resumed.partial-*"), work / "resumed"]:
        shutil.rmtree(leftover, ignore_errors=True)
    outcomes: Counter = Counter()
    for index in range(count):
        variant, how = mutate(data, rng, len(data))
        outcome = run_bounded(resume_job(model, whole, staging, variant), timeout)
        outcomes[outcome] += 1
        if outcome.startswith(("crash", "hang", "changed")):
            print(f"resume variant {index} ({how}): {outcome}", file=sys.stderr)
        for leftover in [*work.glob(".resumed.partial-*"), work / "resumed"]:
            shutil.rmtree(leftover, ignore_errors=True)
    return outcomes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", type=int, default=500, help="variants per target")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=60, help="seconds per variant before it counts as a hang")
    parser.add_argument("--targets", default="gguf,resume")
    parser.add_argument("--out", type=Path, help="write the counts here as JSON")
    args = parser.parse_args(argv)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TQDM_DISABLE", "1")
    import torch

    torch.set_num_threads(1)
    results: dict[str, Any] = {"variants": args.variants, "seed": args.seed, "timeout_s": args.timeout}
    with tempfile.TemporaryDirectory(prefix="quantcli-fuzz-") as folder:
        for target in args.targets.split(","):
            start = time.perf_counter()
            work = Path(folder) / target
            work.mkdir()
            counts = (fuzz_gguf if target == "gguf" else fuzz_resume)(args.variants, args.seed, args.timeout, work)
            results[target] = {"outcomes": dict(counts.most_common()), "seconds": round(time.perf_counter() - start, 1)}
            print(f"{target}: {json.dumps(results[target])}")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    bad = [
        key
        for target in args.targets.split(",")
        for key in results[target]["outcomes"]
        if key.startswith(("crash", "hang")) or (target == "resume" and key.startswith("changed"))
    ]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
