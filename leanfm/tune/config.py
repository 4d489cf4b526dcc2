"""Adapter configs: frozen dataclasses that validate in __post_init__ and round-trip through JSON.

    LoraConfig(r=16, alpha=32, target_modules=("model.layers.*.self_attn.q_proj",))
    config_from_dict({"method": "lora", "r": 16}) == LoraConfig(r=16)

Every method subclasses AdapterConfig, sets `method` and registers itself with `@register_config`.
`target_modules` are fnmatch patterns over full module names (as in compress recipes), e.g.
"model.layers.*.mlp.*_proj"; None means the method's default targets.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

from leanfm.utils.errors import LeanfmError

__all__ = ["AdapterConfig", "AdapterError", "config_from_dict", "method_names", "register_config"]

ATTENTION = ("model.layers.*.self_attn.q_proj", "model.layers.*.self_attn.k_proj",
             "model.layers.*.self_attn.v_proj", "model.layers.*.self_attn.o_proj")
MLP = ("model.layers.*.mlp.gate_proj", "model.layers.*.mlp.up_proj", "model.layers.*.mlp.down_proj")
ALL_LINEARS = ATTENTION + MLP


class AdapterError(LeanfmError, ValueError):
    """An adapter config, target or file that cannot work (raised before anything changes)."""


_CONFIGS: dict[str, type[AdapterConfig]] = {}


def register_config(cls: type[AdapterConfig]) -> type[AdapterConfig]:
    """Class decorator: make `cls` known to config_from_dict under cls.method."""
    if cls.method in _CONFIGS and _CONFIGS[cls.method] is not cls:
        raise ValueError(f"adapter method {cls.method!r} is registered twice")
    _CONFIGS[cls.method] = cls
    return cls


def _load_methods() -> None:
    import leanfm.tune.methods  # noqa: F401  (registers every built-in method)


def method_names() -> list[str]:
    _load_methods()
    return sorted(_CONFIGS)


def config_class(method: str) -> type[AdapterConfig]:
    _load_methods()
    if method not in _CONFIGS:
        raise AdapterError(f"unknown adapter method {method!r}; choose one of {', '.join(sorted(_CONFIGS))}")
    return _CONFIGS[method]


def config_from_dict(d: dict[str, Any]) -> AdapterConfig:
    """A config from {"method": name, **options}; AdapterError names what is wrong."""
    d = dict(d)
    cls = config_class(d.pop("method", None))
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise AdapterError(f"{cls.method}: unknown option(s) {sorted(unknown)}; valid: {sorted(names)}")
    try:
        return cls(**d)
    except TypeError as e:
        raise AdapterError(f"{cls.method}: {e}") from None


@dataclass(frozen=True)
class AdapterConfig:
    """Base of every adapter config. `level` says where the method lives: "module" methods attach a
    branch to each targeted linear layer; "model" methods (prompt, prefix) act on the whole model."""

    method: ClassVar[str] = ""
    level: ClassVar[str] = "module"
    mergeable: ClassVar[bool] = True  # can fold into the base weights (merge_)
    identity_at_init: ClassVar[bool] = True  # outputs unchanged before training
    default_targets: ClassVar[tuple[str, ...]] = ATTENTION
    pattern_fields: ClassVar[tuple[str, ...]] = ("target_modules", "exclude_modules")  # str/list -> tuple

    target_modules: tuple[str, ...] | None = None
    exclude_modules: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for key in self.pattern_fields:
            value = getattr(self, key)
            if isinstance(value, str):
                value = (value,)
            if value is not None:
                value = tuple(value)
                if not all(isinstance(p, str) and p for p in value):
                    self._fail(f"{key} must be non-empty name patterns, got {value!r}")
                object.__setattr__(self, key, value)
        if self.target_modules == ():
            self._fail("target_modules is empty; give name patterns or leave it unset for the defaults")
        self.validate()

    def validate(self) -> None:
        """Method-specific checks (subclasses); raise via self._fail."""

    @property
    def targets(self) -> tuple[str, ...]:
        return self.target_modules if self.target_modules is not None else self.default_targets

    def _fail(self, message: str) -> None:
        raise AdapterError(f"{self.method}: {message}")

    def _positive(self, **values: float) -> None:
        for key, value in values.items():
            if not value > 0:
                self._fail(f"{key} must be > 0, got {value}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for key, value in d.items():
            if isinstance(value, tuple):
                d[key] = list(value)
        return {"method": self.method, **d}

    def replace(self, **changes: Any) -> AdapterConfig:
        return dataclasses.replace(self, **changes)
