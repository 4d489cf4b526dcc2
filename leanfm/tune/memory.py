"""Predict a fine-tuning run's peak memory before it starts, and measure the real peak.

    plan = plan_memory(model_config, LoraConfig(r=16), TrainConfig(batch_size=4), seq_len=256)
    print(plan.table())            # weights, gradients, optimizer states, activations, loss, runtime
    peak_rss_bytes()               # the measured peak (VmHWM) to put next to plan.total

What is counted:
- weights: every base tensor at its stored size (packed codes + scales for a quantized base; a tied
  embedding/head once). Gemma 3 270M's 262k x 640 embedding is 168M of its 268M parameters.
- load transient: a base quantized at load time is float in full first.
- adapter parameters, their gradients (fp32) and optimizer states (AdamW 8 B/param; 8-bit AdamW
  2 B/param + 8 B per block of 256; SGD and MeZO none).
- activations: the bytes autograd saves per decoder layer, measured by running one layer of this very
  architecture (random weights, same adapter) on two probe lengths under saved_tensors_hooks and fitting
  a + b T + c T^2 per sequence; times the layers (all of them, or with gradient checkpointing only the
  layer inputs plus one layer recomputed), plus one layer's worth of gradients in flight.
- loss: the fused LM-head loss' (tokens x chunk) blocks, never the full logits.
- runtime: the interpreter, torch and libraries: this process' RSS when planning (call it before loading
  the model), unless given.
The trainer's process is expected to call limit_heap_retention() first (the CLI and benchmark do).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import nn

from leanfm.models import ModelConfig, build_model
from leanfm.tune import api
from leanfm.tune.config import AdapterConfig
from leanfm.utils.rss import reset_peak_rss  # noqa: F401  (re-exported)

__all__ = ["MemoryPlan", "current_rss_bytes", "limit_heap_retention", "peak_rss_bytes", "plan_memory",
           "reset_peak_rss"]

MB = 1 << 20


def _status_bytes(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (VmHWM; ru_maxrss where /proc is missing)."""
    hwm = _status_bytes("VmHWM")
    if hwm is None:
        import resource

        hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return hwm


def current_rss_bytes() -> int:
    return _status_bytes("VmRSS") or peak_rss_bytes()


def limit_heap_retention(threshold: int = 256 << 10) -> bool:
    """Serve allocations above `threshold` bytes from mmap, returned to the OS when freed (glibc mallopt
    M_MMAP_THRESHOLD; also stops glibc raising that threshold as big blocks are freed). Without it the
    heap keeps the activation blocks of a training step resident after they are freed: +30-50% peak RSS
    measured here. The planner assumes it. Returns False where glibc is not available."""
    try:
        import ctypes

        return bool(ctypes.CDLL("libc.so.6").mallopt(-3, threshold))  # M_MMAP_THRESHOLD = -3
    except (OSError, AttributeError):
        return False




@dataclass(frozen=True)
class MemoryPlan:
    weights: int
    load_transient: int  # extra bytes while loading (a float base before quantization)
    trainable_params: int
    adapter: int
    gradients: int
    optimizer: int
    activations: int
    loss: int
    runtime: int

    @property
    def training(self) -> int:
        return self.weights + self.adapter + self.gradients + self.optimizer + self.activations + self.loss

    @property
    def total(self) -> int:
        """Predicted peak RSS: runtime + the larger of the training working set and the load transient."""
        return self.runtime + max(self.training, self.weights + self.load_transient)

    def table(self) -> str:
        rows = [("base weights", self.weights), ("adapter parameters", self.adapter), ("gradients", self.gradients),
                ("optimizer states", self.optimizer), ("activations", self.activations), ("loss buffers", self.loss),
                ("runtime (python, torch)", self.runtime), ("load transient (not at once)", self.load_transient)]
        lines = [f"  {k:<30} {v / MB:9.1f} MB" for k, v in rows]
        return "\n".join(["predicted peak memory:", *lines, f"  {'total (peak)':<30} {self.total / MB:9.1f} MB"])


