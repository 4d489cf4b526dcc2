"""AsyncLLM: the engine loop on a background thread, streaming outputs to asyncio callers.

    llm = AsyncLLM("gemma-3-270m", max_num_seqs=16)
    async for out in llm.generate("Hello", SamplingParams(max_tokens=32), request_id="r1"):
        print(out.new_text, end="")            # out.text is everything so far
    llm.abort("r1")                           # from any thread: frees everything r1 holds
    async for i, out in llm.generate_many("Hello", params, n=4):   # 4 samples of one prompt
        ...
    llm.shutdown()

Only the engine thread touches the engine. Callers hand it commands (add, abort, load / unload a LoRA
adapter) through a locked queue and get outputs back through their event loop (call_soon_threadsafe
into an asyncio.Queue). A caller that stops iterating early aborts its request.

LoRA adapters: `AsyncLLM(model, adapters={"sql": path})`, `generate(..., adapter="sql")`, and at run time
`llm.load_adapter(name, path)` / `llm.unload_adapter(name)` (blocking until the engine thread has done
it, between two steps; call them from a worker thread in async code).
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from concurrent.futures import Future
from typing import Any

from leanfm.engine.llm import build_engine
from leanfm.engine.lora import AdapterInfo
from leanfm.engine.params import SamplingParams
from leanfm.engine.request import RequestOutput
from leanfm.engine.stats import EngineStats
from leanfm.utils.errors import LeanfmError

_Sink = tuple[asyncio.AbstractEventLoop, asyncio.Queue]


class AsyncLLM:
    def __init__(self, model: Any = "gemma-3-270m", tokenizer: Any = None, adapters: Mapping[str, str] | None = None,
                 **engine_options: Any):
        self.engine = build_engine(model, tokenizer, adapters, **engine_options)
        self.tokenizer = self.engine.tokenizer
        self._cv = threading.Condition()
        self._commands: deque[tuple[str, Any, Any]] = deque()  # guarded by _cv
        self._active: set[str] = set()  # request ids between generate() and their last output; by _cv
        self._sinks: dict[str, _Sink] = {}  # engine thread only
        self._stopped = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="leanfm-engine", daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------- caller side
    async def generate(self, prompt: str | Sequence[int], params: SamplingParams | None = None,
                       request_id: str | None = None, priority: int = 0, adapter: str | None = None
                       ) -> AsyncIterator[RequestOutput]:
        """Yield a RequestOutput whenever the request gets tokens (.new_text is the delta); the last one
        has a finish_reason. Bad input raises LeanfmError before anything is yielded. `adapter` names a
        loaded LoRA adapter (None: the base model)."""
        req = self.engine.make_request(prompt, params, request_id, priority, adapter=adapter)
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        with self._cv:
            self._check_alive()
            if req.request_id in self._active:
                raise LeanfmError(f"request id {req.request_id!r} is already in use; give each request its own id")
            self._active.add(req.request_id)
            self._commands.append(("add", req, (loop, queue)))
            self._cv.notify()
        finished = False
        try:
            while not finished:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:
                self.abort(req.request_id)

    async def generate_many(self, prompt: str | Sequence[int], params: SamplingParams | None = None, n: int = 1,
                            request_id: str | None = None, priority: int = 0, adapter: str | None = None
                            ) -> AsyncIterator[tuple[int, RequestOutput]]:
        """n samples of one prompt as n requests ("<id>-<i>"), merged into one stream of (i, output).

        Sample i > 0 is submitted once sample 0 has its first token, so its prompt comes from the prefix
        cache; with a seed, sample i uses seed + i. Bad input raises before anything is yielded; leaving
        early aborts every sample."""
        if n < 1:
            raise LeanfmError(f"n must be >= 1, got {n}")
        params = SamplingParams() if params is None else params
        base = uuid.uuid4().hex[:16] if request_id is None else str(request_id)
        ids = [f"{base}-{i}" for i in range(n)]
        first = self.generate(prompt, params, ids[0], priority, adapter)
        queue: asyncio.Queue = asyncio.Queue()
        tasks: list[asyncio.Task] = []
        done = 0
        try:
            out = await first.__anext__()
            done += out.finished
            yield 0, out
            if n == 1:  # no merging: the one stream as it comes
                async for out in first:
                    done += out.finished
                    yield 0, out
                return
            tasks.append(asyncio.ensure_future(_pump(0, first, queue)))
            for i in range(1, n):
                seed = None if params.seed is None else params.seed + i
                stream = self.generate(prompt, dataclasses.replace(params, seed=seed), ids[i], priority, adapter)
                tasks.append(asyncio.ensure_future(_pump(i, stream, queue)))
            while done < n:
                i, item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                done += item.finished
                yield i, item
        finally:
            if done < n:  # left early, or failed: stop every sample (aborting a finished one is a no-op)
                for task in tasks:
                    task.cancel()
                for rid in ids:
                    self.abort(rid)

    def abort(self, request_id: str) -> None:
        """Stop a request (from any thread); its stream ends with finish_reason "abort"."""
        with self._cv:
            if not self._stopped:
                self._commands.append(("abort", request_id, None))
                self._cv.notify()

    def stats(self) -> EngineStats:
        return self.engine.stats()

    # ---------------------------------------------------------------- LoRA adapters
    def load_adapter(self, name: str, path: str) -> AdapterInfo:
        """Load a LoRA adapter on the engine thread (between steps); blocks until done, raises its error."""
        return self._call(lambda: self.engine.load_adapter(name, path))

    def unload_adapter(self, name: str) -> AdapterInfo:
        """Unload a LoRA adapter on the engine thread; refused while a request uses it."""
        return self._call(lambda: self.engine.unload_adapter(name))

    @property
    def adapters(self) -> dict[str, AdapterInfo]:
        """The loaded LoRA adapters by name (a snapshot, safe from any thread)."""
        return self.engine.adapters

    def _call(self, fn: Callable[[], Any]) -> Any:
        if threading.current_thread() is self._thread:
            return fn()
        future: Future = Future()
        with self._cv:
            self._check_alive()
            self._commands.append(("call", fn, future))
            self._cv.notify()
        return future.result()

    @property
    def is_running(self) -> bool:
        """True until shutdown() or an engine failure."""
        return not self._stopped and self._error is None and self._thread.is_alive()

    def shutdown(self, timeout: float | None = 10.0) -> None:
        """Stop the engine thread; unfinished streams end with finish_reason "abort"."""
        with self._cv:
            self._stopped = True
            self._cv.notify()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def __enter__(self) -> AsyncLLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def _check_alive(self) -> None:
        if self._error is not None:
            raise LeanfmError(f"the engine stopped after an error: {self._error!r}")
        if self._stopped:
            raise LeanfmError("the engine is shut down; create a new AsyncLLM")

    # ---------------------------------------------------------------- engine thread
    def _run(self) -> None:
        while True:
            with self._cv:
                while not (self._commands or self._stopped or self.engine.has_unfinished):
                    self._cv.wait()
                commands = list(self._commands)
                self._commands.clear()
                stopped = self._stopped
            for kind, arg, sink in commands:
                if kind == "add":
                    self._add(arg, sink)
                elif kind == "call":
                    _resolve(sink, arg)
                else:
                    self._abort(arg)
            if stopped:
                break
            if self.engine.has_unfinished:
                try:
                    updated = self.engine.step()
                except BaseException as exc:  # the engine's state is unknown now: fail everyone
                    self._fail(exc)
                    return
                self._deliver_step([(req.request_id, req.output()) for req in updated])
        for req_id in list(self._sinks):
            self._abort(req_id)

    def _add(self, req: Any, sink: _Sink) -> None:
        self._sinks[req.request_id] = sink
        if req.lora_id and not self.engine.lora.has_id(req.lora_id):  # unloaded since make_request
            self._deliver(req.request_id, LeanfmError(f"adapter {req.adapter!r} was unloaded before the request "
                                                      "started; load it again"))
            return
        self.engine.scheduler.add_request(req)

    def _abort(self, request_id: str) -> None:
        req = self.engine.abort(request_id)
        if req is not None:
            self._deliver(request_id, req.output())

    def _deliver(self, request_id: str, item: RequestOutput | BaseException) -> None:
        self._deliver_step([(request_id, item)])

    def _deliver_step(self, items: list[tuple[str, RequestOutput | BaseException]]) -> None:
        """Outputs (or errors) to their callers: one wake-up per caller loop (not one per request), so the
        loop thread takes the GIL once per step to fan them out instead of once per stream."""
        batches: dict[Any, list] = {}
        for request_id, item in items:
            sink = self._sinks.get(request_id)
            if isinstance(item, BaseException) or item.finished:
                self._sinks.pop(request_id, None)
                with self._cv:
                    self._active.discard(request_id)
            if sink is not None:
                batches.setdefault(sink[0], []).append((sink[1], item))
        for loop, batch in batches.items():
            try:
                loop.call_soon_threadsafe(_fan_out, batch)
            except RuntimeError:  # the caller's loop is closed: nobody is listening
                pass

    def _fail(self, exc: BaseException) -> None:
        with self._cv:
            self._error = exc
            self._stopped = True
            calls = [sink for kind, _, sink in self._commands if kind == "call"]
        for future in calls:  # nobody will run them now
            future.set_exception(LeanfmError(f"the engine failed: {exc!r}"))
        for req_id in list(self._sinks):
            self._deliver(req_id, LeanfmError(f"the engine failed: {exc!r}"))


def _fan_out(batch: list[tuple[asyncio.Queue, RequestOutput | BaseException]]) -> None:
    for queue, item in batch:
        queue.put_nowait(item)


def _resolve(future: Future, fn: Callable[[], Any]) -> None:
    try:
        future.set_result(fn())
    except BaseException as exc:  # the caller gets it (LeanfmError for bad input)
        future.set_exception(exc)


async def _pump(index: int, stream: AsyncIterator[RequestOutput], queue: asyncio.Queue) -> None:
    """Forward one sample's outputs (or its error) to the merged queue as (index, item)."""
    try:
        async for out in stream:
            queue.put_nowait((index, out))
    except Exception as exc:
        queue.put_nowait((index, exc))
