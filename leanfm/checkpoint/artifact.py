"""Compressed artifacts: an HF-style directory plus `leanfm_compressed.json`, which says what each module is.

    save_compressed(model, tokenizer, "out/", report)     # atomic: out/ is complete or absent
    model = load_compressed("out/")                        # no compress code needed
    load_model("out/")                                     # the same, through the generic loader

Layout of the directory:
- `config.json` (+ `generation_config.json`): the model's ModelConfig as HF writes it. Structured pruning
  may have changed it (fewer layers, other layer_types); the artifact records the config as it now is.
- tokenizer files, as `save_hf_dir` writes them.
- `model.safetensors`: the state dict as the model holds it (packed uint8 codes, fp32 scales and zeros,
  low-rank factors...). Tensors sharing memory (a tied embedding / LM head) are stored once; the others
  are listed as aliases.
- `leanfm_compressed.json` (FORMAT_VERSION): `modules` maps every module that is not what
  `build_model(config)` creates to its form spec (`leanfm.models.forms`; "linear" for a plain linear of
  another shape, after channel or head pruning); `attention_heads` the per-layer head counts that differ
  from the config; `aliases`; `compress` the recipe, per-step summaries and calibration provenance;
  `sizes` the bytes on disk and the bits per weight overall, for the decoder layers and for the
  embedding + head (`leanfm.models.footprint`); the leanfm version that wrote it.

Loading builds the model on the meta device from config.json, swaps in empty modules from the specs,
applies the head counts and adopts the saved tensors (strict: every tensor accounted for).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from leanfm.checkpoint import hf
from leanfm.models import build_model
from leanfm.models.footprint import footprint, size_summary, tensor_key
from leanfm.models.forms import form_spec, module_from_spec
from leanfm.utils.errors import CheckpointError
from leanfm.utils.paths import atomic_dir

__all__ = ["FORMAT_VERSION", "MANIFEST_NAME", "describe", "is_compressed_dir", "load_compressed",
           "read_manifest", "save_compressed"]

MANIFEST_NAME = "leanfm_compressed.json"
FORMAT = "leanfm-compressed"
FORMAT_VERSION = 1
WEIGHTS_NAME = hf.WEIGHTS_NAME
_HEAD_ATTRS = ("n_heads", "n_kv")


def is_compressed_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / MANIFEST_NAME).is_file()


# --- what differs from build_model(config) -------------------------------------------------------
def module_specs(model: nn.Module) -> dict[str, dict[str, Any]]:
    """{module name: form spec} for every module build_model(model.config) would not create as it is."""
    reference = dict(build_model(model.config, device="meta").named_modules())
    specs: dict[str, dict[str, Any]] = {}
    forms: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(f + ".") for f in forms):
            continue
        ref = reference.get(name)
        if hasattr(module, "form_spec"):
            specs[name] = module.form_spec()
            forms.append(name)
        elif isinstance(module, nn.Linear):
            if not (isinstance(ref, nn.Linear) and (ref.in_features, ref.out_features, ref.bias is None)
                    == (module.in_features, module.out_features, module.bias is None)):
                specs[name] = form_spec(module)
        elif ref is None or not isinstance(module, type(ref)):
            raise CheckpointError(f"module {name or '<root>'} ({type(module).__name__}) has no saved form; "
                                  "merge or remove it before saving (only registered module forms can be saved)")
    return specs


def head_counts(model: nn.Module) -> dict[str, dict[str, int]]:
    """{attention module name: {"n_heads", "n_kv"}} where they differ from the config."""
    c = model.config
    out = {}
    for name, module in model.named_modules():
        if all(hasattr(module, a) for a in _HEAD_ATTRS):
            counts = {a: int(getattr(module, a)) for a in _HEAD_ATTRS}
            if counts != {"n_heads": c.num_attention_heads, "n_kv": c.num_key_value_heads}:
                out[name] = counts
    return out


def _dedup_state(model: nn.Module, dtype: torch.dtype | None, form_names: list[str]
                 ) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(tensors to write, {alias: saved name}) with memory-sharing tensors stored once."""
    state, aliases, owner = {}, {}, {}
    storages: set[int] = set()
    for name, t in model.state_dict().items():
        if t.is_meta:
            raise CheckpointError(f"{name} is on the meta device; load the model's weights before saving")
        key = tensor_key(t)
        if key in owner:
            aliases[name] = owner[key]
            continue
        owner[key] = name
        in_form = any(name.startswith(f + ".") for f in form_names)
        if dtype is not None and t.is_floating_point() and not in_form:
            t = t.to(dtype)
        ptr = t.untyped_storage().data_ptr()
        t = t.detach().to("cpu")
        t = t.clone() if ptr in storages else t.contiguous()  # safetensors refuses shared memory
        storages.add(ptr)
        state[name] = t
    return state, aliases


