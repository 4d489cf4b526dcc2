"""The adapters API: one entry point per operation, any method.

    names = add_adapter(model, LoraConfig(r=16))          # -> the module names it targets
    add_adapter(model, IA3Config(), name="ia3")           # several named adapters on one model
    set_adapter(model, "default")                         # one active adapter (None: the base model)
    merge_(model); unmerge_(model)                        # fold the active adapter in / out of the weights
    state = adapter_state_dict(model)                     # the active adapter's tensors, leanfm names
    load_adapter_state_dict(model, state)
    delete_adapter(model, "ia3")

Only the active adapter's parameters require grad; the base is frozen. Targets are fnmatch patterns over
full module names; each pattern must match at least one linear layer, or nothing changes and an
AdapterError says what the layers are called.
"""

from __future__ import annotations

import fnmatch
import re
from typing import Any

import torch
from torch import Tensor, nn

from leanfm.models.quant_layers import QuantLinear
from leanfm.tune import layers as L
from leanfm.tune.config import AdapterConfig, AdapterError
from leanfm.tune.prompt import VirtualTokenHost, attach_virtual, detach_virtual
from leanfm.tune.qlora import make_trainable_quant

__all__ = [
    "active_adapter", "adapter_configs", "adapter_parameters", "adapter_state_dict", "add_adapter",
    "delete_adapter", "find_targets", "load_adapter_state_dict", "merge_", "merge_and_unload_",
    "set_adapter", "trainable_parameters", "unmerge_",
]

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*$")
_LINEAR_TYPES = (nn.Linear, QuantLinear)


def adapter_configs(model: nn.Module) -> dict[str, AdapterConfig]:
    """name -> config of every adapter on the model (insertion order)."""
    return model.__dict__.setdefault("adapter_configs", {})


def active_adapter(model: nn.Module) -> str | None:
    return model.__dict__.get("active_adapter_name")


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def find_targets(model: nn.Module, config: AdapterConfig) -> list[str]:
    """Names of the linear layers `config` targets; AdapterError when a pattern matches no linear layer."""
    linears = [n for n, m in model.named_modules() if isinstance(m, _LINEAR_TYPES)]
    everything = [n for n, _ in model.named_modules() if n]
    for pattern in config.targets:
        if any(fnmatch.fnmatchcase(n, pattern) for n in linears):
            continue
        other = [n for n in everything if fnmatch.fnmatchcase(n, pattern)]
        if other:
            kind = type(model.get_submodule(other[0])).__name__
            raise AdapterError(f"{config.method}: target pattern {pattern!r} matches no linear layer, only e.g. "
                               f"{other[0]!r} ({kind}); target linear layers such as {linears[0]!r}")
        raise AdapterError(f"{config.method}: target pattern {pattern!r} matches no module; linear layers are "
                           f"named like {linears[0]!r} (fnmatch patterns over full names, e.g. "
                           "'model.layers.*.self_attn.q_proj')")
    names = [n for n in linears if _matches(n, config.targets) and not _matches(n, config.exclude_modules)]
    if not names:
        raise AdapterError(f"{config.method}: exclude_modules {list(config.exclude_modules)} removes every target")
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    if tied and "lm_head" in names:
        raise AdapterError(f"{config.method}: lm_head shares its weight with the input embedding (tied "
                           "embeddings); leave it out of target_modules")
    return names


def _check_name(model: nn.Module, name: str) -> None:
    if not isinstance(name, str) or not _NAME.match(name):
        raise AdapterError(f"adapter name {name!r} must start with a letter or _ and hold only letters, "
                           "digits, _ and -")
    if name in adapter_configs(model):
        raise AdapterError(f"the model already has an adapter named {name!r}; choose another name or "
                           "delete_adapter() it first")


def add_adapter(model: nn.Module, config: AdapterConfig, name: str = "default", *, activate: bool = True,
                seed: int = 0) -> list[str]:
    """Add adapter `name` described by `config` to `model` in place; returns the targeted module names
    ([] for whole-model methods). Everything is checked before the model changes."""
    if not isinstance(config, AdapterConfig):
        raise AdapterError(f"add_adapter takes an adapter config (e.g. LoraConfig(r=16)), got {type(config).__name__}")
    _check_name(model, name)
    if _merged(model) is not None:
        raise AdapterError(f"adapter {_merged(model)!r} is merged; unmerge_(model) before adding another")
    names = [] if config.level == "model" else find_targets(model, config)
    if getattr(config, "init", None) == "pissa":
        _check_pissa(model, names, config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if hasattr(config, "prepare"):
            config.prepare(model)
        make_trainable_quant(model)
        if config.level == "model":
            gen = torch.Generator().manual_seed(seed)
            attach_virtual(model, name, config.make_encoder(model, gen).to(_device(model)))
        else:
            for target in names:
                layer = model.get_submodule(target)
                L.attach(layer, name, config.make_branch(target, layer).to(_device(layer)))
    adapter_configs(model)[name] = config
    if activate or active_adapter(model) is None:
        set_adapter(model, name)
    else:
        set_adapter(model, active_adapter(model))
    return names


def _device(module: nn.Module) -> torch.device:
    """Where a module's tensors live (adapters are made there; they stay fp32 whatever the base dtype)."""
    t = next(iter([*module.parameters(), *module.buffers()]), None)
    return t.device if t is not None else torch.device("cpu")


def _check_pissa(model: nn.Module, names: list[str], config: AdapterConfig) -> None:
    for target in names:
        layer = model.get_submodule(target)
        if isinstance(layer, QuantLinear):
            raise AdapterError(f"{config.method}: init='pissa' rewrites {target}'s weight, which is quantized; "
                               "use init='default'")
        if isinstance(layer, L.AdapterHost) and len(layer.adapters):
            raise AdapterError(f"{config.method}: init='pissa' rewrites {target}'s weight, which other adapters "
                               f"({', '.join(layer.adapters)}) also use; give PiSSA its own model")


def _hosts(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (L.AdapterHost, VirtualTokenHost))]


