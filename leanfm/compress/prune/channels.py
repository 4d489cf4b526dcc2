"""Structured pruning to a smaller dense model: FFN channels and attention query heads.

FFN: intermediate channel c of a gated MLP is row c of gate_proj and up_proj and column c of down_proj;
removing it gives narrower nn.Linear modules (each layer may end up with its own width). Attention:
query head h is rows [h*D, (h+1)*D) of q_proj and the same columns of o_proj. With grouped-query
attention, query heads are removed in equal numbers from every group, so each kv head keeps >= 1 query
head, n_heads stays a multiple of n_kv, and the kv heads (and the KV cache) are untouched; the
attention module's `n_heads` is updated.

Importance (criterion):
  "activation": Wanda-style |W_ij| * ||X_j||_2 summed over the weights that read the channel / head's
                output - its down_proj column (X = down_proj inputs) / its o_proj columns - on
                calibration data walked layer by layer (later layers are scored on the outputs of the
                already pruned ones). That is the size of what the channel adds to the residual stream;
                on gemma-3-270m (25% of FFN channels) it gives perplexity 33 where also summing the
                gate/up rows' input-side scores gives 135;
  "magnitude":  sum of |W_ij| over all the channel's weights (gate/up rows + down column; q rows + o
                columns), no calibration.
The lowest-scoring channels / heads go (ties: the lower index first).

The handler's summary carries "structure": {"model.layers.<i>.self_attn": {"n_heads", "n_kv"},
"model.layers.<i>.mlp": {"intermediate_size"}} for every pruned module, which a loader needs (with the
"linear" form specs of the narrower projections) to rebuild the model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from leanfm.compress.api import CompressContext, ConfigError, MethodConfig, register
from leanfm.compress.calibrate import LayerwiseCalibration
from leanfm.compress.prune.common import CALIB_BATCH, ColumnNorms, InputStats
from leanfm.models.blocks import Attention, GatedMLP
from leanfm.ops.sparsity import prune_lowest

__all__ = ["ChannelPruneConfig", "apply_channel_prune", "channel_scores", "head_scores", "keep_channels",
           "keep_heads", "shrink_attention_", "shrink_mlp_"]

CRITERIA = ("activation", "magnitude")


@dataclass(frozen=True)
class ChannelPruneConfig(MethodConfig):
    """ffn_sparsity: fraction of each MLP's intermediate channels removed; head_sparsity: fraction of the
    query heads of every GQA group removed (rounded; each group keeps >= 1)."""

    method = "channels"

    ffn_sparsity: float = 0.0
    head_sparsity: float = 0.0
    criterion: str = "activation"

    def __post_init__(self) -> None:
        for key in ("ffn_sparsity", "head_sparsity"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int | float) or not 0.0 <= v < 1.0:
                self._fail(f"{key} must be in [0, 1) (the fraction removed), got {v!r}")
        if self.criterion not in CRITERIA:
            self._fail(f"criterion {self.criterion!r} unknown; use one of {CRITERIA}")

    @property
    def needs_calibration(self) -> bool:  # type: ignore[override]
        return self.criterion == "activation"


# --- scores and selection (pure) ------------------------------------------------------------------
def _weighted(w: Tensor, norm: Tensor | None) -> Tensor:
    """|W| (magnitude) or |W_ij| * ||X_j|| (activation)."""
    a = w.detach().abs().float()
    return a if norm is None else a * norm.float().reshape(1, -1)


def channel_scores(gate: Tensor, up: Tensor, down: Tensor, z_norm: Tensor | None = None) -> Tensor:
    """Importance of each intermediate channel [F]: gate/up [F, H] rows, down [H, F] columns. With z_norm
    [F] (down_proj input norms): activation, sum_i |down[i, c]| * z_norm[c]; else magnitude, the sum of
    |W| over the channel's gate row, up row and down column."""
    if z_norm is not None:
        return _weighted(down, z_norm).sum(0)
    return _weighted(gate, None).sum(1) + _weighted(up, None).sum(1) + _weighted(down, None).sum(0)


def head_scores(q: Tensor, o: Tensor, n_heads: int, z_norm: Tensor | None = None) -> Tensor:
    """Importance of each query head [n_heads]: q [H*D, hidden] rows, o [hidden, H*D] columns. With z_norm
    [H*D] (o_proj input norms): activation, sum of |o| * z_norm over the head's columns; else magnitude,
    sum of |W| over its q rows and o columns."""
    if z_norm is not None:
        per_col = _weighted(o, z_norm).sum(0)
    else:
        per_col = _weighted(q, None).sum(1) + _weighted(o, None).sum(0)
    return per_col.reshape(n_heads, -1).sum(1)


def keep_channels(scores: Tensor, drop: int) -> Tensor:
    """Sorted indices of the channels kept after dropping the `drop` lowest scores."""
    return prune_lowest(scores, drop, per_row=True).nonzero().flatten()


def keep_heads(scores: Tensor, n_kv: int, drop_per_group: int) -> Tensor:
    """Sorted query heads kept when each of the n_kv groups of consecutive heads drops its
    `drop_per_group` lowest."""
    groups = scores.reshape(n_kv, -1)
    if not 0 <= drop_per_group < groups.shape[1]:
        raise ValueError(f"each of the {n_kv} kv heads must keep >= 1 of its {groups.shape[1]} query heads")
    return prune_lowest(groups, drop_per_group, per_row=True).flatten().nonzero().flatten()