def _write_weights(state: dict[str, Tensor], path: Path) -> None:
    # one metadata key: safetensors serialises the metadata map in a random order, and byte-identical
    # files for identical runs are worth keeping
    save_file(state, str(path), metadata={"format": "pt"})


def _chmod_default(path: Path, mode: int) -> None:
    """The permissions a plain mkdir/open would give (mkdtemp and safetensors create owner-only ones)."""
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(mode & ~umask)


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())


def _check_out_dir(out: Path, overwrite: bool) -> bool:
    """Whether out must be replaced; CheckpointError when it may not be."""
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out} exists and is not a directory; choose another output path")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise CheckpointError(f"{out} exists and is not empty; choose a new path or pass overwrite=True "
                                  "(--overwrite)")
    return out.exists()


def save_compressed(model: nn.Module, tokenizer: Any, out_dir: str | os.PathLike, report: Any = None,
                    overwrite: bool = False, dtype: torch.dtype | None = None) -> Path:
    """Write `model` (compressed or not) as an artifact directory, atomically. Returns its path.

    report: the CompressReport (or its dict) of the run that made it. dtype: cast the float tensors of
    plain modules (norms, unquantized matrices) to this dtype; module forms keep theirs.
    """
    from leanfm import __version__

    out = Path(out_dir).expanduser().absolute()
    replace = _check_out_dir(out, overwrite)
    specs = module_specs(model)
    forms = [n for n, s in specs.items() if s.get("form") != "linear"]
    state, aliases = _dedup_state(model, dtype, forms)
    float_dtype = next((t.dtype for n, t in state.items() if t.is_floating_point()
                        and not any(n.startswith(f + ".") for f in forms)), torch.float32)
    sizes = size_summary(footprint(model))
    manifest: dict[str, Any] = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "leanfm_version": __version__,
        "dtype": str(float_dtype).removeprefix("torch."), "weights": WEIGHTS_NAME,
        "modules": specs, "attention_heads": head_counts(model), "aliases": aliases,
        "compress": report.to_dict() if hasattr(report, "to_dict") else report,
    }
    with atomic_dir(out, overwrite=replace) as tmp:
        _chmod_default(tmp, 0o777)
        config = model.config
        (tmp / "config.json").write_text(json.dumps(hf.config_to_hf(config, float_dtype), indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(hf._generation_config(config), indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save_hf_dir(tmp)
        _write_weights(state, tmp / WEIGHTS_NAME)
        _chmod_default(tmp / WEIGHTS_NAME, 0o666)
        sizes.update(weights_file_bytes=(tmp / WEIGHTS_NAME).stat().st_size, disk_bytes=_dir_bytes(tmp))
        manifest["sizes"] = sizes
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
    return out


# --- load ------------------------------------------------------------------------------------------
def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The artifact's leanfm_compressed.json, checked; CheckpointError saying what is wrong."""
    file = Path(path) / MANIFEST_NAME
    if not file.is_file():
        raise CheckpointError(f"{path}: no {MANIFEST_NAME}, so not a compressed leanfm artifact; "
                              "load it as a plain model directory or re-create it with `leanfm compress`")
    try:
        m = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file}: invalid JSON ({e}); the artifact is corrupt, re-create it with "
                              "`leanfm compress`") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise CheckpointError(f"{file}: not a leanfm compressed-artifact manifest; re-create the artifact")
    version = m.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(f"{file}: format version {version!r} is not supported by this leanfm "
                              f"(reads <= {FORMAT_VERSION}); upgrade leanfm")
    for key, kind in (("modules", dict), ("attention_heads", dict), ("aliases", dict)):
        if not isinstance(m.get(key, {}), kind):
            raise CheckpointError(f"{file}: '{key}' must be a mapping; the artifact is corrupt, re-create it")
    return m


def _read_state(file: Path) -> dict[str, Tensor]:
    if not file.is_file():
        raise CheckpointError(f"{file.parent}: no {file.name}; the artifact is incomplete, re-create it")
    try:
        with safe_open(str(file), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except (OSError, SafetensorError) as e:
        raise CheckpointError(f"{file}: unreadable safetensors ({e}); re-create the artifact") from None


def _build_skeleton(config, manifest: dict[str, Any], dtype: torch.dtype, where: Path) -> nn.Module:
    model = build_model(config, device="meta").to(dtype)
    for name, spec in manifest.get("modules", {}).items():
        try:
            module = module_from_spec(spec, dtype)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, module)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise CheckpointError(f"{where}: cannot rebuild module {name} from {spec} ({e}); the artifact was "
                                  "written by another leanfm version or is corrupt") from None
    for name, counts in manifest.get("attention_heads", {}).items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"{where}: attention module {name} does not exist in this config") from None
        for attr in _HEAD_ATTRS:
            setattr(module, attr, int(counts[attr]))
    return model