def _weight_bytes(model: nn.Module) -> int:
    """Stored bytes of a (meta or real) model's parameters and buffers, shared tensors once."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        key = id(t) if t.is_meta else t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def _base_bytes(config: ModelConfig, adapter: AdapterConfig, dtype: torch.dtype, quantized: bool) -> tuple[int, int]:
    """(resident base bytes during training, float base bytes) from the config alone."""
    meta = build_model(config, dtype=dtype, device="meta")
    float_bytes = _weight_bytes(meta)
    if not hasattr(adapter, "quantize_modules") or not quantized:
        return float_bytes, float_bytes
    total, bits = float_bytes, adapter.bits
    gs = adapter.group_size or config.hidden_size
    itemsize = torch.finfo(dtype).bits // 8
    for name, m in meta.named_modules():
        if isinstance(m, nn.Linear) and name != "lm_head" and api._matches(name, adapter.quantize_modules):
            n, k = m.weight.shape
            total += n * k * bits // 8 + 2 * 4 * n * (k // min(gs, k)) - n * k * itemsize
    if adapter.head_bits:
        v, h = config.vocab_size, config.hidden_size
        untied = 0 if config.tie_word_embeddings else v * h * itemsize
        total += v * h * adapter.head_bits // 8 + 2 * 4 * v * (h // min(gs, h)) - v * h * itemsize - untied
    return total, float_bytes


def _saved_in_layer(model: nn.Module, t: int, params: set[int], grad_needed: bool) -> int:
    """Bytes of the distinct non-parameter storages autograd saves inside layer 0 for one sequence of t."""
    seen: dict[int, int] = {}
    inside = [False]

    def pack(x: torch.Tensor) -> torch.Tensor:
        ptr = x.untyped_storage().data_ptr()
        if inside[0] and ptr not in params:
            seen[ptr] = x.untyped_storage().nbytes()
        return x

    layer = model.model.layers[0]
    hooks = [layer.register_forward_pre_hook(lambda *a: inside.__setitem__(0, True)),
             layer.register_forward_hook(lambda *a: inside.__setitem__(0, False))]
    try:
        ids = torch.randint(0, 256, (1, t))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x), torch.set_grad_enabled(grad_needed):
            model(ids, torch.arange(t))
    finally:
        for h in hooks:
            h.remove()
    return sum(seen.values())


def _probe_layer_bytes(config: ModelConfig, adapter: AdapterConfig, lengths: tuple[int, ...],
                       grad_needed: bool) -> list[int]:
    """Bytes autograd saves inside decoder layer 0 for one sequence of each probe length."""
    small = replace(config, num_hidden_layers=1, vocab_size=256,
                    layer_types=config.layer_types[:1] if config.layer_types else ())
    with torch.random.fork_rng(devices=[]):
        model = build_model(small).train()
        api.add_adapter(model, adapter)
    # deeper layers get inputs that require grad (earlier layers' adapters): so does the probed one
    model.model.embed_tokens.register_forward_hook(lambda m, i, o: o.detach().requires_grad_(True))
    params = {p.untyped_storage().data_ptr() for p in [*model.parameters(), *model.buffers()]}
    return [_saved_in_layer(model, t, params, grad_needed) for t in lengths]


def _fit_activation(config: ModelConfig, adapter: AdapterConfig, seq_len: int, batch: int) -> int:
    """Saved bytes of one decoder layer for `batch` sequences of seq_len, from three single-sequence probes
    fitted as a + b T + c T^2 (a: per layer whatever the batch; b T + c T^2: per sequence)."""
    ts = (16, 32, 64)
    ys = _probe_layer_bytes(config, adapter, ts, True)
    a = torch.tensor([[1.0, t, t * t] for t in ts], dtype=torch.float64)
    c0, c1, c2 = torch.linalg.solve(a, torch.tensor(ys, dtype=torch.float64)).tolist()
    return max(0, int(c0 + batch * (c1 * seq_len + c2 * seq_len**2)))


def plan_memory(config: ModelConfig, adapter: AdapterConfig, train, *, seq_len: int, labeled_fraction: float = 1.0,
                dtype: torch.dtype = torch.float32, base_quantized_on_disk: bool = False,
                runtime_bytes: int | None = None) -> MemoryPlan:
    """Peak memory of training `adapter` on `config` with TrainConfig `train`, micro-batches of
    batch_size / grad_accum sequences of `seq_len` tokens, `labeled_fraction` of them scored."""
    micro = train.batch_size // train.grad_accum
    tokens = micro * seq_len
    quantize = hasattr(adapter, "quantize_modules")
    weights, float_bytes = _base_bytes(config, adapter, dtype, quantize)
    load = 0 if not quantize or base_quantized_on_disk else float_bytes
    meta = build_model(config, dtype=dtype, device="meta")
    n_train = sum(p.numel() for _, p in _adapter_params(meta, adapter))
    big = n_train  # states of small tensors stay fp32 in AdamW8bit: a few % at most for adapters
    opt = {"adamw": 8 * n_train, "adamw8bit": 2 * big + 8 * math.ceil(big / 256), "sgd": 0, "mezo": 0}[train.optimizer]
    mezo = train.optimizer == "mezo"
    layer = _fit_activation(config, adapter, seq_len, micro)
    hidden = tokens * config.hidden_size * 4
    if mezo:  # forward only: one layer's intermediates alive at a time
        acts = layer + 3 * hidden
    elif train.grad_checkpointing:
        acts = config.num_hidden_layers * hidden + 2 * layer + 3 * hidden
    else:
        acts = config.num_hidden_layers * layer + layer + 3 * hidden
    scored = max(1, int(tokens * labeled_fraction))
    loss = scored * min(train.loss_chunk, config.vocab_size) * 4 * 3 + scored * config.hidden_size * 4 * 4
    return MemoryPlan(weights=weights, load_transient=load, trainable_params=n_train, adapter=4 * n_train,
                      gradients=0 if mezo else 4 * n_train, optimizer=opt, activations=acts, loss=loss,
                      runtime=current_rss_bytes() if runtime_bytes is None else runtime_bytes)  # after the probes


def _adapter_params(meta_model: nn.Module, adapter: AdapterConfig) -> list:
    """The adapter's parameters on a meta copy of the model (shapes only, nothing allocated)."""
    counted = adapter.as_lora() if hasattr(adapter, "as_lora") else adapter
    if getattr(counted, "init", None) == "pissa":
        counted = counted.replace(init="default")
    with torch.device("meta"):
        api.add_adapter(meta_model, counted)
    return api.adapter_parameters(meta_model)
