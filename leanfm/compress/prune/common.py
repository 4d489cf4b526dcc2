"""What the unstructured / N:M pruners share: the config base, the layer-wise calibration driver,
input statistics, and the summary (mask counts, optional packing into SparseLinear).

Pruned weights stay dense nn.Linear modules with zeros; `pack=True` (N:M patterns only) then stores
them compressed as SparseLinear (leanfm.models.sparse_layers).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn

from leanfm.compress.api import CompressContext, ConfigError, MethodConfig
from leanfm.compress.calibrate import CalibrationStep, LayerwiseCalibration
from leanfm.models.sparse_layers import pack_nm_
from leanfm.ops.sparsity import nm_mask, parse_pattern, unstructured_mask

__all__ = ["CALIB_BATCH", "ColumnNorms", "Hessian", "InputStats", "PruneConfig", "PruneTally", "calibrated_layers",
           "layer_of"]


@dataclass(frozen=True)
class PruneConfig(MethodConfig):
    """sparsity: fraction of weights set to zero, in [0, 1) (unstructured). pattern: "unstructured" or
    "N:M" (keep N of every M consecutive input weights, e.g. "2:4", "4:8"; the sparsity is then 1 - N/M
    and `sparsity` is not used). pack: store N:M-pruned layers compressed as SparseLinear."""

    sparsity: float = 0.5
    pattern: str = "unstructured"
    pack: bool = False

    def __post_init__(self) -> None:
        s = self.sparsity
        if isinstance(s, bool) or not isinstance(s, int | float) or not 0.0 <= s < 1.0:
            self._fail(f"sparsity must be a number in [0, 1) (the fraction of weights set to zero), got {s!r}")
        try:
            nm = parse_pattern(self.pattern)
        except ValueError as e:
            self._fail(str(e))
        if self.pack and nm is None:
            self._fail("pack=true stores N:M-sparse weights compressed; use an N:M pattern (e.g. '2:4') "
                       "or pack=false")

    @property
    def nm(self) -> tuple[int, int] | None:
        return parse_pattern(self.pattern)

    @property
    def effective_sparsity(self) -> float:
        nm = self.nm
        return self.sparsity if nm is None else 1.0 - nm[0] / nm[1]

    def check_module(self, name: str, module: nn.Module) -> None:
        nm = self.nm
        k = module.weight.shape[1]
        if nm is not None and k % nm[1]:
            self._fail(f"pattern {self.pattern} needs M={nm[1]} to divide {name}'s input width {k}; choose "
                       f"another M or add an override skipping {name!r}")

    def keep_mask(self, scores: Tensor, per_row: bool) -> Tensor:
        """Keep-mask of this config's pattern from importance scores (higher = more important)."""
        nm = self.nm
        if nm is not None:
            return nm_mask(scores, *nm)
        return unstructured_mask(scores, self.sparsity, per_row)


class PruneTally:
    """Mask counts per module, and the summary a handler returns."""

    def __init__(self) -> None:
        self.masks: dict[str, list[int]] = {}  # name -> [pruned, numel]
        self.patterns: dict[str, tuple[int, int]] = {}

    def add(self, name: str, keep: Tensor, config: PruneConfig) -> None:
        self.masks[name] = [int(keep.numel() - keep.count_nonzero()), keep.numel()]
        if config.pack:
            self.patterns[name] = config.nm

    def summary(self, model: nn.Module, config: PruneConfig) -> dict:
        pruned = sum(p for p, _ in self.masks.values())
        numel = sum(n for _, n in self.masks.values())
        packed = 0
        for nm in set(self.patterns.values()):
            names = [name for name, p in self.patterns.items() if p == nm]
            packed += pack_nm_(model, *nm, names=names)
        return {"modules": len(self.masks), "pattern": config.pattern, "pruned_weights": pruned,
                "sparsity": round(pruned / max(numel, 1), 6), "packed": packed, "masks": self.masks}


def apply_mask_(module: nn.Linear, keep: Tensor) -> None:
    module.weight.data.mul_(keep.to(module.weight.dtype))