def _retie(model: nn.Module, aliases: dict[str, str]) -> None:
    """Re-share the embedding / LM head tensors that were one in the saved model."""
    def side(name: str) -> str:
        return "head" if name.startswith("lm_head.") else "emb" if name.startswith("model.embed_tokens.") else ""

    if not any({side(a), side(t)} == {"head", "emb"} for a, t in aliases.items()):
        return
    head, emb = model.lm_head, model.model.embed_tokens
    if hasattr(head, "retie"):
        head.retie(model)
    elif isinstance(head, nn.Linear) and isinstance(emb, nn.Embedding):
        head.weight = emb.weight


def load_compressed(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The model an artifact directory holds (eval mode). Float tensors of plain modules become `dtype`."""
    path = Path(path).expanduser()
    manifest = read_manifest(path)
    config, _ = _read_config(path)
    model = _build_skeleton(config, manifest, dtype, path)
    state = _read_state(path / manifest.get("weights", WEIGHTS_NAME))
    aliases = manifest.get("aliases", {})
    for alias, target in aliases.items():
        if target not in state:
            raise CheckpointError(f"{path}: alias {alias} -> {target} names no saved tensor; the artifact is corrupt")
        state[alias] = state[target]
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{path}: saved tensors do not match the manifest (missing {missing[:4]}, "
                              f"unexpected {unexpected[:4]}); the artifact is corrupt, re-create it")
    for k, t in state.items():
        if t.is_floating_point() and t.dtype != expected[k].dtype:
            state[k] = t.to(expected[k].dtype)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        msg = str(e).replace("\n", " ").strip()
        raise CheckpointError(f"{path}: tensor shapes do not match the manifest ({msg[:300]})") from None
    _retie(model, aliases)
    return model.eval().requires_grad_(False)


def _read_config(path: Path):
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{path}: no config.json; the artifact is incomplete, re-create it")
    try:
        config = hf.config_from_hf(json.loads(cfg_file.read_text()))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_file}: invalid JSON ({e}); the artifact is corrupt, re-create it") from None
    if not config.name:
        config = config.replace(name=path.name)
    return config, cfg_file


def describe(path: str | os.PathLike) -> tuple[dict[str, dict[str, int]], str]:
    """(per-component {"params", "bytes"}, one summary line) of an artifact, from its manifest only."""
    m = read_manifest(path)
    sizes = m.get("sizes") or {}
    steps = ((m.get("compress") or {}).get("recipe") or {}).get("steps") or []
    recipe = " -> ".join(s.get("method", "?") for s in steps) or "no recipe recorded"
    bpw = sizes.get("bits_per_weight") or {}

    def fmt(x: float | None) -> str:
        return "—" if x is None else f"{x:.2f}"

    resized = sum(1 for spec in m.get("modules", {}).values() if spec.get("form") == "linear")
    heads = m.get("attention_heads") or {}
    structure = "".join([f"; {resized} resized linears" if resized else "",
                         f"; query heads pruned in {len(heads)} layers" if heads else ""])
    line = (f"compressed   {recipe}; {fmt(bpw.get('overall'))} bits/weight (decoder layers "
            f"{fmt(bpw.get('decoder_layers'))}, embedding+head {fmt(bpw.get('embedding_head'))}); "
            f"{sizes.get('disk_bytes', 0) / 2**20:.1f} MiB on disk{structure}")
    return sizes.get("components") or {}, line