def _merged(model: nn.Module) -> str | None:
    return next((m.merged_adapter for m in model.modules()
                 if isinstance(m, L.AdapterHost) and m.merged_adapter is not None), None)


def set_adapter(model: nn.Module, name: str | None) -> None:
    """Make `name` the active adapter (None: run the base model). Only its parameters require grad."""
    if name is not None and name not in adapter_configs(model):
        raise AdapterError(f"no adapter named {name!r}; the model has {sorted(adapter_configs(model)) or 'none'}")
    merged = _merged(model)
    if merged is not None and merged != name:
        raise AdapterError(f"adapter {merged!r} is merged into the weights; unmerge_(model) before switching")
    for host in _hosts(model):
        host.active_adapter = name
    model.__dict__["active_adapter_name"] = name
    model.requires_grad_(False)
    for _, p in adapter_parameters(model, name):
        p.requires_grad_(True)


def adapter_parameters(model: nn.Module, name: str | None = None) -> list[tuple[str, nn.Parameter]]:
    """(full name, parameter) of adapter `name` (default: the active one)."""
    name = active_adapter(model) if name is None else name
    if name is None:
        return []
    marks = (f".adapters.{name}.", f"virtual_tokens.{name}.")
    return [(n, p) for n, p in model.named_parameters() if any(m in n or n.startswith(m) for m in marks)]


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def adapter_state_dict(model: nn.Module, name: str | None = None) -> dict[str, Tensor]:
    """The adapter's tensors by full leanfm name (e.g. 'model.layers.0.self_attn.q_proj.adapters.default.lora_A.weight')."""
    return {n: p.detach() for n, p in adapter_parameters(model, name)}


def load_adapter_state_dict(model: nn.Module, state: dict[str, Tensor], name: str | None = None) -> None:
    """Copy `state` (as adapter_state_dict returns it) into adapter `name`; every tensor must match."""
    own = dict(adapter_parameters(model, name))
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise AdapterError(f"adapter tensors do not match the model's adapter: missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]}; was it made with another config or base model?")
    for key, p in own.items():
        if tuple(state[key].shape) != tuple(p.shape):
            raise AdapterError(f"{key}: shape {tuple(state[key].shape)} != {tuple(p.shape)} in this model; the "
                               "adapter was made for another base model or rank")
    with torch.no_grad():
        for key, p in own.items():
            p.copy_(state[key])


def _branches(model: nn.Module, name: str) -> list[tuple[nn.Module, L.Branch]]:
    return [(m, m.adapters[name]) for m in model.modules() if isinstance(m, L.AdapterHost) and name in m.adapters]


def merge_(model: nn.Module) -> str:
    """Fold the active adapter into the base weights (forward then runs the plain layers). Returns its name."""
    name = active_adapter(model)
    if name is None:
        raise AdapterError("no active adapter to merge; set_adapter(model, name) first")
    if _merged(model) is not None:
        raise AdapterError(f"adapter {_merged(model)!r} is already merged")
    config = adapter_configs(model)[name]
    pairs = _branches(model, name)
    if not config.mergeable or not pairs or any(isinstance(m, QuantLinear) for m, _ in pairs):
        raise AdapterError(f"adapter {name!r} ({config.method}) cannot be merged into the base weights"
                           + (" (its base layers are quantized)" if config.mergeable else "")
                           + "; run it unmerged")
    for layer, branch in pairs:
        branch.merge(layer)
        layer.merged_adapter = name
    return name


def unmerge_(model: nn.Module) -> None:
    """Undo merge_: the base weights are restored (up to float rounding)."""
    name = _merged(model)
    if name is None:
        raise AdapterError("no adapter is merged")
    for layer, branch in _branches(model, name):
        branch.unmerge(layer)
        layer.merged_adapter = None


def delete_adapter(model: nn.Module, name: str, *, restore_base: bool = True) -> None:
    """Remove adapter `name` (unmerged first if merged); the layers it alone used get their class back.
    restore_base=False keeps the base weights as they are (merged weights, PiSSA residuals)."""
    if name not in adapter_configs(model):
        raise AdapterError(f"no adapter named {name!r}; the model has {sorted(adapter_configs(model)) or 'none'}")
    for layer, _ in _branches(model, name):
        L.detach(layer, name, restore_base)
    if isinstance(model, VirtualTokenHost) and name in model.virtual_tokens:
        detach_virtual(model, name)
    del adapter_configs(model)[name]
    if active_adapter(model) == name:
        model.__dict__["active_adapter_name"] = None


def merge_and_unload_(model: nn.Module) -> dict[str, Any]:
    """Merge the active adapter, then drop every adapter: a plain model with the merged weights."""
    name = merge_(model)
    for layer, _ in _branches(model, name):
        layer.merged_adapter = None  # keep the merged weights: forget the adapter without unmerging
    delete_adapter(model, name, restore_base=False)
    for other in list(adapter_configs(model)):
        delete_adapter(model, other)
    return {"merged": name}
