"""`leanfm compress`: apply one method (flags) or a recipe (YAML/JSON file) and save a compressed artifact.

    leanfm compress --model gemma-3-270m --method gptq --bits 4 --group-size 128 -o out/gptq4
    leanfm compress -m gemma-3-270m --method wanda --sparsity 0.5 --pattern 2:4 -o out/wanda24
    leanfm compress -m gemma-3-270m --recipe recipe.yaml -o out/mixed

A recipe file is Recipe.to_dict() plus an optional calibration block:

    steps:
      - {method: wanda, sparsity: 0.5}
      - method: rtn
        bits: 4
        group_size: 128
        include: ["model.layers.*", "lm_head"]
        overrides: [{pattern: lm_head, bits: 8}, {pattern: "model.layers.0.*", skip: true}]
    calibration: {samples: 128, seq_len: 512, corpus: wiki}

Everything is validated before the model loads (the recipe, then every target module against a
weightless copy of the model), the output directory is checked up front, and the artifact is written
atomically: an error or Ctrl-C leaves no half-written output. Calibration tokens come from the
harness' calibration split (leanfm.bench.corpora) only when a step needs them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Annotated, Any

import typer

from leanfm.cli_common import DtypeOpt, ModelOpt, ThreadsOpt, setup_torch
from leanfm.utils.errors import LeanfmError

CALIB_DEFAULTS = {"samples": 128, "seq_len": 512, "corpus": "wiki"}
# generic flag -> candidate config field names (the first one the method's config has is used)
FLAG_FIELDS: dict[str, tuple[str, ...]] = {
    "--bits": ("bits",), "--group-size": ("group_size",), "--asym": ("symmetric",),
    "--sparsity": ("sparsity", "ffn_sparsity"), "--pattern": ("pattern",), "--rank": ("rank",),
    "--param-ratio": ("param_ratio",), "--energy": ("energy",),
    "--layers": ("n_layers", "num_layers", "layers", "n_remove"),
}


def _usage(message: str, hint: str | None = None) -> typer.BadParameter:
    return typer.BadParameter(message, param_hint=hint)


def _parse_set(items: list[str]) -> dict[str, Any]:
    """--set key=value pairs; values parsed as YAML scalars/lists (0.5, true, null, [1, 2], text)."""
    import yaml

    out = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise _usage(f"expected key=value, got {item!r}", "--set")
        try:
            out[key.strip()] = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError:
            out[key.strip()] = value
    return out


def _config_fields(method: str) -> set[str]:
    from leanfm.compress.api import _REGISTRY, method_names

    if method not in method_names():
        raise _usage(f"unknown compression method {method!r}; choose one of {', '.join(method_names())}",
                     "--method")
    return {f.name for f in dataclasses.fields(_REGISTRY[method][0])}


def method_step(method: str, flags: dict[str, Any], sets: dict[str, Any], include: list[str],
                exclude: list[str]) -> dict[str, Any]:
    """The recipe step (as a dict) that --method and the option flags describe."""
    fields = _config_fields(method)
    step: dict[str, Any] = {"method": method}
    for flag, value in flags.items():
        field = next((f for f in FLAG_FIELDS[flag] if f in fields), None)
        if field is None:
            raise _usage(f"{method} has no option {flag}; its options: {', '.join(sorted(fields))} "
                         "(set any of them with --set key=value)", flag)
        step[field] = (not value) if flag == "--asym" else value
    unknown = set(sets) - fields
    if unknown:
        raise _usage(f"{method} has no option(s) {sorted(unknown)}; valid: {', '.join(sorted(fields))}", "--set")
    step.update(sets)
    if include:
        step["include"] = list(include)
    if exclude:
        step["exclude"] = list(exclude)
    return step


def read_recipe_file(path: Path) -> dict[str, Any]:
    """The mapping in a YAML or JSON recipe file; LeanfmError when it does not parse."""
    import yaml

    try:
        text = path.read_text()
    except OSError as e:
        raise LeanfmError(f"cannot read recipe {path}: {e.strerror or e}; check the path") from None
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LeanfmError(f"recipe {path} does not parse ({first}); fix the YAML/JSON") from None
    if isinstance(data, list):
        data = {"steps": data}
    if not isinstance(data, dict):
        raise LeanfmError(f"recipe {path} must be a mapping with 'steps' (and optional 'calibration')")
    unknown = set(data) - {"steps", "calibration"}
    if unknown:
        raise LeanfmError(f"recipe {path}: unknown top-level key(s) {sorted(unknown)}; use 'steps' and "
                          "'calibration'")
    return data


def calibration_settings(recipe_calib: Any, samples: int | None, seq_len: int | None, corpus: str | None
                         ) -> dict[str, Any]:
    """Flags win over the recipe's calibration block, which wins over the defaults."""
    if recipe_calib is None:
        recipe_calib = {}
    if not isinstance(recipe_calib, dict) or set(recipe_calib) - set(CALIB_DEFAULTS):
        raise LeanfmError(f"recipe 'calibration' must be a mapping with keys {sorted(CALIB_DEFAULTS)}, "
                          f"got {recipe_calib!r}")
    out = {**CALIB_DEFAULTS, **recipe_calib}
    for key, value in (("samples", samples), ("seq_len", seq_len), ("corpus", corpus)):
        if value is not None:
            out[key] = value
    for key in ("samples", "seq_len"):
        if not isinstance(out[key], int) or isinstance(out[key], bool) or out[key] < 1:
            raise LeanfmError(f"calibration {key} must be a positive integer, got {out[key]!r}")
    return out