# --- input statistics ---------------------------------------------------------------------------
class Accumulator(Protocol):
    def add(self, x: Tensor) -> None: ...


class ColumnNorms:
    """Squared L2 norm of each input feature over all tokens: ||X_j||^2 (Wanda)."""

    def __init__(self, k: int):
        self.sumsq = torch.zeros(k, dtype=torch.float64)

    def add(self, x: Tensor) -> None:
        self.sumsq += x.double().pow(2).sum(0)

    def norms(self) -> Tensor:
        return self.sumsq.sqrt().float()


class Hessian:
    """H = X^T X / tokens of the inputs (SparseGPT / OBS)."""

    def __init__(self, k: int):
        self.h = torch.zeros(k, k)
        self.tokens = 0

    def add(self, x: Tensor) -> None:
        x = x.float()
        self.h.addmm_(x.T, x)
        self.tokens += x.shape[0]

    def mean(self) -> Tensor:
        return self.h / max(self.tokens, 1)


class InputStats:
    """One accumulator per hooked module; modules fed the very same tensor (q/k/v, gate/up) share one,
    so it is computed once. The last input is held, so a new tensor cannot reuse its address."""

    def __init__(self, make: Callable[[int], Accumulator]):
        self.make = make
        self.accs: dict[str, Accumulator] = {}
        self._last: tuple[Tensor, Accumulator] | None = None

    def _hook(self, name: str) -> Callable[[Tensor], None]:
        def fn(x: Tensor) -> None:
            last = self._last
            same = last is not None and last[0].data_ptr() == x.data_ptr() and last[0].shape == x.shape
            if name not in self.accs:
                self.accs[name] = last[1] if same else self.make(x.shape[1])
            acc = self.accs[name]
            if not (same and last[1] is acc):
                acc.add(x)
            self._last = (x, acc)

        return fn

    def hooks(self, names: list[str]) -> dict[str, Callable[[Tensor], None]]:
        return {n: self._hook(n) for n in names}

    def done(self) -> None:
        self._last = None

    def __getitem__(self, name: str) -> Accumulator:
        return self.accs[name]


# --- the layer-wise driver ----------------------------------------------------------------------
CALIB_BATCH = 4  # calibration samples per layer forward (larger GEMMs; hidden states are small)
Target = tuple[str, str, nn.Module, MethodConfig]  # (name inside the step, full name, module, config)


def layer_of(name: str, n_layers: int = -1) -> int:
    """Decoder layer index of a full module name, n_layers for "lm_head"; ConfigError for other modules
    (calibration walks the decoder layers and the head only)."""
    parts = name.split(".")
    if name == "lm_head":
        return n_layers
    if len(parts) > 3 and parts[:2] == ["model", "layers"] and parts[2].isdigit():
        return int(parts[2])
    raise ConfigError(f"{name}: calibrated pruning reaches the decoder layers' linears and lm_head only; "
                      "exclude this module")


def calibrated_layers(model: nn.Module, ctx: CompressContext, desc: str
                      ) -> Iterator[tuple[CalibrationStep, list[Target]]]:
    """Walk the model layer by layer on the calibration tokens (LayerwiseCalibration) and yield each step
    with its targets. Stops after the last layer that has targets."""
    tokens = ctx.require_calibration()
    n_layers = len(model.model.layers)
    by_layer: dict[int, list[tuple[str, nn.Module, MethodConfig]]] = {}
    for name, module, cfg in ctx.targets():
        by_layer.setdefault(layer_of(name, n_layers), []).append((name, module, cfg))
    if not by_layer:
        return
    last = max(by_layer)
    walk = LayerwiseCalibration(model, tokens, include_head=n_layers in by_layer, batch_size=CALIB_BATCH)
    for _, step in zip(ctx.bar(range(last + 1), desc), walk, strict=False):
        targets = [(name[len(step.prefix) + 1:] if step.prefix else name, name, module, cfg)
                   for name, module, cfg in by_layer.get(step.index, [])]
        yield step, targets
        if step.index >= last:
            return
