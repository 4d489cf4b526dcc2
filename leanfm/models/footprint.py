"""What a live model really stores, per component: logical weights and bytes (packed forms included).

`models.cost` counts a ModelConfig's dense parameters; a compressed model holds packed codes, scales,
low-rank factors or fewer channels instead. `footprint(model)` walks the modules: a registered module
form (QuantLinear, LowRankLinear...) counts the dense weights it stands for (from its form spec) and the
bytes of every tensor it holds; a plain module counts its own parameters. Tensors shared by several
modules (a tied embedding / LM head) count once, under the first module that holds them.

    fp = footprint(model)            # {"embedding": {"params": n, "bytes": b}, "attention": ..., ...}
    bits_per_weight(fp, "ffn")       # 8 * bytes / params
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

COMPONENTS = ("embedding", "attention", "ffn", "norms", "head")
GROUPS = {"decoder_layers": ("attention", "ffn", "norms"), "embedding_head": ("embedding", "head")}


def component_of(name: str) -> str:
    """The cost component a module (or tensor) name belongs to, as in models.cost.param_breakdown."""
    if name.startswith("model.embed_tokens"):
        return "embedding"
    if name.startswith("lm_head"):
        return "head"
    if ".self_attn." in f"{name}.":
        return "attention"
    if ".mlp." in f"{name}.":
        return "ffn"
    return "norms"


def logical_numel(spec: dict[str, Any]) -> int | None:
    """Dense weights a form stands for (weight matrix plus bias), from its spec; None if it does not say."""
    if "in_features" in spec and "out_features" in spec:
        return spec["in_features"] * spec["out_features"] + (spec["out_features"] if spec.get("bias") else 0)
    if "num_embeddings" in spec and "embedding_dim" in spec:
        return spec["num_embeddings"] * spec["embedding_dim"]
    return None


def tensor_key(t: Tensor) -> tuple:
    """Identity of a tensor's memory: views of the same bytes compare equal (meta tensors: the object)."""
    if t.is_meta:
        return ("meta", id(t))
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)


def footprint(model: nn.Module) -> dict[str, dict[str, int]]:
    """{component: {"params": logical weights, "bytes": stored bytes}} for COMPONENTS (see module doc)."""
    out = {c: {"params": 0, "bytes": 0} for c in COMPONENTS}
    seen: set[tuple] = set()
    forms: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(f + ".") for f in forms):
            continue  # inside a form: counted with it
        spec_fn = getattr(module, "form_spec", None)
        recurse = spec_fn is not None
        params = list(module.parameters(recurse=recurse))
        tensors = [t for t in [*params, *module.buffers(recurse=recurse)] if t is not None]
        new = [t for t in tensors if tensor_key(t) not in seen]
        seen.update(tensor_key(t) for t in new)
        c = out[component_of(name)]
        c["bytes"] += sum(t.numel() * t.element_size() for t in new)
        if spec_fn is not None:
            forms.append(name)
            if new:  # a tied form whose tensors another module holds stands for no new weights
                c["params"] += logical_numel(spec_fn()) or sum(t.numel() for t in new)
        else:
            new_keys = {tensor_key(t) for t in new}
            c["params"] += sum(p.numel() for p in params if tensor_key(p) in new_keys)
    return out


def bits_per_weight(fp: dict[str, dict[str, int]], *components: str) -> float | None:
    """8 * bytes / params over `components` (all when none given); None when they hold no weights."""
    names = components or tuple(fp)
    params = sum(fp[c]["params"] for c in names)
    return round(8 * sum(fp[c]["bytes"] for c in names) / params, 4) if params else None


def size_summary(fp: dict[str, dict[str, int]]) -> dict[str, Any]:
    """Totals and bits per weight overall, for the decoder layers and for the embedding + head."""
    return {
        "params": sum(v["params"] for v in fp.values()),
        "bytes": sum(v["bytes"] for v in fp.values()),
        "bits_per_weight": {"overall": bits_per_weight(fp),
                            **{g: bits_per_weight(fp, *cs) for g, cs in GROUPS.items()}},
        "components": fp,
    }