def _precheck(model_ref: str, recipe: Any) -> None:
    """Check every step's targets on a weightless (meta) copy of the model, before loading weights."""
    from leanfm.checkpoint.inspect import read_config
    from leanfm.compress.api import CompressContext
    from leanfm.models import build_model

    config, source = read_config(model_ref)
    if Path(source).is_dir() and (Path(source) / "leanfm_compressed.json").is_file():
        return  # an artifact's modules differ from build_model(config); compress_ checks them after loading
    skeleton = build_model(config, device="meta")
    for step in recipe.steps:
        for name, module, cfg in CompressContext(skeleton, step, None).targets():
            cfg.check_module(name, module)


def calibration_tokens(tokenizer: Any, calib: dict[str, Any], seed: int) -> tuple[Any, dict[str, Any]]:
    """(tokens (n, seq_len), provenance) from the harness' calibration split."""
    from leanfm.bench.corpora import calibration_samples

    tokens = calibration_samples(tokenizer, calib["samples"], calib["seq_len"], seed=seed, corpus=calib["corpus"])
    sha = hashlib.sha256(tokens.contiguous().numpy().tobytes()).hexdigest()
    info = {"corpus": calib["corpus"], "split": "calib", "n": int(tokens.shape[0]), "seq_len": int(tokens.shape[1]),
            "seed": seed, "tokens": int(tokens.numel()), "sha256": sha}
    return tokens, info


def _short(v: Any) -> str:
    if isinstance(v, dict) and len(str(v)) > 60:
        return f"{{{len(v)} entries}}"
    if isinstance(v, list | tuple) and len(str(v)) > 60:
        return f"[{len(v)} items]"
    return str(v)


def _summary_line(step: dict[str, Any]) -> str:
    rest = ", ".join(f"{k}={_short(v)}" for k, v in step.items() if k not in ("method", "seconds"))
    return f"  {step['method']:<12} {step.get('seconds', 0):7.1f}s  {rest}"


def build_recipe(method: str | None, recipe_file: Path | None, flags: dict[str, Any], sets: dict[str, Any],
                 include: list[str], exclude: list[str], calib_flags: tuple) -> tuple[Any, dict[str, Any]]:
    """(Recipe, calibration settings) from --method + flags or --recipe; usage errors exit 2."""
    from leanfm.compress import ConfigError, Recipe

    if (method is None) == (recipe_file is None):
        raise _usage("give exactly one of --method NAME (with option flags) or --recipe FILE", "--method/--recipe")
    if recipe_file is not None:
        extra = [f for f in flags] + (["--set"] if sets else []) + (["--include"] if include else []) + (
            ["--exclude"] if exclude else [])
        if extra:
            raise _usage(f"{', '.join(extra)} apply to --method; with --recipe put options in the recipe file",
                         extra[0])
        data = read_recipe_file(recipe_file)
        recipe = Recipe.from_dict(data.get("steps"))  # ConfigError (exit 1) names the bad step or option
        return recipe, calibration_settings(data.get("calibration"), *calib_flags)
    step = method_step(method, flags, sets, include, exclude)
    try:
        recipe = Recipe.from_dict([step])
    except ConfigError as e:
        raise _usage(str(e)) from None
    return recipe, calibration_settings(None, *calib_flags)


