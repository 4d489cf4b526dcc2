"""The engine's LoRA adapter registry: several adapters over one base model, loaded and unloaded at run time.

    core.load_adapter("sql", "out/lora-sql")             # EngineCore / LLM / AsyncLLM
    core.add_request(prompt, params, adapter="sql")      # this request's rows get the sql adapter's delta
    core.unload_adapter("sql")                           # refused while a request uses it

Each load gets a new integer id (never reused on that model): requests and the runner's per-step row groups carry the
id, the model's host layers key their factors by it (leanfm.models.multi_lora), and the prefix cache
seeds a request's block-hash chain with "<name>#<id>", so KV computed under one adapter is never served
to a request for another one, nor for the same name loaded again from other weights.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from leanfm.checkpoint.lora_adapter import read_lora_adapter
from leanfm.models.multi_lora import install_lora, lora_state, remove_lora
from leanfm.utils.errors import LeanfmError

__all__ = ["AdapterInfo", "LoraRegistry", "check_adapter_name"]

_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:/\-]{0,127}$")


def check_adapter_name(name: str) -> None:
    if not isinstance(name, str) or not _NAME.match(name):
        raise LeanfmError(f"adapter name {name!r} must be 1-128 letters, digits or _ . : / - (not starting "
                          "with a punctuation mark)")


@dataclass(frozen=True)
class AdapterInfo:
    name: str
    lora_id: int
    path: str
    r: int
    scaling: float
    num_layers: int  # linear layers it targets

    @property
    def cache_salt(self) -> str:
        return f"{self.name}#{self.lora_id}"


class LoraRegistry:
    """name -> AdapterInfo of the adapters installed on `model`. Mutated by the engine's thread only; the
    mapping is replaced (not changed in place) on every load / unload, so other threads may read it."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.adapters: dict[str, AdapterInfo] = {}

    def load(self, name: str, path: str) -> AdapterInfo:
        """Read, check and install the adapter at `path` under `name`; nothing changes when it fails."""
        check_adapter_name(name)
        if name in self.adapters:
            raise LeanfmError(f"an adapter named {name!r} is already loaded; unload it first or choose another name")
        adapter = read_lora_adapter(path)
        factors = adapter.factors_for(self.model)
        lora_id = lora_state(self.model).new_id()  # unique per model, even across engines sharing it
        install_lora(self.model, lora_id, factors)
        info = AdapterInfo(name, lora_id, str(adapter.path), adapter.r, adapter.scaling, len(factors))
        self.adapters = {**self.adapters, name: info}
        return info

    def unload(self, name: str) -> AdapterInfo:
        info = self.get(name)
        remove_lora(self.model, info.lora_id)
        self.adapters = {k: v for k, v in self.adapters.items() if k != name}
        return info

    def get(self, name: str) -> AdapterInfo:
        info = self.adapters.get(name)
        if info is None:
            loaded = ", ".join(sorted(self.adapters)) or "none"
            raise LeanfmError(f"no adapter named {name!r} is loaded (loaded: {loaded}); load_adapter it first")
        return info

    def has_id(self, lora_id: int) -> bool:
        return any(info.lora_id == lora_id for info in self.adapters.values())
