"""ModelRunner: owns the KV cache tensors and runs one scheduled step as one model forward.

    result = runner.execute(scheduler_output)   # SchedulerOutput -> RunnerOutput (sampled token ids)

Per KV group one tensor (2, layers in group, num_blocks, block_size, Hkv, D) in the KV dtype (the
model's, or int8 with scales; leanfm.engine.kv_cache); a layer's K and V caches are views into it. A
step's chunks are flattened into input_ids/positions of shape (1, total tokens), single-token chunks
(decodes) first. A PagedAttentionMeta (leanfm.engine.attn_meta), built once per step, carries one
PagedAttentionPlan per group; every attention layer calls its `attend`, which writes the layer's new
keys/values into their slots and attends through leanfm.ops.paged_attention. Logits are computed only
for the rows that are sampled: the last row of a chunk that needs a sample, plus the k rows before it
when the chunk ends with k draft tokens (speculative decoding: leanfm.engine.spec), which are verified
here; the proposer then drafts the next tokens (spec.SpecDecoder.step).

Multi-LoRA serving: a chunk's lora_id names the adapter its rows use (0 = none). Chunks are ordered by
adapter within the decodes and within the rest, so each adapter's rows form at most two ranges; they go
to the model's LoRA host layers (leanfm.models.multi_lora) as row groups for the one forward, and are
cleared right after it (the draft model of speculative decoding runs the base).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from leanfm.engine.attn_meta import PagedAttentionMeta, plan_step
from leanfm.engine.kv.groups import KVGroupSpec
from leanfm.engine.kv_cache import KVCacheTensors
from leanfm.engine.messages import EMPTY_RUNNER_OUTPUT, RunnerOutput, ScheduledChunk, SchedulerOutput
from leanfm.engine.sampler import SamplingState, new_sampling_state, sample_rows, sample_rows_with_logprobs
from leanfm.engine.spec.verify import greedy_accept, verify_chunk
from leanfm.models.multi_lora import RowGroup, lora_state
from leanfm.ops.kernels import max_rows

if TYPE_CHECKING:
    from leanfm.engine.spec.decoder import SpecDecoder


class ModelRunner:
    def __init__(self, model: nn.Module, groups: Sequence[KVGroupSpec], block_size: int,
                 kv_dtype: torch.dtype | None = None, spec: SpecDecoder | None = None):
        cfg = model.config
        param = next(model.parameters())
        self.model, self.groups, self.block_size = model, tuple(groups), block_size
        self.device, self.dtype = param.device, param.dtype
        self.vocab_size = cfg.vocab_size
        self.cache = KVCacheTensors(self.groups, block_size, cfg, kv_dtype or self.dtype, self.device)
        self.caches, self.layer_group = self.cache.layers, self.cache.layer_group
        self._check_windows()
        self.states: dict[str, SamplingState] = {}
        self.spec = spec  # speculative decoding: token histories, the proposer, draft distributions
        # called as hook(chunks, hidden (1, T, hidden)) after each forward, chunks in row order (decodes
        # first): how long-context perplexity scores every token that goes through the cache
        self.hidden_hook: Callable[[list[ScheduledChunk], Tensor], None] | None = None
        self.lora = lora_state(model)  # the step's row groups, read by the model's LoRA layers
        # a prompt/prefix tuning adapter's virtual tokens sit at positions 0.. of every sequence (Request)
        self.virtual_tokens = int(getattr(model, "num_virtual_tokens", 0))

    def _check_windows(self) -> None:
        for m in self.model.modules():
            if hasattr(m, "layer_idx") and hasattr(m, "window") and hasattr(m, "head_dim"):
                group = self.groups[self.layer_group[m.layer_idx]]
                if group.model_window != m.window:
                    raise ValueError(f"layer {m.layer_idx} has window {m.window} but sits in KV group "
                                     f"{group.name!r} (window {group.window}); the model config disagrees "
                                     "with its layers")

    @property
    def kv_bytes(self) -> int:
        """Every byte of the KV cache (codes, int8 scales, h2o positions and scores)."""
        return self.cache.nbytes

    def _inv_freq(self, layer: int) -> Tensor:
        """The RoPE inverse frequencies of a layer (StreamingLLM re-rotates its sink keys with them)."""
        tables, keys = getattr(self.model, "_inv_freq", None), getattr(self.model, "_layer_rope", None)
        if tables is None or keys is None:
            raise ValueError("kv_compression='streaming' needs a leanfm decoder (its per-layer RoPE tables)")
        return tables[keys[layer]]

    def execute(self, sched: SchedulerOutput) -> RunnerOutput:
        self._update_states(sched)
        if not sched.chunks:
            return EMPTY_RUNNER_OUTPUT
        # decodes first, then by adapter (each adapter's rows in at most two ranges), order kept
        chunks = sorted(sched.chunks, key=lambda c: (len(c.token_ids) != 1, c.lora_id))
        rows, sampled, end = [], [], 0
        for c in chunks:
            end += len(c.token_ids)
            if c.needs_logits:  # the last row, and the k rows before it that judge the chunk's k drafts
                rows.extend(range(end - 1 - c.num_draft_tokens, end))
                sampled.append(c)
        with torch.inference_mode():
            logits = self.run_model(chunks, rows)  # (R, V)
            if logits is None:
                return EMPTY_RUNNER_OUTPUT
            logprobs: list = []
            if len(rows) == len(sampled):  # no drafts to verify
                tokens, logprobs = sample_rows_with_logprobs(logits, [self.states[c.req_id] for c in sampled])
                accepted = [0] * len(tokens)
            else:  # (a request asking for logprobs is never given drafts: the scheduler sees to it)
                tokens, accepted, logprobs = self._verify(logits, sampled)
            drafts = self.spec.step(sampled, tokens, accepted, self.states) if self.spec is not None else ()
        return RunnerOutput(tuple(c.req_id for c in sampled), tuple(tokens), tuple(accepted), drafts,
                            tuple(logprobs) if any(logprobs) else ())

    def _update_states(self, sched: SchedulerOutput) -> None:
        for req_id in sched.finished_req_ids:
            self.states.pop(req_id, None)
            if self.spec is not None:
                self.spec.finished(req_id)
        if self.spec is not None:
            for req_id in sched.preempted_req_ids:
                self.spec.preempted(req_id)
        for new in sched.new_requests:
            self.states[new.req_id] = new_sampling_state(new.params, new.prompt_token_ids, self.vocab_size,
                                                         self.device)
            if self.spec is not None:
                self.spec.add(new.req_id, new.prompt_token_ids)

    def run_model(self, chunks: list[ScheduledChunk], rows: list[int], logits: bool = True) -> Tensor | None:
        """One forward over the chunks (single-token chunks first) -> logits (len(rows), V) of the given
        rows of the flattened step (their hidden states with logits=False; None when no row is asked for).
        The KV of every token is written."""
        input_ids, positions, meta = self._prepare(chunks)
        self.lora.groups = self._lora_groups(chunks, input_ids.device)
        try:
            hidden = self.model(input_ids, positions, meta)  # (1, T, hidden)
        finally:
            self.lora.groups = ()
        if self.hidden_hook is not None:
            self.hidden_hook(chunks, hidden)
        if not rows:
            return None
        if rows[-1] - rows[0] == len(rows) - 1:  # contiguous: a view
            last = hidden[0, rows[0]:rows[-1] + 1]
        else:
            last = hidden[0].index_select(0, torch.tensor(rows, dtype=torch.long, device=hidden.device))
        return self._logits(last) if logits else last

    @staticmethod
    def _lora_groups(chunks: list[ScheduledChunk], device: torch.device) -> tuple[RowGroup, ...]:
        """The rows of each adapter present in the step: a range, or an index over its ranges."""
        if not any(c.lora_id for c in chunks):
            return ()
        ranges: dict[int, list[tuple[int, int]]] = {}
        end = 0
        for c in chunks:
            start, end = end, end + len(c.token_ids)
            if c.lora_id:
                spans = ranges.setdefault(c.lora_id, [])
                if spans and spans[-1][1] == start:
                    spans[-1] = (spans[-1][0], end)
                else:
                    spans.append((start, end))
        groups = []
        for lora_id, spans in ranges.items():
            if len(spans) == 1:
                groups.append(RowGroup(lora_id, *spans[0]))
            else:
                index = torch.cat([torch.arange(a, b) for a, b in spans]).to(device)
                groups.append(RowGroup(lora_id, index=index))
        return tuple(groups)

    def _verify(self, logits: Tensor, chunks: list[ScheduledChunk]) -> tuple[list[int], list[int], list]:
        """Per sampled chunk: accept a prefix of its drafts and emit one token (leanfm.engine.spec.verify).
        A chunk without drafts whose request asks for logprobs is sampled with them (else None)."""
        states = [self.states[c.req_id] for c in chunks]
        greedy = logits.argmax(dim=-1).tolist() if all(s.plain_greedy for s in states) else None
        tokens, accepted, logprobs, r = [], [], [], 0
        for c, state in zip(chunks, states, strict=True):
            k = c.num_draft_tokens
            drafts = c.token_ids[len(c.token_ids) - k:]
            logprobs.append(None)
            if k == 0 and state.params.logprobs is not None:
                (token,), (logprobs[-1],) = sample_rows_with_logprobs(logits[r:r + 1], [state])
                a = 0
            elif greedy is not None:
                a, token = greedy_accept(greedy[r:r + k + 1], drafts)
            elif k == 0:
                a, token = 0, sample_rows(logits[r:r + 1], [state])[0]
            else:
                q = self.spec.draft_probs.get(c.req_id) if self.spec is not None else None
                a, token = verify_chunk(logits[r:r + k + 1], drafts, state, q)
            tokens.append(token)
            accepted.append(a)
            r += k + 1
        return tokens, accepted, logprobs

    def _logits(self, hidden: Tensor) -> Tensor:
        """compute_logits in slices of at most kernels.max_rows() rows when there are a few of them: the
        skinny C++ kernel reads the (vocab x hidden) head once per slice and still beats the BLAS GEMM
        that more rows would fall back to (gemma-3-270m, 16 rows: 2 x 79 ms against 190 ms, 1 thread)."""
        rows, step = hidden.shape[0], max_rows()
        if rows <= step or rows > 4 * step:
            return self.model.compute_logits(hidden)
        return torch.cat([self.model.compute_logits(hidden[i:i + step]) for i in range(0, rows, step)])

    def _prepare(self, chunks: list[ScheduledChunk]) -> tuple[Tensor, Tensor, PagedAttentionMeta]:
        starts = [c.start_pos for c in chunks]
        lens = [len(c.token_ids) for c in chunks]
        tokens = [t for c in chunks for t in c.token_ids]
        input_ids = torch.tensor(tokens, dtype=torch.long).view(1, -1)
        if len(tokens) == len(chunks):  # decodes only
            positions = torch.tensor(starts, dtype=torch.long)
            row_req = torch.arange(len(chunks))
        else:
            lens_t = torch.tensor(lens, dtype=torch.long)
            row_req = torch.repeat_interleave(torch.arange(len(chunks)), lens_t)
            first_row = torch.cumsum(lens_t, 0) - lens_t
            positions = torch.tensor(starts, dtype=torch.long)[row_req] + torch.arange(len(tokens)) - first_row[row_req]
        meta = plan_step(chunks, positions, row_req, self.cache, self.groups, self.block_size, self._inv_freq,
                         self.dtype)
        meta.virtual_tokens = self.virtual_tokens
        if self.device.type != "cpu":
            input_ids, positions = input_ids.to(self.device), positions.to(self.device)
            meta.plans = [p.to(self.device) for p in meta.plans]
        return input_ids, positions.view(1, -1), meta
