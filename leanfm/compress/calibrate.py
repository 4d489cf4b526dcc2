"""Layer-by-layer calibration: run calibration tokens through the model one decoder layer at a time.

GPTQ, AWQ, SmoothQuant, Wanda and SparseGPT all need, for each linear layer, statistics of the inputs
it sees (a Hessian X^T X, per-channel norms or maxima). Holding every layer's activations at once
would not fit; so, as in the GPTQ paper, the hidden states of all samples are kept for one layer
boundary only. For each layer the caller collects statistics with hooks (`feed`), changes the layer,
and the walk then recomputes the layer's outputs *with the changed layer*, so later layers calibrate
on the inputs they will really see.

    walk = LayerwiseCalibration(model, tokens)
    for step in walk:                       # one step per decoder layer, then one for the LM head
        stats = {}
        step.feed({"mlp.down_proj": lambda x: ...})   # x: (tokens, in_features) inputs of that module
        ... edit step.module ...
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from leanfm.ops.rope import rope_cos_sin

__all__ = ["CalibrationStep", "LayerwiseCalibration", "capture_inputs"]

InputHook = Callable[[Tensor], None]


class _StopForward(Exception):
    pass


def capture_inputs(module: nn.Module, hooks: dict[str, InputHook], run: Callable[[], object],
                   stop_after: str | None = None) -> None:
    """Call run() with forward-pre-hooks that pass each named submodule's input, flattened to
    (tokens, features), to its hook. stop_after: abort the forward once that submodule has been seen."""
    handles = []
    for name, fn in hooks.items():
        sub = module.get_submodule(name) if name else module

        def pre(_m, args, fn=fn, name=name):
            x = args[0]
            fn(x.reshape(-1, x.shape[-1]))
            if name == stop_after:
                raise _StopForward

        handles.append(sub.register_forward_pre_hook(pre))
    try:
        run()
    except _StopForward:
        pass
    finally:
        for h in handles:
            h.remove()


@dataclass
class CalibrationStep:
    """One stop of the walk: `prefix` is the full name of `module` ("model.layers.3", or "" for the LM
    head step, whose module is the whole model and whose only hookable name is "lm_head")."""

    index: int
    prefix: str
    module: nn.Module
    _walk: LayerwiseCalibration

    @property
    def is_head(self) -> bool:
        return self.prefix == ""

    def feed(self, hooks: dict[str, InputHook]) -> None:
        """Run every calibration sample through this step's module, calling hooks on sub-module inputs."""
        self._walk._feed(self, hooks)

    def outputs(self) -> list[Tensor]:
        """This layer's outputs per sample with the module as it is now (does not advance the walk)."""
        return [self._walk._run_layer(self.index, h) for h in self._walk.hidden]

    @property
    def inputs(self) -> list[Tensor]:
        """The hidden states entering this step, one (1, T, hidden) tensor per sample."""
        return self._walk.hidden


class LayerwiseCalibration:
    """Iterate a decoder model layer by layer on calibration tokens (see the module docstring)."""

    def __init__(self, model: nn.Module, tokens: Tensor, include_head: bool = True, batch_size: int = 1):
        self.model, self.include_head = model, include_head
        layers = model.model.layers
        self.n_layers = len(layers)
        dtype = next(model.parameters()).dtype
        with torch.no_grad():
            self.batches = list(tokens.split(batch_size))
            self.hidden = [model.embed(b) for b in self.batches]
        t = tokens.shape[1]
        self.positions = torch.arange(t).unsqueeze(0)
        self._rope = {key: rope_cos_sin(self.positions, f, dtype) for key, f in model._inv_freq.items()}

    def _run_layer(self, i: int, h: Tensor) -> Tensor:
        cos, sin = self._rope[self.model._layer_rope[i]]
        b = h.shape[0]
        return self.model.model.layers[i](h, cos.expand(b, -1, -1), sin.expand(b, -1, -1),
                                          self.positions.expand(b, -1), None)

    def _feed(self, step: CalibrationStep, hooks: dict[str, InputHook]) -> None:
        with torch.no_grad():
            for h in self.hidden:
                if step.is_head:
                    normed = self.model.model.norm(h)
                    for name, fn in hooks.items():
                        if name != "lm_head":
                            raise KeyError(f"the head step only feeds 'lm_head', not {name!r}")
                        fn(normed.reshape(-1, normed.shape[-1]))
                else:
                    capture_inputs(step.module, hooks, lambda h=h: self._run_layer(step.index, h))

    def __iter__(self) -> Iterator[CalibrationStep]:
        for i in range(self.n_layers):
            yield CalibrationStep(i, f"model.layers.{i}", self.model.model.layers[i], self)
            with torch.no_grad():  # advance with the layer as the caller left it
                self.hidden = [self._run_layer(i, h) for h in self.hidden]
        if self.include_head:
            yield CalibrationStep(self.n_layers, "", self.model, self)
