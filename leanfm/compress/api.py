"""compress_(model, config_or_recipe): the one entry point of every compression method.

    from leanfm.compress import compress_, Recipe, GPTQConfig, WandaConfig
    compress_(model, GPTQConfig(bits=4, group_size=128), calibration=tokens)
    compress_(model, Recipe([Step(WandaConfig(sparsity=0.5)), Step(RTNConfig(bits=4, group_size=128))]),
              calibration=tokens)

A method is a frozen dataclass config (validated in __post_init__, round-trips through to_dict /
config_from_dict) plus a handler registered for it: `handler(model, config, ctx) -> dict` that edits the
model in place and returns a summary (what it changed) for the report. The handler asks the context
for its targets: the modules a step applies to after its include/exclude patterns, the caller's filter
and per-module overrides (a changed config, or skip). Calibration tokens are passed in by the caller
(the CLI draws them from the harness' calibration split; compress never reads data itself) and their
provenance rides along in the report.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from leanfm.utils.errors import LeanfmError

__all__ = [
    "CompressContext", "CompressReport", "MethodConfig", "Override", "Recipe", "Step", "compress_",
    "config_from_dict", "get_module", "method_names", "register", "set_module",
]


class ConfigError(LeanfmError, ValueError):
    """A compression config or recipe that cannot work (raised before any work starts)."""


@dataclass(frozen=True)
class MethodConfig:
    """Base of every method config. Subclasses set `method` and validate in __post_init__."""

    method: ClassVar[str] = ""
    needs_calibration: ClassVar[bool] = False
    needs_teacher: ClassVar[bool] = False  # distillation: compress_ keeps a copy of the uncompressed model
    # module-name patterns a step applies to when the recipe does not say (fnmatch, full names)
    default_include: ClassVar[tuple[str, ...]] = ("model.layers.*",)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **dataclasses.asdict(self)}

    def replace(self, **changes: Any) -> MethodConfig:
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ConfigError(f"{self.method}: unknown option(s) {sorted(unknown)}; "
                              f"valid: {sorted(f.name for f in dataclasses.fields(self))}")
        return dataclasses.replace(self, **changes)

    def _fail(self, message: str) -> None:
        raise ConfigError(f"{self.method}: {message}")

    def check_module(self, name: str, module: nn.Module) -> None:
        """Raise ConfigError if this config cannot apply to `module` (called for every target before
        any step runs). Default: anything goes."""


Handler = Callable[[nn.Module, MethodConfig, "CompressContext"], dict]
_REGISTRY: dict[str, tuple[type[MethodConfig], Handler]] = {}


def register(config_cls: type[MethodConfig]) -> Callable[[Handler], Handler]:
    """Decorator: `@register(GPTQConfig) def apply_gptq(model, config, ctx) -> dict`."""

    def deco(handler: Handler) -> Handler:
        _REGISTRY[config_cls.method] = (config_cls, handler)
        return handler

    return deco


def method_names() -> list[str]:
    _load_methods()
    return sorted(_REGISTRY)


def _load_methods() -> None:
    import leanfm.compress.methods  # noqa: F401  (registers every built-in method)


def config_from_dict(d: dict[str, Any]) -> MethodConfig:
    """A method config from {"method": name, **options}; ConfigError names what is wrong."""
    _load_methods()
    d = dict(d)
    name = d.pop("method", None)
    if name not in _REGISTRY:
        raise ConfigError(f"unknown compression method {name!r}; choose one of {', '.join(sorted(_REGISTRY))}")
    cls = _REGISTRY[name][0]
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise ConfigError(f"{name}: unknown option(s) {sorted(unknown)}; valid: {sorted(names)}")
    try:
        return cls(**d)
    except TypeError as e:
        raise ConfigError(f"{name}: {e}") from None


@dataclass(frozen=True)
class Override:
    """Per-module change inside a step: modules matching `pattern` get `changes` applied, or are skipped."""

    pattern: str
    changes: dict[str, Any] = field(default_factory=dict)
    skip: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"pattern": self.pattern, **({"skip": True} if self.skip else {}), **self.changes}


@dataclass(frozen=True)
class Step:
    """One method application: config, the modules it targets, and per-module overrides."""

    config: MethodConfig
    include: tuple[str, ...] | None = None  # None -> config.default_include
    exclude: tuple[str, ...] = ()
    overrides: tuple[Override, ...] = ()

    def __post_init__(self) -> None:
        for o in self.overrides:  # validate every override's config now, before any work
            if not o.skip:
                self.config.replace(**o.changes)

    def to_dict(self) -> dict[str, Any]:
        d = self.config.to_dict()
        if self.include is not None:
            d["include"] = list(self.include)
        if self.exclude:
            d["exclude"] = list(self.exclude)
        if self.overrides:
            d["overrides"] = [o.to_dict() for o in self.overrides]
        return d

    @staticmethod
    def from_dict(d: dict[str, Any]) -> Step:
        d = dict(d)
        include, exclude = d.pop("include", None), d.pop("exclude", ())
        overrides = []
        for o in d.pop("overrides", ()) or ():
            if not isinstance(o, dict) or "pattern" not in o:
                raise ConfigError(f"an override must be a mapping with a 'pattern', got {o!r}")
            o = dict(o)
            overrides.append(Override(str(o.pop("pattern")), skip=bool(o.pop("skip", False)), changes=o))
        as_tuple = (lambda v: (v,) if isinstance(v, str) else tuple(v))  # noqa: E731
        return Step(config_from_dict(d), None if include is None else as_tuple(include), as_tuple(exclude),
                    tuple(overrides))


@dataclass(frozen=True)
class Recipe:
    """An ordered list of steps, applied in order. Serialises to {"steps": [...]} (YAML or JSON)."""

    steps: tuple[Step, ...]

    def __init__(self, steps: Iterable[Step | MethodConfig]):
        object.__setattr__(self, "steps", tuple(s if isinstance(s, Step) else Step(s) for s in steps))
        if not self.steps:
            raise ConfigError("a recipe needs at least one step")

    def to_dict(self) -> dict[str, Any]:
        return {"steps": [s.to_dict() for s in self.steps]}

    @staticmethod
    def from_dict(d: dict[str, Any] | list) -> Recipe:
        steps = d if isinstance(d, list) else (d or {}).get("steps")
        if not isinstance(steps, list):
            raise ConfigError("a recipe is a list of steps, or a mapping with a 'steps' list")
        for s in steps:
            if not isinstance(s, dict):
                raise ConfigError(f"each recipe step is a mapping with a 'method', got {s!r}")
        return Recipe(Step.from_dict(s) for s in steps)

    @property
    def needs_calibration(self) -> bool:
        return any(s.config.needs_calibration for s in self.steps)


# --- module access ---------------------------------------------------------------------------------
def get_module(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name) if name else model


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule `name` (dotted) with `module`; keeps a tied embedding/head pair tied."""
    parent_name, _, child = name.rpartition(".")
    setattr(get_module(model, parent_name), child, module)
    retie = getattr(module, "retie", None)
    if name == "lm_head" and getattr(getattr(model, "config", None), "tie_word_embeddings", False) and retie:
        retie(model)


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


