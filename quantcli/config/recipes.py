"""YAML recipes and command-line options merged into one :class:`~quantcli.config.quantize.QuantizeConfig`.

A recipe is flat YAML: the top-level keys of :class:`QuantizeConfig` plus ``calibration:``, ``eval:``,
``gates:`` and ``allocation:`` mappings; any other top-level key is a method option (``group_size: 32``)
that the chosen method's own config validates. Unknown keys are rejected, never ignored.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

from quantcli.config.allocation import AllocationConfig
from quantcli.config.gates import GateLimits
from quantcli.config.quantize import CalibrationConfig, EvalConfig, QuantizeConfig
from quantcli.config.strictyaml import load_strict
from quantcli.errors import InputError, option
from quantcli.formats.gguf.types import block_type
from quantcli.limits import MAX_RECIPE_BYTES, read_bounded, shown

_SECTIONS = {"calibration": CalibrationConfig, "eval": EvalConfig, "gates": GateLimits, "allocation": AllocationConfig}


def _section(name: str, cls: type, values: Any) -> Any:
    if values is None and name in ("eval", "allocation"):
        return None
    if not isinstance(values, Mapping):
        raise InputError(f"'{name}' must be a mapping of settings, got {type(values).__name__}.")
    known = {f.name for f in fields(cls)}
    unknown = sorted(key if isinstance(key, str) and key.isidentifier() else shown(key) for key in set(values) - known)
    if unknown:
        raise InputError(f"unknown key(s) {', '.join(unknown)} in '{name}'. Valid keys: {', '.join(sorted(known))}.")
    try:
        return cls(**values)
    except TypeError as error:
        raise InputError(f"bad '{name}' settings: {error}.") from None


def config_from_mapping(values: Mapping[str, Any]) -> QuantizeConfig:
    """Build a :class:`QuantizeConfig`; keys that are not its fields become method options."""
    if not isinstance(values, Mapping):
        raise InputError(f"a recipe must be a mapping of settings, got {type(values).__name__}.")
    top = {f.name for f in fields(QuantizeConfig)} - {"method_options"}
    kwargs: dict[str, Any] = {}
    options = values.get("method_options") or {}
    if not isinstance(options, Mapping) or not all(isinstance(key, str) for key in options):
        raise InputError(f"'method_options' must be a mapping of option names to values, got {shown(options)}.")
    options = dict(options)
    for key, value in values.items():
        if not isinstance(key, str):
            raise InputError(f"recipe keys must be strings, got {shown(key)}.")
        if key == "method_options":
            continue
        if key in _SECTIONS:
            kwargs[key] = _section(key, _SECTIONS[key], value)
        elif key in top:
            kwargs[key] = value
        else:
            options[key] = value
    if kwargs.get("allocation") is not None:
        kwargs.setdefault("bits", 4)  # nominal: each layer's bits come from its chosen candidate
    if "bits" not in kwargs:
        raise InputError(f"the recipe sets no 'bits'. Add e.g. 'bits: 4' or pass {option('bits')}.")
    if isinstance(kwargs.get("output"), str):
        kwargs["output"] = Path(kwargs["output"])
    if "skip_modules" in kwargs:
        skip = kwargs["skip_modules"]
        if isinstance(skip, str):
            skip = [skip]
        if not isinstance(skip, (list, tuple)) or not all(isinstance(s, str) for s in skip):
            raise InputError("'skip_modules' must be a list of glob patterns.")
        kwargs["skip_modules"] = tuple(skip)
    try:
        return QuantizeConfig(method_options=options, **kwargs)
    except TypeError as error:
        raise InputError(f"bad recipe: {error}.") from None


def parse_option(text: str) -> tuple[str, Any]:
    """One ``-O KEY=VALUE`` method option; the value is read as a YAML scalar (``0.05``, ``true``, ``fp16``)."""
    import yaml

    key, equals, raw = text.partition("=")
    if not equals or not key.strip():
        raise InputError(f"-O takes KEY=VALUE (e.g. -O damp=0.05), got {text!r}.")
    try:
        value = yaml.safe_load(raw) if raw.strip() else raw
    except yaml.YAMLError:
        value = raw
    if not isinstance(value, (str, int, float, bool)) or value is None:
        value = raw
    return key.strip().replace("-", "_"), value


def merge_quantize_config(
    recipe_path: Path | None,
    top: Mapping[str, Any],
    method_options: Mapping[str, Any],
    calibration: Mapping[str, Any],
    evaluation: Mapping[str, Any] | None,
    gates: Mapping[str, Any],
    options: list[str] = (),
    allocation: Mapping[str, Any] | None = None,
) -> QuantizeConfig:
    """The one merge of a YAML recipe with what the command line gave (each mapping holds only the
    options actually given; ``evaluation=None`` is ``--no-eval``; ``options`` are ``-O KEY=VALUE``)."""
    recipe: dict[str, Any] = load_recipe(recipe_path) if recipe_path else {}
    recipe.update(top)
    recipe.update(method_options)
    recipe.update(_options_once(options, {**top, **method_options}))
    for name, given in (("calibration", calibration), ("gates", gates)):
        recipe[name] = {**_recipe_section(recipe, name), **given}
    streams = bool(recipe.get("low_memory"))
    asked = set(evaluation or {}) - {"seq_len"}  # --seq-len also sets calibration windows
    if evaluation is None or (streams and not asked and "eval" not in recipe):
        recipe["eval"] = None  # streaming never holds the whole model, so it evaluates only when asked
    else:
        recipe["eval"] = {**_recipe_section(recipe, "eval"), **evaluation}
    if allocation:
        recipe["allocation"] = {**_recipe_section(recipe, "allocation"), **allocation}
    if recipe.get("allocation"):
        if "bits" in recipe:
            raise InputError(
                f"{option('bits', recipe['bits'])} is not used with {option('allocation')}: each layer's bits come"
                f" from its chosen candidate ({option('allocation.candidates')}). Drop {option('bits')}."
            )
        recipe["bits"] = 4  # nominal: each layer's bits come from its chosen candidate
    if "bits" not in recipe and isinstance(recipe.get("gguf_type"), str):
        recipe["bits"] = block_type(recipe["gguf_type"]).bits
    if "bits" not in recipe:
        raise InputError(
            f"no {option('bits')} given. Pass {option('bits', 8)} or {option('bits', 4)}, or a {option('config')} "
            "recipe that sets bits."
        )
    return config_from_mapping(recipe)


def _options_once(options: list[str], flags: Mapping[str, Any]) -> dict[str, Any]:
    """``-O KEY=VALUE`` options, each key given once and not also by its own flag (recipes refuse duplicates too)."""
    parsed: dict[str, Any] = {}
    for text in options:
        key, value = parse_option(text)
        if key in parsed:
            given = f"{key}={parsed[key]!r} and {key}={value!r}"
            raise InputError(f"-O {key} is given twice ({given}). Give each option once.")
        if key in flags:
            raise InputError(f"-O {key}={value!r} and {option(key, flags[key])} both set {key}. Give it once.")
        parsed[key] = value
    return parsed


def _recipe_section(recipe: Mapping[str, Any], key: str) -> dict[str, Any]:
    value = recipe.get(key) or {}
    if not isinstance(value, Mapping):
        raise InputError(f"'{key}' must be a mapping of settings, got {type(value).__name__}.")
    return dict(value)


def load_recipe(path: Path) -> dict[str, Any]:
    """Read a YAML recipe file into a plain mapping (validated later by :func:`config_from_mapping`)."""

    try:
        text = read_bounded(Path(path), "recipe", MAX_RECIPE_BYTES).decode("utf-8")
    except FileNotFoundError:
        raise InputError(
            f"recipe file {path} does not exist. Pass the path of a YAML file, e.g. configs/rtn-int4.yaml."
        ) from None
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"cannot read recipe {path}: {error}.") from None
    data = load_strict(text, path)
    if data is None:
        raise InputError(f"recipe {path} is empty. Add at least 'bits: 4'.")
    if not isinstance(data, dict):
        raise InputError(f"recipe {path} must be a YAML mapping (key: value lines), not a {type(data).__name__}.")
    if "trust_remote_code" in data:  # a data file never chooses what code runs
        raise InputError(
            f"recipe {path} sets trust_remote_code: a recipe is data and cannot choose to run a model's own"
            f" Python code. Remove the key, and pass {option('trust_remote_code', True)} on the command line"
            " if you trust the model."
        )
    return data
