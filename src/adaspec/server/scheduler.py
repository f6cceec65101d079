"""The engine worker: one thread owns the Engine and interleaves the requests' steps.

Request lifecycle (every engine call happens on the worker thread, so the
engine and its tokenizer are never used concurrently):

1. submit   - the event loop queues a :class:`Job` (429 when the queue is full).
2. admit    - the worker tokenizes it and calls ``engine.start`` once an active
              slot is free; a ``ValueError`` there becomes a 400.
3. step     - continuous batching: every turn, one ``engine.step_batch`` over all
              active requests (one batched target forward: each one's verify
              rows, plus bounded prefill chunks of new requests), so requests
              join and leave between steps and a long request never holds a
              short one back by more than a step. When the KV pool runs short,
              the prefix cache is emptied, then the newest request is preempted
              (its KV freed, back to the head of the queue; resumed later by
              recomputing its KV) - never failed mid-stream. An engine without
              ``step_batch`` is stepped round-robin, one ``engine.step`` each.
4. finish   - EOS / stop / max_tokens (the engine), or the request timeout,
              a client disconnect, or server shutdown (the scheduler:
              ``engine.abort`` frees the KV cache and speculator state).

Results go back to the event loop through each job's ``asyncio.Queue`` as
:class:`Started`, :class:`Chunk` and :class:`Failed` events, in that order.

Finish reasons: "stop" and "length" as the engine sets them. A request cut
short by the scheduler also finishes with "length" (the output was cut by a
limit) and ``Chunk.finish_detail`` says which: "timeout" or "shutdown".
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

from adaspec.server.metrics import RequestRecord, ServerMetrics
from adaspec.server.schemas import ApiError
from adaspec.types import DEFAULT_TENANT, GenerationResult, SamplingParams, StepResult, TokenLogprob

log = logging.getLogger("adaspec.server")

CUT_REASON = "length"  # finish_reason of a request the scheduler cut short (timeout, shutdown)


class QueueFull(Exception):
    """The bounded queue holds ``max_queue`` waiting requests already."""


class ShuttingDown(Exception):
    """The scheduler no longer accepts requests."""


@dataclass
class LogprobEntry:
    """One emitted token's logprob with its text and UTF-8 bytes.

    Attributes:
        token: the token's text (a partial UTF-8 character shows as U+FFFD).
        bytes: the token's exact bytes.
        logprob: natural-log probability under the target model.
        top: ``(token, bytes, logprob)`` of the most likely alternatives, best first.
    """

    token: str
    bytes: list[int]
    logprob: float
    top: list[tuple[str, list[int], float]]


@dataclass
class Started:
    """The request was prefilled; ``prompt_tokens`` as the engine counted them."""

    prompt_tokens: int


@dataclass
class Chunk:
    """New output of a request (streaming: after every step; otherwise only the final one).

    Attributes:
        text: new text (the engine holds back incomplete UTF-8 and possible
            stop-string prefixes, so the chunks concatenate to the final text).
        token_ids: new token ids.
        logprobs: entries for ``token_ids`` when requested.
        finish_reason: set on the last chunk only.
        result: the engine's result, on the last chunk only.
        finish_detail: why the scheduler cut the request ("timeout", "shutdown"), else None.
        ttft_s: submit to first token, on the last chunk.
    """

    text: str
    token_ids: list[int]
    logprobs: Optional[list[LogprobEntry]] = None
    finish_reason: Optional[str] = None
    result: Optional[GenerationResult] = None
    finish_detail: Optional[str] = None
    ttft_s: Optional[float] = None


@dataclass
class Failed:
    """The request failed: an :class:`ApiError` for the client's mistakes, any other error for ours."""

    error: BaseException