@dataclass
class CompressContext:
    """What a handler may use: its step's targets, the calibration tokens, a seed and progress bars."""

    model: nn.Module
    step: Step
    calibration: Tensor | None
    filter: Callable[[str, nn.Module], bool] | None = None
    seed: int = 0
    progress: bool = True
    teacher: nn.Module | None = None  # the model before any step ran (when a step needs_teacher)

    def config_for(self, name: str) -> MethodConfig | None:
        """The step's config for module `name` after overrides (last match wins), None if skipped."""
        config = self.step.config
        for o in self.step.overrides:
            if fnmatch.fnmatchcase(name, o.pattern):
                config = None if o.skip else self.step.config.replace(**o.changes)
        return config

    def selected(self, name: str, module: nn.Module) -> bool:
        include = self.step.include if self.step.include is not None else self.step.config.default_include
        return (_matches(name, include) and not _matches(name, self.step.exclude)
                and (self.filter is None or self.filter(name, module)))

    def targets(self, types: tuple[type[nn.Module], ...] = (nn.Linear,)) -> list[tuple[str, nn.Module, MethodConfig]]:
        """(name, module, config) for each module of `types` this step applies to, in model order."""
        out = []
        for name, module in self.model.named_modules():
            if isinstance(module, types) and self.selected(name, module):
                config = self.config_for(name)
                if config is not None:
                    out.append((name, module, config))
        return out

    def require_calibration(self) -> Tensor:
        if self.calibration is None:
            raise ConfigError(f"{self.step.config.method} needs calibration data; pass calibration tokens "
                              "(the CLI draws them from the harness' calibration split)")
        return self.calibration

    def bar(self, items: Sequence, desc: str):
        from tqdm import tqdm

        return tqdm(items, desc=desc, disable=not self.progress, leave=False, dynamic_ncols=True)