# --- surgery ------------------------------------------------------------------------------------
def _sliced(linear: nn.Linear, rows: Tensor | None = None, cols: Tensor | None = None) -> nn.Linear:
    w = linear.weight.detach()
    b = linear.bias.detach() if linear.bias is not None else None
    if rows is not None:
        w, b = w[rows], (b[rows] if b is not None else None)
    if cols is not None:
        w = w[:, cols]
    new = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device="meta", dtype=w.dtype)
    new.__class__ = type(linear)  # FastLinear stays FastLinear
    new.weight = nn.Parameter(w.clone(), requires_grad=linear.weight.requires_grad)
    if b is not None:
        new.bias = nn.Parameter(b.clone(), requires_grad=linear.bias.requires_grad)
    return new


def shrink_mlp_(mlp: GatedMLP, keep: Tensor) -> None:
    """Keep only the intermediate channels `keep` of a gated MLP."""
    mlp.gate_proj = _sliced(mlp.gate_proj, rows=keep)
    mlp.up_proj = _sliced(mlp.up_proj, rows=keep)
    mlp.down_proj = _sliced(mlp.down_proj, cols=keep)


def shrink_attention_(attn: Attention, heads: Tensor) -> None:
    """Keep only the query heads `heads` (sorted, the same number in every GQA group)."""
    if len(heads) % attn.n_kv:
        raise ValueError(f"{len(heads)} query heads cannot be shared by {attn.n_kv} kv heads")
    cols = (heads.reshape(-1, 1) * attn.head_dim + torch.arange(attn.head_dim)).flatten()
    attn.q_proj = _sliced(attn.q_proj, rows=cols)
    attn.o_proj = _sliced(attn.o_proj, cols=cols)
    attn.n_heads = len(heads)


# --- the handler --------------------------------------------------------------------------------
def _check_plain(name: str, module: nn.Module, subs: tuple[str, ...]) -> None:
    for sub in subs:
        if not isinstance(getattr(module, sub, None), nn.Linear):
            raise ConfigError(f"channels: {name}.{sub} is not a plain nn.Linear; prune channels before "
                              "quantizing or factorizing")


def _layer_targets(ctx: CompressContext) -> dict[int, dict[str, tuple[str, nn.Module, ChannelPruneConfig]]]:
    """{layer index: {"mlp" | "attn": (name, module, config)}} for the modules with something to remove."""
    out: dict[int, dict] = {}
    for kind, cls, key, subs in (("mlp", GatedMLP, "ffn_sparsity", ("gate_proj", "up_proj", "down_proj")),
                                 ("attn", Attention, "head_sparsity", ("q_proj", "o_proj"))):
        for name, module, cfg in ctx.targets((cls,)):
            parts = name.split(".")
            if getattr(cfg, key) > 0 and len(parts) > 2 and parts[2].isdigit():
                _check_plain(name, module, subs)
                out.setdefault(int(parts[2]), {})[kind] = (name, module, cfg)
    return out


def _prune_layer(targets: dict, norms: dict[str, Tensor], structure: dict) -> None:
    if "mlp" in targets:
        name, mlp, cfg = targets["mlp"]
        width = mlp.down_proj.in_features
        drop = min(round(cfg.ffn_sparsity * width), width - 1)
        scores = channel_scores(mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight,
                                norms.get("mlp.down_proj"))
        shrink_mlp_(mlp, keep_channels(scores, drop))
        structure[name] = {"intermediate_size": mlp.down_proj.in_features}
    if "attn" in targets:
        name, attn, cfg = targets["attn"]
        group = attn.n_heads // attn.n_kv
        drop = min(round(cfg.head_sparsity * group), group - 1)
        scores = head_scores(attn.q_proj.weight, attn.o_proj.weight, attn.n_heads, norms.get("self_attn.o_proj"))
        shrink_attention_(attn, keep_heads(scores, attn.n_kv, drop))
        structure[name] = {"n_heads": attn.n_heads, "n_kv": attn.n_kv}


@register(ChannelPruneConfig)
def apply_channel_prune(model: nn.Module, config: ChannelPruneConfig, ctx: CompressContext) -> dict:
    by_layer = _layer_targets(ctx)
    structure: dict[str, dict[str, int]] = {}
    before = sum(p.numel() for p in model.parameters())
    if config.criterion == "magnitude" or not by_layer:
        for i in ctx.bar(sorted(by_layer), "channels"):
            _prune_layer(by_layer[i], {}, structure)
    else:
        walk = LayerwiseCalibration(model, ctx.require_calibration(), include_head=False, batch_size=CALIB_BATCH)
        last = max(by_layer)
        for _, step in zip(ctx.bar(range(last + 1), "channels"), walk, strict=False):
            targets = by_layer.get(step.index, {})
            subs = (["mlp.down_proj"] if "mlp" in targets else []) + \
                   (["self_attn.o_proj"] if "attn" in targets else [])
            stats = InputStats(ColumnNorms)
            if subs:
                step.feed(stats.hooks(subs))
            stats.done()
            _prune_layer(targets, {s: stats[s].norms() for s in subs}, structure)
            if step.index >= last:
                break
    after = sum(p.numel() for p in model.parameters())
    return {"criterion": config.criterion, "parameters_removed": before - after, "structure": structure}