@dataclass
class Job:
    """One request as the scheduler sees it.

    Attributes:
        params: sampling and stopping settings (validated).
        prompt: text or token ids (completions); None for chat.
        messages: chat messages (``[{"role", "content"}]``); None for completions.
        tenant: whose learned state the speculators use.
        stream: push a chunk after every step (else only the final one).
        timeout_s: wall-clock limit from submit; None for no limit.
        endpoint: "completions" or "chat" (metrics label).
        share_prefill: ``(group key, group size)`` of the ``n`` jobs of one request:
            they share one prefill (``Engine.start(share_prefill=...)``).
    """

    request_id: str
    params: SamplingParams
    prompt: Optional[str | Sequence[int]] = None
    messages: Optional[list[dict[str, Any]]] = None
    tenant: str = DEFAULT_TENANT
    stream: bool = False
    timeout_s: Optional[float] = None
    endpoint: str = "completions"
    share_prefill: Optional[tuple[str, int]] = None
    group_id: Optional[str] = None  # the request's id when this job is one of its n choices
    events: Optional[asyncio.Queue] = None
    loop: Optional[asyncio.AbstractEventLoop] = None
    submitted_s: float = field(default_factory=time.perf_counter)
    cancelled: threading.Event = field(default_factory=threading.Event)
    # Worker-side state.
    state: Any = None
    last_token_s: Optional[float] = None
    ttft_s: Optional[float] = None

    @property
    def deadline_s(self) -> float:
        return self.submitted_s + self.timeout_s if self.timeout_s else float("inf")

    def bind(self) -> "Job":
        """Attach the running event loop and a fresh event queue (call on the loop)."""
        self.loop = asyncio.get_running_loop()
        self.events = asyncio.Queue()
        return self

    async def next_event(self, timeout_s: Optional[float] = None) -> Started | Chunk | Failed | None:
        """The next event, or None after ``timeout_s`` without one."""
        try:
            return await asyncio.wait_for(self.events.get(), timeout_s)
        except asyncio.TimeoutError:
            return None