@dataclass
class CompressReport:
    """What compress_ did: the recipe, each step's summary and time, and the calibration provenance."""

    recipe: dict[str, Any]
    steps: list[dict[str, Any]] = field(default_factory=list)
    calibration: dict[str, Any] | None = None
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def compress_(
    model: nn.Module,
    config_or_recipe: MethodConfig | Step | Recipe,
    filter: Callable[[str, nn.Module], bool] | None = None,
    *,
    calibration: Tensor | None = None,
    calibration_info: dict[str, Any] | None = None,
    seed: int = 0,
    progress: bool = True,
    teacher: nn.Module | None = None,
) -> CompressReport:
    """Apply a method config or a recipe to `model` in place; returns the report.

    filter(name, module) -> bool narrows every step's targets further. calibration: int64 token ids
    (n_samples, seq_len) for methods that need activations. Deterministic for a given seed.
    teacher: the reference model for distillation steps; default: a copy of `model` taken before the
    first step (only made when a step needs it).
    """
    _load_methods()
    recipe = config_or_recipe if isinstance(config_or_recipe, Recipe) else Recipe([config_or_recipe])
    if recipe.needs_calibration and calibration is None:
        needing = [s.config.method for s in recipe.steps if s.config.needs_calibration]
        raise ConfigError(f"{', '.join(needing)} need(s) calibration data; pass calibration tokens "
                          "(n_samples, seq_len)")
    if calibration is not None and (calibration.dim() != 2 or calibration.dtype != torch.long):
        raise ConfigError(f"calibration must be int64 token ids (n_samples, seq_len), got "
                          f"{calibration.dtype} {tuple(calibration.shape)}")
    for step in recipe.steps:  # every target checked before any work starts
        for name, module, config in CompressContext(model, step, calibration, filter).targets():
            config.check_module(name, module)
    if teacher is None and any(s.config.needs_teacher for s in recipe.steps):
        import copy

        teacher = copy.deepcopy(model).eval().requires_grad_(False)
    report = CompressReport(recipe=recipe.to_dict(), calibration=calibration_info, seed=seed)
    was_training = model.training
    model.eval()
    for i, step in enumerate(recipe.steps):
        torch.manual_seed(seed + i)
        handler = _REGISTRY[step.config.method][1]
        ctx = CompressContext(model, step, calibration, filter, seed + i, progress, teacher)
        t0 = time.perf_counter()
        with torch.no_grad():
            summary = handler(model, step.config, ctx) or {}
        report.steps.append({"method": step.config.method, "seconds": round(time.perf_counter() - t0, 2),
                             **summary})
    model.train(was_training)
    return report