def _check_output(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise LeanfmError(f"{out} exists and is not a directory; choose another --output")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise LeanfmError(f"{out} exists and is not empty; choose a new --output or pass --overwrite")


def compress_cmd(
    output: Annotated[Path, typer.Option("--output", "-o", help="artifact directory to write")],
    model: ModelOpt = "gemma-3-270m",
    method: Annotated[str | None, typer.Option(help="one method: rtn, gptq, awq, wanda, sparsegpt, svd, ...")] = None,
    recipe: Annotated[Path | None, typer.Option(help="recipe file (YAML or JSON) instead of --method")] = None,
    bits: Annotated[int | None, typer.Option(help="weight bits (2, 3, 4, 8)")] = None,
    group_size: Annotated[int | None, typer.Option(help="quantization group size (-1: per channel)")] = None,
    asym: Annotated[bool, typer.Option("--asym", help="asymmetric quantization (zero points)")] = False,
    sparsity: Annotated[float | None, typer.Option(help="fraction of weights to prune, in [0, 1)")] = None,
    pattern: Annotated[str | None, typer.Option(help="sparsity pattern: unstructured, 2:4, 4:8")] = None,
    rank: Annotated[int | None, typer.Option(help="low-rank: rank of every factorized layer")] = None,
    param_ratio: Annotated[float | None, typer.Option(help="low-rank: fraction of parameters kept")] = None,
    energy: Annotated[float | None, typer.Option(help="low-rank: fraction of spectral energy kept")] = None,
    layers: Annotated[int | None, typer.Option(help="layer removal: how many layers to remove")] = None,
    include: Annotated[list[str] | None, typer.Option(help="module-name pattern to compress (repeatable)")] = None,
    exclude: Annotated[list[str] | None, typer.Option(help="module-name pattern to leave alone (repeatable)")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="any other config option, key=value (repeatable)")] = None,
    calib_samples: Annotated[int | None, typer.Option(help="calibration samples [default: 128]")] = None,
    calib_seq_len: Annotated[int | None, typer.Option(help="tokens per calibration sample [default: 512]")] = None,
    calib_corpus: Annotated[str | None, typer.Option(help="calibration corpus (wiki, books) or text file "
                                                          "[default: wiki]")] = None,
    seed: Annotated[int, typer.Option(help="random seed (calibration sampling, methods)")] = 0,
    dtype: DtypeOpt = "float32",
    threads: ThreadsOpt = 0,
    overwrite: Annotated[bool, typer.Option(help="replace OUTPUT if it exists")] = False,
    progress: Annotated[bool, typer.Option(help="progress bars")] = True,
) -> None:
    """Compress a model with one method or a recipe and save a compressed artifact."""
    from leanfm.checkpoint.artifact import describe, save_compressed
    from leanfm.checkpoint.loader import load_model
    from leanfm.compress import compress_

    torch_dtype, dtype_name = setup_torch(threads, dtype, seed)
    flags = {k: v for k, v in (("--bits", bits), ("--group-size", group_size), ("--sparsity", sparsity),
                               ("--pattern", pattern), ("--rank", rank), ("--param-ratio", param_ratio),
                               ("--energy", energy), ("--layers", layers)) if v is not None}
    if asym:
        flags["--asym"] = True
    the_recipe, calib = build_recipe(method, recipe, flags, _parse_set(set_ or []), include or [], exclude or [],
                                     (calib_samples, calib_seq_len, calib_corpus))
    out = output.expanduser().absolute()
    _check_output(out, overwrite)
    _precheck(model, the_recipe)
    loaded = load_model(model, dtype=torch_dtype, progress=progress)
    tokens, info = None, None
    if the_recipe.needs_calibration:
        tokens, info = calibration_tokens(loaded.tokenizer, calib, seed)
    try:
        report = compress_(loaded.model, the_recipe, calibration=tokens, calibration_info=info, seed=seed,
                           progress=progress)
    except KeyboardInterrupt:
        typer.echo("interrupted: nothing written", err=True)
        raise typer.Exit(130) from None
    record = {**report.to_dict(), "model": model, "dtype": dtype_name}
    if (loaded.path / "leanfm_compressed.json").is_file():  # compressing an artifact further: keep its history
        from leanfm.checkpoint.artifact import read_manifest

        record["previous"] = read_manifest(loaded.path).get("compress")
    path = save_compressed(loaded.model, loaded.tokenizer, out, record, overwrite=overwrite)
    typer.echo(f"compressed {model} -> {path}")
    for step in report.steps:
        typer.echo(_summary_line(step))
    typer.echo(describe(path)[1].replace("compressed   ", "artifact: ", 1))