class Scheduler:
    """Owns the engine on one worker thread; fair round-robin over active requests.

    Args:
        engine: an :class:`adaspec.engine.Engine` (or anything with its
            start / step / delta / abort / result / encode_prompt /
            apply_chat_template / tokenizer interface).
        metrics: where steps and finished requests are recorded.
        max_active: requests decoded at once (each holds a KV cache). Default 8.
        max_queue: requests that may wait for an active slot; one more is
            refused with :class:`QueueFull` (the API's 429). Default 32.
        prefill_chunk: most prompt tokens prefilled per batched step (over all
            new requests): bounds the others' inter-token latency. Default
            :data:`adaspec.engine.BATCH_PREFILL_TOKENS` (256).
    """

    def __init__(self, engine: Any, metrics: Optional[ServerMetrics] = None, max_active: int = 8,
                 max_queue: int = 32, prefill_chunk: int = 256) -> None:
        if max_active < 1 or max_queue < 0:
            raise ValueError(f"need max_active >= 1 and max_queue >= 0, got {max_active}, {max_queue}")
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        self.prefill_chunk = prefill_chunk
        self.batching = hasattr(engine, "step_batch")
        self.preemptions = 0
        self._last_batch_size = 1
        self.engine = engine
        self.metrics = metrics or ServerMetrics()
        self.max_active = max_active
        self.max_queue = max_queue
        self._cond = threading.Condition()
        self._pending: deque[Job] = deque()
        self._calls: deque[tuple[Callable[[], Any], Future]] = deque()  # run on the worker between steps
        self._active: list[Job] = []  # only the worker changes it
        self._closing = False  # no new submissions
        self._abort_all = False  # cut every request now
        self._stop = False  # worker exits when idle
        self._thread: Optional[threading.Thread] = None
        self._token_text = _TokenText(getattr(engine, "tokenizer", None))
        self.peak_active = 0  # most requests decoded at once (for tests and the dashboard)

    # ------------------------------------------------------------ event-loop side
    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    @property
    def active_count(self) -> int:
        return len(self._active)

    def start(self) -> None:
        """Start the worker thread."""
        self._thread = threading.Thread(target=self._run, name="adaspec-engine", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        """Queue a job (its ``bind`` must have been called on the event loop).

        Raises:
            QueueFull: ``max_queue`` jobs wait beyond the free active slots.
            ShuttingDown: after :meth:`shutdown` began.
        """
        with self._cond:
            if self._closing:
                raise ShuttingDown()
            free_slots = max(0, self.max_active - len(self._active))
            if len(self._pending) >= self.max_queue + free_slots:
                raise QueueFull()
            self._pending.append(job)
            self._cond.notify()

    def cancel(self, job: Job) -> None:
        """The client went away: drop the job if queued, else abort it at the next turn."""
        job.cancelled.set()
        with self._cond:
            try:
                self._pending.remove(job)
            except ValueError:
                pass
            else:
                if job.state is not None:  # preempted while it waited: free its engine state on the worker
                    self._calls.append((lambda st=job.state: self.engine.abort(st, "abort"), Future()))
            self._cond.notify()

    def shutdown(self, drain_timeout_s: float = 0.0) -> None:
        """Stop accepting, let in-flight work finish for ``drain_timeout_s``, then cut the rest.

        Blocking; call it off the event loop. Cut requests finish with
        "length" and finish_detail "shutdown"; queued ones get a 503.
        """
        with self._cond:
            self._closing = True
        deadline = time.monotonic() + drain_timeout_s
        while (self._pending or self._active) and time.monotonic() < deadline:
            time.sleep(0.02)
        with self._cond:
            self._abort_all = True
            self._stop = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout=30.0)

    def run_between_steps(self, fn: Callable[[], Any]) -> Future:
        """Run ``fn()`` on the worker thread between two steps; its result comes back in the Future.

        The engine and its speculators are never mid-step then, so ``fn`` reads
        a consistent state (e.g. speculators' ``state_dict``). Once the worker
        has stopped, ``fn`` runs at once on the caller's thread.
        """
        fut: Future = Future()
        with self._cond:
            alive = self._thread is not None and self._thread.is_alive() and not self._stop
            if alive:
                self._calls.append((fn, fut))
                self._cond.notify()
                return fut
        _run_call(fn, fut)
        return fut

    # ------------------------------------------------------------ worker side
    def _run_calls(self) -> None:
        while True:
            with self._cond:
                if not self._calls:
                    return
                fn, fut = self._calls.popleft()
            _run_call(fn, fut)

    def _run(self) -> None:
        while True:
            self._run_calls()
            with self._cond:
                while not self._pending and not self._active and not self._stop and not self._calls:
                    self._cond.wait()
                if self._calls and not self._pending and not self._active and not self._stop:
                    continue
                if self._abort_all:
                    dropped = list(self._pending)
                    self._pending.clear()
                else:
                    dropped = []
                admit = []
                while self._pending and len(self._active) + len(admit) < self.max_active:
                    if self._pending[0].state is not None and not self._room_for(self._pending[0]):
                        break  # a preempted request resumes once its KV fits again
                    admit.append(self._pending.popleft())
                if self._stop and not admit and not self._active and not self._pending:
                    break
            self._run_calls()
            for job in dropped:
                self._push(job, Failed(ApiError(503, "the server is shutting down", type="server_error",
                                                code="shutting_down")))
            for job in admit:
                self._guarded(self._admit, job)
            self.peak_active = max(self.peak_active, len(self._active))
            if self.batching:
                self._step_all()
            else:
                for job in list(self._active):  # one step each: round-robin
                    self._guarded(self._advance, job)
        self._run_calls()  # callers waiting on a call queued just before the stop
        log.info("engine worker stopped")

    def _guarded(self, fn: Any, job: Job) -> None:
        """Run one job's turn; an unexpected error fails that job only, never the worker."""
        try:
            fn(job)
        except Exception as e:
            log.exception("request %s failed in the scheduler", job.request_id)
            if job.state is not None and not job.state.finished:
                try:
                    self.engine.abort(job.state, "abort")
                except Exception:
                    log.exception("abort failed for %s", job.request_id)
            if job in self._active:
                self._finish(job, "error")
            self._push(job, Failed(e))

    def _room_for(self, job: Job) -> bool:
        """A preempted job's KV (plus a block per active request) fits the free KV blocks."""
        pool = getattr(getattr(getattr(self.engine, "target", None), "decoder", None), "pool", None)
        if pool is None:
            return True
        need = -(-len(job.state.token_ids) // pool.block_size) + len(self._active) + 1
        return pool.free_blocks >= need or not self._active

    def _admit(self, job: Job) -> None:
        if job.cancelled.is_set():
            if job.state is not None:  # preempted, then cancelled while it waited
                self.engine.abort(job.state, "abort")
            return
        if job.state is not None:  # a preempted request resumes (its KV is recomputed)
            self._active.append(job)
            return
        if time.perf_counter() >= job.deadline_s:
            self._push(job, Failed(queue_timeout_error(job.timeout_s)))
            return
        param = "messages" if job.messages is not None else "prompt"
        try:
            if job.messages is not None:
                ids = self.engine.apply_chat_template(job.messages)
            else:
                ids = self.engine.encode_prompt(job.prompt)
            if job.share_prefill:  # the n samples of one prompt: one prefill now, copied to the others
                job.state = self.engine.start(ids, job.params, tenant=job.tenant, request_id=job.request_id,
                                              share_prefill=job.share_prefill)
            elif self.batching:  # prefilled in chunks by the batched steps
                job.state = self.engine.start(ids, job.params, tenant=job.tenant, request_id=job.request_id,
                                              prefill=False)
            else:
                job.state = self.engine.start(ids, job.params, tenant=job.tenant, request_id=job.request_id)
        except ValueError as e:  # bad prompt, too long for the context window, invalid params
            self._push(job, Failed(ApiError(400, str(e), param=param, code="invalid_prompt")))
            return
        except Exception as e:
            if _is_template_error(e):
                self._push(job, Failed(ApiError(400, f"chat template: {e}", param=param, code="invalid_prompt")))
            else:
                log.exception("engine.start failed for %s", job.request_id)
                self._push(job, Failed(e))
            return
        self._active.append(job)
        self.metrics.record_start(len(job.state.prompt_ids), time.perf_counter() - job.submitted_s)
        self._push(job, Started(prompt_tokens=len(job.state.prompt_ids)))

    def _advance(self, job: Job) -> None:
        """One turn for one active job: cancel, cut, or step it, then emit what it produced."""
        state = job.state
        detail = None
        if job.cancelled.is_set():
            self.engine.abort(state, "abort")
            self._finish(job, "abort")
            return
        if self._abort_all or time.perf_counter() >= job.deadline_s:
            detail = "shutdown" if self._abort_all else "timeout"
            self.engine.abort(state, CUT_REASON)
        else:
            step = self.engine.step(state)  # an error here fails this job (see _guarded)
            self._record_step(job, step)
        chunk = self._chunk(job, detail)
        if state.finished:  # leave the active set before the client can see the end
            self._finish(job, detail or state.finish_reason)
        if chunk is not None:
            self._push(job, chunk)

    def _step_all(self) -> None:
        """One continuous-batching turn: cancel or cut jobs, then one ``engine.step_batch`` for the rest."""
        stepping = []
        for job in list(self._active):
            if job.cancelled.is_set() or self._abort_all or time.perf_counter() >= job.deadline_s:
                self._guarded(self._advance, job)  # cancel / cut (no step)
            else:
                stepping.append(job)
        while stepping:
            try:
                results = self.engine.step_batch([j.state for j in stepping], max_prefill_tokens=self.prefill_chunk)
                break
            except Exception as e:
                if type(e).__name__ != "PoolExhausted":
                    # isolate the failure: step each alone, so only the failing request fails
                    log.exception("batched step failed; stepping requests one by one")
                    for job in stepping:
                        self._guarded(self._advance, job)
                    return
                cache = getattr(self.engine, "prefix_cache", None)
                if cache is not None and cache.num_entries:
                    cache.evict_all()  # cached prefixes go first
                    continue
                if len(stepping) == 1:
                    self._guarded(self._fail_memory, stepping[0])
                    return
                victim = stepping.pop()  # the newest request waits: its KV is freed, recomputed later
                self.engine.preempt(victim.state)
                self._active.remove(victim)
                self.preemptions += 1
                with self._cond:
                    self._pending.appendleft(victim)
        else:
            return
        rows = getattr(self.engine, "last_batch", (len(stepping), len(stepping)))
        self.metrics.record_batch(rows[0], rows[1])
        self._last_batch_size = rows[0]
        for job, step in zip(stepping, results):
            self._guarded(lambda j, st=step: self._emit(j, st), job)

    def _fail_memory(self, job: Job) -> None:
        raise RuntimeError("the KV cache pool cannot hold this request even alone")

    def _emit(self, job: Job, step: Optional[StepResult]) -> None:
        """After a batched step: record it and send the job its chunk (finish it when done)."""
        if step is not None:
            self._record_step(job, step)
            if step.token_ids:
                self.metrics.record_batch_lookahead(self._last_batch_size, step.num_draft_tokens)
        chunk = self._chunk(job, None)
        if job.state.finished:
            self._finish(job, job.state.finish_reason)
        if chunk is not None:
            self._push(job, chunk)

    def _record_step(self, job: Job, step: StepResult) -> None:
        """Metrics of one step: which speculator, drafts proposed and accepted, TTFT or token gap."""
        if not step.token_ids:  # the request had already finished: no forward ran
            return
        self.metrics.record_step(step.speculator, step.num_draft_tokens,
                                 min(step.num_accepted, step.num_emitted), step.num_emitted)
        committed = step.token_ids
        now = time.perf_counter()
        if job.last_token_s is None:
            job.ttft_s = now - job.submitted_s
            self.metrics.ttft.observe(job.ttft_s)
        else:
            self.metrics.record_token_gap(now - job.last_token_s, len(committed))
        job.last_token_s = now

    def _chunk(self, job: Job, detail: Optional[str]) -> Optional[Chunk]:
        """What the client gets after this turn: every step when streaming, else only the end."""
        state = job.state
        if job.stream:
            d = self.engine.delta(state)
            if not (d.text or d.token_ids or d.finish_reason):
                return None
            chunk = Chunk(d.text, list(d.token_ids), self._logprobs(d.logprobs), d.finish_reason, d.result)
        elif state.finished:
            r = self.engine.result(state)
            chunk = Chunk(r.text, list(r.token_ids), self._logprobs(r.logprobs), r.finish_reason, r)
        else:
            return None
        if chunk.finish_reason is not None:
            chunk.finish_detail = detail
            chunk.ttft_s = job.ttft_s
        return chunk

    def _finish(self, job: Job, finish_reason: str) -> None:
        self._active.remove(job)
        state = job.state
        stats = state.stats
        self.metrics.record_finish(RequestRecord(
            request_id=job.request_id, tenant=job.tenant, endpoint=job.endpoint, stream=job.stream,
            prompt_tokens=len(state.prompt_ids), completion_tokens=len(state.output_ids),
            finish_reason=finish_reason, elapsed_s=time.perf_counter() - job.submitted_s, ttft_s=job.ttft_s,
            acceptance_rate=stats.acceptance_rate if stats.proposed else None,
            mean_acceptance_length=stats.mean_acceptance_length if stats.draft_steps else None,
            steps_by_speculator=dict(stats.steps_by_speculator)))

    def _logprobs(self, entries: Optional[list[TokenLogprob]]) -> Optional[list[LogprobEntry]]:
        if entries is None:
            return None
        tt = self._token_text
        out = []
        for e in entries:
            text, raw = tt(e.token_id)
            out.append(LogprobEntry(text, raw, e.logprob, [(*tt(t), lp) for t, lp in e.top]))
        return out

    def _push(self, job: Job, event: Started | Chunk | Failed) -> None:
        try:
            job.loop.call_soon_threadsafe(job.events.put_nowait, event)
        except RuntimeError:  # the event loop is gone (shutdown); nobody is listening
            pass


def _run_call(fn: Callable[[], Any], fut: Future) -> None:
    if not fut.set_running_or_notify_cancel():
        return
    try:
        fut.set_result(fn())
    except BaseException as e:  # the caller sees it; the worker goes on
        fut.set_exception(e)


def queue_timeout_error(timeout_s: Optional[float]) -> ApiError:
    """The 429 for a request that waited its whole timeout for an active slot."""
    return ApiError(429, f"the request waited longer than the request timeout ({timeout_s:g} s) for a free "
                    "slot; retry later", type="rate_limit_error", code="queue_timeout",
                    headers={"Retry-After": "1"})


def _is_template_error(e: BaseException) -> bool:
    try:
        import jinja2
    except ImportError:  # pragma: no cover - transformers depends on jinja2
        return False
    return isinstance(e, jinja2.TemplateError)


class _TokenText:
    """Text and exact bytes of single tokens (cached), for logprobs."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[int, tuple[str, list[int]]] = {}
        self._byte_decoder: Optional[dict[str, int]] = None
        decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
        if type(decoder).__name__ == "ByteLevel":  # GPT-2 style: each char of a token stands for one byte
            self._byte_decoder = {c: b for b, c in _bytes_to_unicode().items()}

    def __call__(self, token_id: int) -> tuple[str, list[int]]:
        hit = self._cache.get(token_id)
        if hit is not None:
            return hit
        raw: Optional[bytes] = None
        if self._byte_decoder is not None:
            piece = self.tokenizer.convert_ids_to_tokens(int(token_id))
            if piece is not None and all(c in self._byte_decoder for c in piece):
                raw = bytes(self._byte_decoder[c] for c in piece)
        if raw is None:
            raw = self.tokenizer.decode([int(token_id)], skip_special_tokens=False,
                                        clean_up_tokenization_spaces=False).encode("utf-8", "surrogatepass")
        out = (raw.decode("utf-8", errors="replace"), list(raw))
        self._cache[token_id] = out
        return out


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map (byte-level BPE vocabularies)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}
