"""The OpenAI-compatible HTTP API: ``create_app`` builds the FastAPI app.

Endpoints:

- ``POST /v1/completions``, ``POST /v1/chat/completions``: OpenAI's request and
  response shapes (SSE streaming with ``stream_options.include_usage``, n=1).
  Every response, and the last chunk of a stream, carries an ``adaspec``
  field with the request's speculation stats (``SpeculationStats.to_dict()``
  plus ``speculator_shares``, ``tenant``, ``ttft_s``, ``elapsed_s`` and
  ``finish_detail``).
- ``GET /v1/models``, ``GET /v1/models/{model}``.
- ``GET /health``: ``{"status": "ok", ...}``.
- ``GET /metrics``: Prometheus text format (the app's own registry).
- ``GET /dashboard``: a live page; its data is ``GET /dashboard/stats.json``.

Tenants: with API keys configured, ``Authorization: Bearer KEY`` is required
on ``/v1/*`` and the key names the tenant (401 otherwise); without keys the
optional ``X-Adaspec-Tenant`` header does, else the default tenant. The
operational endpoints (health, metrics, dashboard) need no key and show no
prompt or output text; bind to loopback or put them behind a proxy.

Finish reasons: "stop" (EOS, stop token, stop string), "length" (max_tokens,
the context window, or a cut by the server: ``adaspec.finish_detail`` is
"timeout" after ``request_timeout_s`` or "shutdown").

Errors are OpenAI error objects (``{"error": {"message", "type", "param",
"code"}}``): 400 for invalid or unsupported parameters, malformed JSON,
invalid UTF-8 and prompts beyond the context window; 401 bad key; 404 unknown
model or path; 429 (with Retry-After) when the queue is full; 503 while
shutting down.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import logging
import math
import re
import threading
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, AsyncIterator, Callable, Optional, Union

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import Gauge
from pydantic import BaseModel, ValidationError
from pydantic.json_schema import models_json_schema
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.staticfiles import StaticFiles

from adaspec.server.metrics import ServerMetrics
from adaspec.server.scheduler import (
    Chunk,
    Failed,
    Job,
    LogprobEntry,
    QueueFull,
    Scheduler,
    ShuttingDown,
    Started,
    queue_timeout_error,
)
from adaspec.server.schemas import (
    MAX_STOP_SEQUENCES,
    SEED_MAX,
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    NamedToolChoice,
    validation_error_to_api,
)
from adaspec.server.tools import ToolStreamParser, parse_tool_calls, render_messages, tools_listed
from adaspec import constraints
from adaspec.types import DEFAULT_TENANT, MAX_N, SamplingParams, is_greedy
from adaspec.server.snapshots import (
    DEFAULT_SNAPSHOT_INTERVAL_S,
    DEFAULT_SNAPSHOT_TOKENS,
    SnapshotSaver,
    collect_learned_state,
)

log = logging.getLogger("adaspec.server")

TENANT_HEADER = "X-Adaspec-Tenant"
_TENANT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:@-]{0,63}$")
DISCONNECT_POLL_S = 0.25  # how often a waiting non-streaming handler checks for a client disconnect
RETRY_AFTER_S = 1
LOGPROB_FLOOR = -9999.0  # sent for a logprob of -inf (JSON has no infinity)
STATIC_DIR = resources.files("adaspec.server") / "static"


@dataclass
class ServerState:
    """What the routes share; lives at ``app.state.adaspec``.

    Attributes:
        engine: the running engine (owned by ``scheduler``'s worker thread).
        scheduler: queue and worker.
        metrics: Prometheus registry and dashboard series.
        served_model_name: the id clients send as ``model``.
        api_keys: bearer token -> tenant; empty for an open server.
    """

    served_model_name: str
    api_keys: dict[str, str]
    request_timeout_s: Optional[float]
    metrics: ServerMetrics
    drain_timeout_s: float = 30.0
    engine: Any = None
    scheduler: Optional[Scheduler] = None
    snapshots: Optional[SnapshotSaver] = None
    admin_key: Optional[str] = None
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def max_model_len(self) -> int:
        return int(self.engine.target.max_model_len)


class _ClientGone(Exception):
    """The client disconnected while its request waited; nobody reads the answer."""


def create_app(
    engine_or_factory: Union[Any, Callable[[], Any]],
    served_model_name: Optional[str] = None,
    *,
    api_keys: Optional[dict[str, str]] = None,
    max_queue: int = 32,
    max_active: int = 8,
    request_timeout_s: Optional[float] = 600.0,
    state_store: Any = None,
    drain_timeout_s: float = 30.0,
    snapshot_interval_s: float = DEFAULT_SNAPSHOT_INTERVAL_S,
    snapshot_tokens: int = DEFAULT_SNAPSHOT_TOKENS,
    admin_key: Optional[str] = None,
    state_retention_s: Optional[float] = None,
    prefill_chunk: int = 256,
    prefix_cache_tokens: int = 0,
    shared_prefix_cache: bool = False,
) -> FastAPI:
    """Build the OpenAI-compatible app around an engine.

    Args:
        engine_or_factory: an :class:`adaspec.engine.Engine`, or a zero-argument
            callable returning one (called at start-up, off the event loop).
        served_model_name: the model id clients use; default: the target
            model's name. The target's own name is accepted as well.
        api_keys: bearer token -> tenant (see :func:`adaspec.server.main.load_api_keys`);
            None or empty: no authentication.
        max_queue: requests that may wait for an active slot; beyond it, 429. Default 32.
        max_active: requests decoded at once, interleaved step by step. Default 8.
        request_timeout_s: wall-clock limit per request from arrival; a request
            still decoding then finishes with "length" (finish_detail
            "timeout"), one still queued gets a 429. None: no limit. Default 600.
        state_store: optional snapshot store (``load(name) -> dict | None`` and
            ``save(name, state)``, e.g. :class:`adaspec.store.SnapshotStore`):
            speculators with learned state are restored from it at start-up,
            snapshotted while serving (see ``snapshot_interval_s``) and saved
            at shutdown.
        drain_timeout_s: at shutdown, how long in-flight requests may finish
            before they are cut. Default 30.
        snapshot_interval_s: with a ``state_store``, seconds between snapshots
            while something was learned (off the request path; see
            :mod:`adaspec.server.snapshots`); 0: only at shutdown. Default 60.
        snapshot_tokens: also snapshot after this many new prompt + generated
            tokens; 0: off. Default 50_000.
        admin_key: bearer token of the admin endpoints (``DELETE
            /admin/tenants/{tenant}/state``); None: they answer 403.
        state_retention_s: drop learned sequences last written more than this
            many seconds ago (checked at start-up and then every
            ``min(retention / 10, 60)`` s); None: keep until evicted by the bounds.
        prefill_chunk: most prompt tokens prefilled per batched step. Default 256.
        prefix_cache_tokens: KV positions the prefix cache may hold
            (:class:`adaspec.prefix_cache.PrefixCache`; lean runtime only); 0: off. Default 0.
        shared_prefix_cache: one prefix cache for every tenant (default: per tenant).

    Returns:
        The FastAPI app; run it with uvicorn. The engine worker starts and stops
        with the app's lifespan.
    """
    ctx = ServerState(served_model_name=served_model_name or "", api_keys=dict(api_keys or {}),
                      request_timeout_s=request_timeout_s, metrics=ServerMetrics(), drain_timeout_s=drain_timeout_s)
    ctx.admin_key = admin_key or None
    if state_retention_s is not None and not state_retention_s > 0:
        raise ValueError(f"state_retention_s must be > 0, got {state_retention_s}")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = engine_or_factory
        if not hasattr(engine, "step"):
            engine = await anyio.to_thread.run_sync(engine_or_factory)
        ctx.engine = engine
        ctx.served_model_name = ctx.served_model_name or engine.target.name
        if state_store is not None:
            await anyio.to_thread.run_sync(_load_learned_state, engine, state_store)
        if state_retention_s:
            await anyio.to_thread.run_sync(_forget_old, engine, state_retention_s)
        if prefix_cache_tokens > 0 and getattr(engine, "prefix_cache", False) is None:
            _attach_prefix_cache(engine, prefix_cache_tokens, shared_prefix_cache)
        ctx.metrics.prefix_cache = lambda: getattr(engine, "prefix_cache", None)
        scheduler = Scheduler(engine, ctx.metrics, max_active=max_active, max_queue=max_queue,
                              prefill_chunk=prefill_chunk)
        ctx.metrics.queue_depth = lambda: scheduler.queue_depth
        ctx.metrics.active_requests = lambda: scheduler.active_count
        ctx.metrics.speculators = lambda: dict(getattr(engine, "speculators", {}) or {})
        ctx.scheduler = scheduler
        scheduler.start()
        saver = None
        if state_store is not None:
            saver = _start_snapshots(ctx, engine, state_store, snapshot_interval_s, snapshot_tokens)
        retention = _Retention(ctx, engine, state_retention_s) if state_retention_s else None
        log.info("serving %s (context window %d)", ctx.served_model_name, ctx.max_model_len)
        try:
            yield
        finally:
            if retention is not None:
                retention.stop()
            await anyio.to_thread.run_sync(scheduler.shutdown, ctx.drain_timeout_s)
            if saver is not None:
                await anyio.to_thread.run_sync(saver.stop)
                await anyio.to_thread.run_sync(saver.snapshot)  # the worker has stopped: read directly
            if callable(getattr(engine, "close", None)):
                await anyio.to_thread.run_sync(engine.close)  # e.g. the online trainer process

    app = FastAPI(title="adaspec", version=_version(), lifespan=lifespan,
                  description="OpenAI-compatible API over adaspec's speculative decoding engine.")
    app.state.adaspec = ctx
    _install_error_handlers(app, ctx)
    _install_routes(app, ctx)
    app.openapi = lambda: _openapi(app, ctx)  # type: ignore[method-assign]
    app.mount("/static", StaticFiles(directory=str(STATIC_DIR)), name="static")
    return app


# ---------------------------------------------------------------- routes
def _install_routes(app: FastAPI, ctx: ServerState) -> None:
    @app.head("/health", include_in_schema=False)
    async def health_head() -> Response:
        """Liveness for probes that send HEAD (load balancers, ``curl -I``)."""
        return Response(status_code=200)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        """Liveness and load."""
        s = ctx.scheduler
        return {"status": "ok", "model": ctx.served_model_name,
                "active_requests": s.active_count if s else 0, "queue_depth": s.queue_depth if s else 0,
                "policy_version": getattr(ctx.engine, "policy_version", 0)}

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict[str, Any]:
        """The one served model, OpenAI's list shape."""
        _tenant(request, ctx)
        return {"object": "list", "data": [_model_card(ctx)]}

    @app.get("/v1/models/{model:path}")
    async def get_model(model: str, request: Request) -> dict[str, Any]:
        """One model by id; 404 for any other id."""
        _tenant(request, ctx)
        _check_model(model, ctx, param=None)
        return _model_card(ctx)

    @app.post("/v1/completions", openapi_extra=_request_body("CompletionRequest"))
    async def completions(request: Request) -> Response:
        """OpenAI text completions (one prompt, n=1)."""
        tenant = _tenant(request, ctx)
        req = _parse(await request.body(), CompletionRequest)
        _check_common(req, ctx)
        prompt = _single_prompt(req.prompt)
        max_tokens = req.max_tokens if req.max_tokens is not None else 16
        params = _sampling_params(req, ctx, max_tokens, logprobs=req.logprobs)
        job = Job(request_id=f"cmpl-{uuid.uuid4().hex}", params=params, prompt=prompt, tenant=tenant,
                  stream=req.stream, timeout_s=ctx.request_timeout_s, endpoint="completions")
        n = _num_choices(req)
        if n > 1:
            return await _run_n(request, ctx, _fan_out(job, n), req, lambda j: _CompletionFormat(ctx, j, req))
        return await _run(request, ctx, job, req, _CompletionFormat(ctx, job, req))

    @app.post("/v1/chat/completions", openapi_extra=_request_body("ChatCompletionRequest"))
    async def chat_completions(request: Request) -> Response:
        """OpenAI chat completions through the model's chat template (n=1)."""
        tenant = _tenant(request, ctx)
        req = _parse(await request.body(), ChatCompletionRequest)
        _check_common(req, ctx)
        if req.top_logprobs is not None and not req.logprobs:
            raise ApiError(400, "top_logprobs requires logprobs: true", param="top_logprobs")
        if (req.max_tokens is not None and req.max_completion_tokens is not None
                and req.max_tokens != req.max_completion_tokens):
            raise ApiError(400, "max_tokens and max_completion_tokens disagree; send one", param="max_tokens")
        messages = []
        for i, m in enumerate(req.messages):
            text = m.text()
            if m.tool_calls and m.role != "assistant":
                raise ApiError(400, "only assistant messages may carry tool_calls", param=f"messages[{i}].tool_calls")
            if m.role == "tool" and not m.tool_call_id:
                raise ApiError(400, "a tool message needs the tool_call_id it answers",
                               param=f"messages[{i}].tool_call_id")
            if m.tool_call_id is not None and m.role != "tool":
                raise ApiError(400, "only tool messages carry a tool_call_id", param=f"messages[{i}].tool_call_id")
            msg = {"role": "system" if m.role == "developer" else m.role, "content": text}
            if m.tool_calls:
                msg["tool_calls"] = [c.model_dump() for c in m.tool_calls]
            if m.name is not None:
                msg["name"] = m.name
            messages.append(msg)
        max_tokens = req.max_completion_tokens or req.max_tokens or ctx.max_model_len
        params = _sampling_params(req, ctx, max_tokens, logprobs=(req.top_logprobs or 0) if req.logprobs else None)
        tool_names = await anyio.to_thread.run_sync(_apply_tools_and_format, req, ctx, params)
        forced = req.tool_choice == "required" or isinstance(req.tool_choice, NamedToolChoice)
        if tool_names is not None and tools_listed(messages, forced):
            tools = [t.model_dump(exclude_none=True) for t in req.tools or []]
            messages = render_messages(messages, tools)
        elif any(m["role"] == "tool" or m.get("tool_calls") for m in messages):
            messages = render_messages(messages, None)
        job = Job(request_id=f"chatcmpl-{uuid.uuid4().hex}", params=params, messages=messages, tenant=tenant,
                  stream=req.stream, timeout_s=ctx.request_timeout_s, endpoint="chat")
        n = _num_choices(req)
        if n > 1:
            return await _run_n(request, ctx, _fan_out(job, n), req, lambda j: _ChatFormat(ctx, j, req, tool_names))
        return await _run(request, ctx, job, req, _ChatFormat(ctx, job, req, tool_names))

    @app.delete("/admin/tenants/{tenant}/state")
    async def delete_tenant_state(tenant: str, request: Request) -> dict[str, Any]:
        """Delete a tenant's learned state from memory and from the snapshots on disk (admin key)."""
        _check_admin(request, ctx)
        if not _TENANT_RE.match(tenant):
            raise ApiError(400, "invalid tenant: 1-64 characters of letters, digits and _.:@-, starting with a "
                           "letter or digit", param="tenant", code="invalid_tenant")
        engine = ctx.engine
        forgotten = await anyio.to_thread.run_sync(lambda: ctx.scheduler.run_between_steps(
            lambda: _forget_tenant(engine, tenant)).result(120.0))
        written = None
        if ctx.snapshots is not None:  # the files on disk lose the tenant now, not at the next interval
            written = await anyio.to_thread.run_sync(ctx.snapshots.snapshot)
        return {"tenant": tenant, "deleted": True, "forgotten_records": forgotten, "snapshot_written": written}

    @app.post("/admin/weights")
    async def update_weights(request: Request) -> dict[str, Any]:
        """Load new policy weights into the running target (admin key; RL trainers).

        Body: JSON ``{"path": FILE_OR_FOLDER, "calibration": "initial"|"recalibrate"}``
        (a safetensors file or folder readable by the server), or the
        safetensors bytes themselves with ``Content-Type: application/octet-stream``.
        Requests running keep the weights they started on; later ones get the new.
        """
        _check_admin(request, ctx)
        return await _update_weights(request, ctx)

    @app.get("/metrics")
    async def metrics() -> Response:
        """Prometheus metrics."""
        return Response(ctx.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/dashboard", response_class=HTMLResponse)
    async def dashboard() -> HTMLResponse:
        """The live dashboard page (polls /dashboard/stats.json)."""
        return HTMLResponse((STATIC_DIR / "dashboard.html").read_text(encoding="utf-8"))

    @app.get("/dashboard/stats.json")
    async def dashboard_stats() -> dict[str, Any]:
        """Throughput, acceptance per speculator, controller choices, recent requests."""
        snap = ctx.metrics.snapshot()
        engine = ctx.engine
        snap["model"] = ctx.served_model_name
        snap["max_model_len"] = ctx.max_model_len
        snap["speculators"] = sorted(getattr(engine, "speculators", {}) or {})
        snap["peak_active_requests"] = ctx.scheduler.peak_active if ctx.scheduler else 0
        return snap


async def _run(request: Request, ctx: ServerState, job: Job, req: Any, fmt: "_Format") -> Response:
    """Queue the job, wait for its prefill, then stream or collect its output."""
    scheduler = ctx.scheduler
    job.bind()
    try:
        scheduler.submit(job)
    except QueueFull:
        raise ApiError(429, f"the server is busy: {scheduler.max_active} requests are running and "
                       f"{scheduler.max_queue} are waiting; retry later", type="rate_limit_error",
                       code="queue_full", headers={"Retry-After": str(RETRY_AFTER_S)})
    except ShuttingDown:
        raise ApiError(503, "the server is shutting down", type="server_error", code="shutting_down")
    try:
        started = await _wait(request, ctx, job, Started)
        if req.stream:
            return StreamingResponse(_sse(ctx, job, fmt, started.prompt_tokens), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        final = await _wait(request, ctx, job, Chunk)
    except _ClientGone:
        return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
    except BaseException:  # failed, or this handler was cancelled (e.g. server shutdown): free the slot
        ctx.scheduler.cancel(job)
        raise
    return JSONResponse(fmt.full(final, started.prompt_tokens))


async def _wait(request: Request, ctx: ServerState, job: Job, kind: type) -> Any:
    """The job's next event of ``kind``, watching for a disconnect and the queue timeout.

    Raises:
        ApiError: the job failed (400 for a bad prompt, 429 queue timeout, 500 otherwise).
        _ClientGone: the client disconnected (the job is cancelled).
    """
    while True:
        ev = await job.next_event(DISCONNECT_POLL_S)
        if ev is None:
            if await request.is_disconnected():
                ctx.scheduler.cancel(job)
                raise _ClientGone()
            if kind is Started and time.perf_counter() > job.deadline_s:  # still queued: give up
                ctx.scheduler.cancel(job)
                raise queue_timeout_error(job.timeout_s)
            continue
        if isinstance(ev, Failed):
            raise _stream_error(ev)  # its own ApiError, else a 500 naming only the exception type
        if isinstance(ev, kind):
            return ev


def _stream_error(ev: Failed) -> ApiError:
    """The error object a stream ends with: the job's own ApiError, else a 500 naming only the exception type."""
    if isinstance(ev.error, ApiError):
        return ev.error
    return ApiError(500, f"internal error: {type(ev.error).__name__}", type="server_error", code="internal_error")


async def _sse(ctx: ServerState, job: Job, fmt: "_Format", prompt_tokens: int) -> AsyncIterator[str]:
    """Server-sent events; cancelling this generator (client gone) cancels the job."""
    try:
        for payload in fmt.stream_start():
            yield _event(payload)
        while True:
            ev = await job.events.get()
            if isinstance(ev, Failed):
                yield _event(_stream_error(ev).body())
                break
            if not isinstance(ev, Chunk):
                continue
            for payload in fmt.stream_chunk(ev, prompt_tokens):
                yield _event(payload)
            if ev.finish_reason is not None:
                break
        yield "data: [DONE]\n\n"
    finally:
        ctx.scheduler.cancel(job)  # no-op once finished; frees it when the client left early


def _event(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


# ---------------------------------------------------------------- n choices, weight updates
def _num_choices(req: Any) -> int:
    """``n`` as an int in 1..MAX_N (None: 1); anything else is a 400 naming ``n``."""
    n = req.n
    if n is None:
        return 1
    if isinstance(n, bool) or not isinstance(n, int):
        raise ApiError(400, f"n must be an integer, got {_short_repr(n)}", param="n", code="invalid_value")
    if not 1 <= n <= MAX_N:
        raise ApiError(400, f"n must be in [1, {MAX_N}], got {n}", param="n", code="invalid_value")
    return n


def _short_repr(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _fan_out(job: Job, n: int) -> list[Job]:
    """``n`` jobs for one request's ``n`` choices: one prefill shared, choice i seeded ``seed + i``
    (modulo 2**64, into the accepted seed range: seeds are taken modulo 2**64 everywhere)."""
    jobs = []
    for i in range(n):
        seed = job.params.seed
        if seed is not None:
            seed += i
            if seed > SEED_MAX:
                seed -= 2**64
        params = job.params if seed is None else dataclasses.replace(job.params, seed=seed)
        jobs.append(dataclasses.replace(job, request_id=f"{job.request_id}-{i}", params=params,
                                        share_prefill=(job.request_id, n), group_id=job.request_id,
                                        events=None, loop=None, cancelled=threading.Event()))
    return jobs


async def _run_n(request: Request, ctx: ServerState, jobs: list[Job], req: Any,
                 make_format: Callable[[Job], "_Format"]) -> Response:
    """:func:`_run` for the ``n`` jobs of one request: choices by index, usage summed once."""
    scheduler = ctx.scheduler
    capacity = scheduler.max_active + scheduler.max_queue
    if len(jobs) > capacity:  # could never fit: not a "retry later"
        raise ApiError(400, f"n={len(jobs)} exceeds this server's capacity of {capacity} concurrent choices "
                       f"(--max-active {scheduler.max_active} + --max-queue {scheduler.max_queue})", param="n",
                       code="invalid_value")
    submitted: list[Job] = []
    try:
        for job in jobs:
            job.bind()
            scheduler.submit(job)
            submitted.append(job)
    except QueueFull:
        for job in submitted:
            scheduler.cancel(job)
        raise ApiError(429, f"the server is busy: {len(jobs)} choices do not fit the queue ({scheduler.max_queue} "
                       "waiting at most); retry later or lower n", type="rate_limit_error", code="queue_full",
                       headers={"Retry-After": str(RETRY_AFTER_S)})
    except ShuttingDown:
        for job in submitted:
            scheduler.cancel(job)
        raise ApiError(503, "the server is shutting down", type="server_error", code="shutting_down")
    fmts = [make_format(job) for job in jobs]
    try:
        prompt_tokens = 0
        for job in jobs:
            prompt_tokens = (await _wait(request, ctx, job, Started)).prompt_tokens
        if req.stream:
            return StreamingResponse(_sse_n(ctx, jobs, fmts, req, prompt_tokens), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        finals = [await _wait(request, ctx, job, Chunk) for job in jobs]
    except _ClientGone:
        for job in jobs:
            scheduler.cancel(job)
        return Response(status_code=499)
    except BaseException:
        for job in jobs:
            scheduler.cancel(job)
        raise
    bodies = [fmt.full(final, prompt_tokens) for fmt, final in zip(fmts, finals)]
    body = bodies[0]
    body["choices"] = [_reindex_choice(b["choices"][0], i) for i, b in enumerate(bodies)]
    completion = sum(b["usage"]["completion_tokens"] for b in bodies)
    body["usage"] = {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                     "total_tokens": prompt_tokens + completion}
    body["adaspec"] = {**bodies[0]["adaspec"], "choices": [b["adaspec"] for b in bodies]}
    return JSONResponse(body)


def _reindex_choice(choice: dict[str, Any], index: int) -> dict[str, Any]:
    choice["index"] = index
    return choice


async def _sse_n(ctx: ServerState, jobs: list[Job], fmts: list["_Format"], req: Any,
                 prompt_tokens: int) -> AsyncIterator[str]:
    """Server-sent events of ``n`` jobs merged as they come: each chunk's choice carries its index,
    one usage chunk (summed) at the end when asked for, one ``[DONE]``."""
    merged: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, job: Job) -> None:
        while True:
            ev = await job.events.get()
            await merged.put((i, ev))
            if isinstance(ev, Failed) or (isinstance(ev, Chunk) and ev.finish_reason is not None):
                return

    tasks = [asyncio.ensure_future(pump(i, job)) for i, job in enumerate(jobs)]
    try:
        for i, fmt in enumerate(fmts):
            for payload in fmt.stream_start():
                payload["choices"] = [_reindex_choice(c, i) for c in payload["choices"]]
                yield _event(payload)
        finished, completion, last_adaspec = 0, 0, None
        while finished < len(jobs):
            i, ev = await merged.get()
            if isinstance(ev, Failed):
                yield _event(_stream_error(ev).body())
                break
            if not isinstance(ev, Chunk):
                continue
            for payload in fmts[i].stream_chunk(ev, prompt_tokens):
                if not payload["choices"] and "usage" in payload:  # the per-job usage chunk: summed below
                    completion += payload["usage"]["completion_tokens"]
                    last_adaspec = payload.get("adaspec")
                    continue
                payload["choices"] = [_reindex_choice(c, i) for c in payload["choices"]]
                yield _event(payload)
            if ev.finish_reason is not None:
                finished += 1
        else:
            if req.include_usage:
                usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                         "total_tokens": prompt_tokens + completion}
                yield _event({**fmts[0]._head(fmts[0].object_chunk), "choices": [], "usage": usage,
                              "adaspec": last_adaspec})
        yield "data: [DONE]\n\n"
    finally:
        for t in tasks:
            t.cancel()
        for job in jobs:
            ctx.scheduler.cancel(job)


async def _update_weights(request: Request, ctx: ServerState) -> dict[str, Any]:
    """``POST /admin/weights``: prepare the new weights off the worker, swap them between steps."""
    from adaspec.weights import CALIBRATIONS, prepare_weights

    engine = ctx.engine
    raw = await request.body()
    calibration = "initial"
    if (request.headers.get("content-type") or "").split(";")[0].strip() == "application/octet-stream":
        try:
            from safetensors.torch import load as load_safetensors

            source: Any = load_safetensors(raw)
        except Exception as e:
            raise ApiError(400, f"the body is not a safetensors file: {e}", param="body", code="invalid_weights")
        calibration = request.query_params.get("calibration", "initial")
    else:
        body = _parse_json_object(raw)
        unknown = sorted(set(body) - {"path", "calibration"})
        if unknown:
            raise ApiError(400, f"unknown field {unknown[0]!r} (expected path, calibration)", param=unknown[0])
        source = body.get("path")
        calibration = body.get("calibration", "initial")
        if not isinstance(source, str) or not source:
            raise ApiError(400, "path must be a safetensors file or folder on the server", param="path")
    if calibration not in CALIBRATIONS:
        raise ApiError(400, f"calibration must be one of {list(CALIBRATIONS)}, got {_short_repr(calibration)}",
                       param="calibration", code="invalid_value")
    lock = ctx.__dict__.setdefault("weights_lock", asyncio.Lock())  # one update at a time
    async with lock:
        try:
            prepared = await anyio.to_thread.run_sync(prepare_weights, engine.target, source, calibration)
        except ValueError as e:
            raise ApiError(400, str(e), param="path", code="invalid_weights")
        try:
            version = await anyio.to_thread.run_sync(
                lambda: ctx.scheduler.run_between_steps(lambda: engine.apply_weights(prepared)).result(300.0))
        except RuntimeError as e:  # the transformers runtime with requests running
            raise ApiError(409, str(e), type="invalid_request_error", code="requests_running")
    return {"policy_version": version, "tensors": prepared.num_tensors, "calibration": calibration,
            "dtype": engine.target.dtype}


def _parse_json_object(raw: bytes) -> dict[str, Any]:
    """Decode a JSON object body; every failure (empty, not UTF-8, not JSON, nested too deeply, not an
    object, a lone surrogate in any string) is a 400 naming the problem."""
    if not raw.strip():
        raise ApiError(400, "the request body is empty; expected a JSON object", code="invalid_json")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError(400, f"the request body is not valid UTF-8 (byte {e.start}: {e.reason})",
                       code="invalid_encoding")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ApiError(400, f"the request body is not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})",
                       code="invalid_json")
    except RecursionError:
        raise ApiError(400, "the request body is nested too deeply", code="invalid_json")
    if not isinstance(obj, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(obj).__name__}",
                       code="invalid_json")
    _check_strings(obj)
    return obj


# ---------------------------------------------------------------- response shapes
class _Format:
    """Builds one endpoint's response bodies and stream chunks."""

    object_full = ""
    object_chunk = ""

    def __init__(self, ctx: ServerState, job: Job, req: Any) -> None:
        self.ctx = ctx
        self.job = job
        self.req = req
        self.created = int(time.time())

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.job.group_id or self.job.request_id, "object": obj, "created": self.created,
                "model": self.ctx.served_model_name}

    def _usage(self, final: Chunk, prompt_tokens: int) -> dict[str, int]:
        return final.result.usage.to_dict() if final.result else {
            "prompt_tokens": prompt_tokens, "completion_tokens": 0, "total_tokens": prompt_tokens}

    def adaspec(self, final: Chunk) -> dict[str, Any]:
        """The ``adaspec`` extension: the request's speculation stats and timing."""
        result = final.result
        out = result.speculation.to_dict() if result else {}
        steps = out.get("steps_by_speculator", {})
        total = sum(steps.values())
        out["speculator_shares"] = {k: v / total for k, v in steps.items()} if total else {}
        out["tenant"] = self.job.tenant
        out["ttft_s"] = final.ttft_s
        out["elapsed_s"] = result.elapsed_s if result else None
        out["finish_detail"] = final.finish_detail
        return out

    def full(self, final: Chunk, prompt_tokens: int) -> dict[str, Any]:
        raise NotImplementedError

    def stream_start(self) -> list[dict[str, Any]]:
        return []

    def stream_chunk(self, chunk: Chunk, prompt_tokens: int) -> list[dict[str, Any]]:
        raise NotImplementedError

    def _tail(self, final: Chunk, prompt_tokens: int, finish_choice: dict[str, Any]) -> list[dict[str, Any]]:
        """The finish chunk (with ``adaspec``), then the usage chunk when asked for."""
        out = []
        last = {**self._head(self.object_chunk), "choices": [finish_choice]}
        if self.req.include_usage:
            last["usage"] = None
        last["adaspec"] = self.adaspec(final)
        out.append(last)
        if self.req.include_usage:
            out.append({**self._head(self.object_chunk), "choices": [], "usage": self._usage(final, prompt_tokens),
                        "adaspec": last["adaspec"]})
        return out

    def _with_usage_field(self, payload: dict[str, Any]) -> dict[str, Any]:
        if self.req.include_usage:
            payload["usage"] = None
        return payload


class _CompletionFormat(_Format):
    object_full = "text_completion"
    object_chunk = "text_completion"

    def __init__(self, ctx: ServerState, job: Job, req: Any) -> None:
        super().__init__(ctx, job, req)
        self.text_offset = 0

    def _logprobs(self, entries: Optional[list[LogprobEntry]]) -> Optional[dict[str, Any]]:
        if entries is None:
            return None
        offsets = []
        for e in entries:
            offsets.append(self.text_offset)
            self.text_offset += len(e.token)
        return {"tokens": [e.token for e in entries], "token_logprobs": [_finite(e.logprob) for e in entries],
                "top_logprobs": [{t: _finite(lp) for t, _, lp in e.top} for e in entries], "text_offset": offsets}

    def full(self, final: Chunk, prompt_tokens: int) -> dict[str, Any]:
        choice = {"index": 0, "text": final.text, "logprobs": self._logprobs(final.logprobs),
                  "finish_reason": final.finish_reason}
        return {**self._head(self.object_full), "choices": [choice], "usage": self._usage(final, prompt_tokens),
                "adaspec": self.adaspec(final)}

    def stream_chunk(self, chunk: Chunk, prompt_tokens: int) -> list[dict[str, Any]]:
        out = []
        if chunk.text or chunk.logprobs:
            choice = {"index": 0, "text": chunk.text, "logprobs": self._logprobs(chunk.logprobs),
                      "finish_reason": None}
            out.append(self._with_usage_field({**self._head(self.object_chunk), "choices": [choice]}))
        if chunk.finish_reason is not None:
            finish = {"index": 0, "text": "", "logprobs": None, "finish_reason": chunk.finish_reason}
            out.extend(self._tail(chunk, prompt_tokens, finish))
        return out


class _ChatFormat(_Format):
    """Chat bodies and chunks; with ``tool_names`` the output is parsed into ``tool_calls`` (adaspec.server.tools)."""

    object_full = "chat.completion"
    object_chunk = "chat.completion.chunk"

    def __init__(self, ctx: ServerState, job: Job, req: Any, tool_names: Optional[list[str]] = None) -> None:
        super().__init__(ctx, job, req)
        self.tool_names = tool_names
        self.parser = ToolStreamParser(tool_names) if tool_names is not None else None

    @staticmethod
    def _finish(reason: Optional[str], calls: list) -> Optional[str]:
        return "tool_calls" if calls and reason == "stop" else reason

    @staticmethod
    def _logprobs(entries: Optional[list[LogprobEntry]]) -> Optional[dict[str, Any]]:
        if entries is None:
            return None
        return {"content": [
            {"token": e.token, "logprob": _finite(e.logprob), "bytes": e.bytes,
             "top_logprobs": [{"token": t, "logprob": _finite(lp), "bytes": b} for t, b, lp in e.top]}
            for e in entries], "refusal": None}

    def full(self, final: Chunk, prompt_tokens: int) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": final.text}
        finish = final.finish_reason
        if self.tool_names is not None:
            content, calls = parse_tool_calls(final.text, self.tool_names)
            message["content"] = content
            if calls:
                message["tool_calls"] = calls
            finish = self._finish(finish, calls)
        choice = {"index": 0, "message": message, "logprobs": self._logprobs(final.logprobs), "finish_reason": finish}
        return {**self._head(self.object_full), "choices": [choice], "usage": self._usage(final, prompt_tokens),
                "adaspec": self.adaspec(final)}

    def stream_start(self) -> list[dict[str, Any]]:
        choice = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                  "finish_reason": None}
        return [self._with_usage_field({**self._head(self.object_chunk), "choices": [choice]})]

    def stream_chunk(self, chunk: Chunk, prompt_tokens: int) -> list[dict[str, Any]]:
        out = []
        text, calls = chunk.text, []
        if self.parser is not None:
            text, calls = self.parser.feed(chunk.text, final=chunk.finish_reason is not None)
        if text or chunk.logprobs:
            choice = {"index": 0, "delta": {"content": text}, "logprobs": self._logprobs(chunk.logprobs),
                      "finish_reason": None}
            out.append(self._with_usage_field({**self._head(self.object_chunk), "choices": [choice]}))
        first = len(self.parser.calls) - len(calls) if self.parser is not None else 0
        for j, call in enumerate(calls):  # OpenAI's delta form: id, type and name first, then the arguments
            fn = call["function"]
            head = {"index": first + j, "id": call["id"], "type": "function",
                    "function": {"name": fn["name"], "arguments": ""}}
            for delta in ({"tool_calls": [head]},
                          {"tool_calls": [{"index": first + j, "function": {"arguments": fn["arguments"]}}]}):
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}
                out.append(self._with_usage_field({**self._head(self.object_chunk), "choices": [choice]}))
        if chunk.finish_reason is not None:
            reason = chunk.finish_reason
            if self.parser is not None:
                reason = self._finish(reason, self.parser.calls)
            finish = {"index": 0, "delta": {}, "logprobs": None, "finish_reason": reason}
            out.extend(self._tail(chunk, prompt_tokens, finish))
        return out


def _finite(logprob: float) -> float:
    """JSON has no -inf: an impossible token's logprob is sent as -9999.0, as OpenAI does."""
    return logprob if math.isfinite(logprob) else LOGPROB_FLOOR


# ---------------------------------------------------------------- request checks
def _parse(raw: bytes, model: type[BaseModel]) -> Any:
    """Decode and validate a JSON body; every failure is a 400 naming the problem."""
    obj = _parse_json_object(raw)
    try:
        return model.model_validate(obj)
    except ValidationError as e:
        raise validation_error_to_api(e)
    except RecursionError:
        raise ApiError(400, "the request body is nested too deeply", code="invalid_json")


def _check_common(req: Any, ctx: ServerState) -> None:
    _check_model(req.model, ctx, param="model")
    _num_choices(req)
    bad = req.unsupported()
    if bad:
        names = ", ".join(name for name, _ in bad)
        raise ApiError(400, f"unsupported parameter{'s' if len(bad) > 1 else ''} ({names}): "
                       + "; ".join(reason for _, reason in bad), param=bad[0][0], code="unsupported_parameter")
    if req.stream_options is not None and not req.stream:
        raise ApiError(400, "stream_options is only allowed when stream is true", param="stream_options")
    stops = req.stop_list()
    if len(stops) > MAX_STOP_SEQUENCES:
        raise ApiError(400, f"at most {MAX_STOP_SEQUENCES} stop sequences are supported, got {len(stops)}",
                       param="stop")
    vocab = int(ctx.engine.target.vocab_size)
    for i, t in enumerate(getattr(req, "stop_token_ids", None) or []):
        if not 0 <= t < vocab:
            raise ApiError(400, f"stop_token_ids[{i}]={t} is not a token id (0..{vocab - 1})",
                           param="stop_token_ids", code="invalid_value")
    for name in ("max_tokens", "max_completion_tokens"):
        value = getattr(req, name, None)
        if value is not None and value > ctx.max_model_len:
            raise ApiError(400, f"{name}={value} exceeds the context window of {ctx.max_model_len} tokens",
                           param=name, code="invalid_value")


def _check_model(model: str, ctx: ServerState, param: Optional[str]) -> None:
    if model not in (ctx.served_model_name, ctx.engine.target.name):
        raise ApiError(404, f"The model '{model}' does not exist; this server serves '{ctx.served_model_name}'",
                       param=param, code="model_not_found")


def _check_strings(obj: Any) -> None:
    """Every string of a decoded JSON body (keys included) is valid Unicode: JSON's ``\\ud800``
    escapes decode to lone surrogates, which no tokenizer, grammar or response encoder takes.

    Raises:
        ApiError: 400 ``invalid_encoding`` naming the first such field (``tools[0].function.name``).
    """
    stack: list[tuple[Any, str]] = [(obj, "")]
    while stack:
        value, path = stack.pop()
        if isinstance(value, str):
            _check_text(value, path or "body")
        elif isinstance(value, dict):
            for key, item in value.items():
                _check_text(key, f"{path}.<key>" if path else "<key>")
                stack.append((item, f"{path}.{key}" if path else key))
        elif isinstance(value, list):
            stack.extend((item, f"{path}[{i}]") for i, item in enumerate(value))


def _check_text(text: str, param: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError(400, f"'{param}' is not valid Unicode (it holds a lone surrogate)", param=param,
                       code="invalid_encoding")


def _single_prompt(prompt: Any) -> Any:
    """One prompt (text or token ids) from OpenAI's prompt forms."""
    if isinstance(prompt, str):
        return prompt
    if prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise ApiError(400, f"exactly one prompt per request is supported, got {len(prompt)}",
                           param="prompt", code="unsupported_parameter")
        return _single_prompt(prompt[0])
    return list(prompt)


def _logit_bias(req: Any, ctx: ServerState) -> dict[int, float]:
    """``logit_bias`` with token-id keys; a key that is not a token id is a 400."""
    out = {}
    vocab = ctx.engine.target.vocab_size
    for key, bias in (req.logit_bias or {}).items():
        if not re.fullmatch(r"\d{1,9}", key) or int(key) >= vocab:
            raise ApiError(400, f"logit_bias key {key!r} is not a token id (0..{vocab - 1})", param="logit_bias",
                           code="invalid_value")
        out[int(key)] = float(bias)
    return out


def _apply_tools_and_format(req: ChatCompletionRequest, ctx: ServerState, params: SamplingParams
                            ) -> Optional[list[str]]:
    """Check ``tools`` / ``tool_choice`` / ``response_format``; set the grammar they need on ``params``.

    Returns:
        the callable function names when the output is to be parsed for tool
        calls (``tool_choice`` other than ``none``), else None.

    Raises:
        ApiError: 400 naming the parameter: duplicate function names, a
            ``tool_choice`` without tools or naming an unknown function, a
            forced ``tool_choice`` with a ``response_format`` other than text, a
            malformed parameters or response schema.
    """
    tools = req.tools or []
    names = [t.function.name for t in tools]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise ApiError(400, f"tools[{i}]: function name {name!r} is used twice", param=f"tools[{i}].function.name")
    choice = req.tool_choice if req.tool_choice is not None else ("auto" if tools else "none")
    if choice != "none" and not tools:
        raise ApiError(400, "tool_choice needs tools", param="tool_choice")
    if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
        raise ApiError(400, f"tool_choice names function {choice.function.name!r}, which is not among the tools "
                       f"({', '.join(names)})", param="tool_choice.function.name", code="invalid_value")
    if req.parallel_tool_calls is not None and not tools:
        raise ApiError(400, "parallel_tool_calls needs tools", param="parallel_tool_calls")
    engine = ctx.engine
    tok, vocab = engine.tokenizer, engine.target.vocab_size

    def compiled(grammar_of, param: str) -> str:
        try:
            g = grammar_of()
            constraints.check_grammar(g, tok, vocab)
            return g
        except ValueError as e:
            raise ApiError(400, f"invalid JSON schema in '{param}': {e}"[:2000], param=param, code="invalid_schema")

    for i, t in enumerate(tools):
        if t.function.parameters is not None:
            compiled(lambda: constraints.json_schema_grammar(t.function.parameters), f"tools[{i}].function.parameters")
    fmt = req.response_format
    grammar = None
    if fmt is not None and fmt.type != "text" and params.ignore_eos:
        raise ApiError(400, "ignore_eos cannot be combined with a response_format", param="ignore_eos")
    if fmt is not None and fmt.type == "json_object":
        grammar = constraints.json_object_grammar()
    elif fmt is not None and fmt.type == "json_schema":
        if fmt.json_schema is None or fmt.json_schema.schema_ is None:
            raise ApiError(400, "response_format json_schema needs json_schema.schema",
                           param="response_format.json_schema")
        schema = fmt.json_schema.schema_
        grammar = compiled(lambda: constraints.json_schema_grammar(schema), "response_format.json_schema.schema")
    if choice == "required" or isinstance(choice, NamedToolChoice):
        if fmt is not None and fmt.type != "text":  # the output is forced to be a tool call: no format can apply
            raise ApiError(400, f"response_format {fmt.type!r} cannot be combined with a forced tool_choice (the "
                           "output must be a tool call); constrain the call's arguments with the function's "
                           "parameters schema instead", param="response_format")
        if params.ignore_eos:
            raise ApiError(400, "ignore_eos cannot be combined with a forced tool_choice", param="ignore_eos")
        chosen = [t for t in tools if choice == "required" or t.function.name == choice.function.name]
        parallel = choice == "required" and req.parallel_tool_calls is not False
        grammar = compiled(lambda: constraints.tool_calls_grammar(
            [(t.function.name, t.function.parameters) for t in chosen], parallel=parallel,
            tags=constraints.tool_tag_terminals(tok)), "tools")
    params.grammar = grammar
    return None if choice == "none" else names


def _sampling_params(req: Any, ctx: ServerState, max_tokens: int, logprobs: Optional[int]) -> SamplingParams:
    params = SamplingParams(
        max_tokens=max_tokens,
        # Below 1e-5, logits / temperature can overflow to inf (NaN probabilities); such a
        # temperature is greedy in all but name, so decode greedily (vLLM's _SAMPLING_EPS).
        temperature=0.0 if is_greedy(req.temperature) else float(req.temperature),
        top_p=float(req.top_p),
        top_k=0 if req.top_k == -1 else req.top_k,  # vLLM's -1 means off, as does 0
        seed=req.seed,
        stop=req.stop_list(),
        stop_token_ids=list(req.stop_token_ids or []),
        ignore_eos=req.ignore_eos,
        logprobs=logprobs,
        learn=req.adaspec.learn if req.adaspec is not None else True,
        logit_bias=_logit_bias(req, ctx),
        presence_penalty=float(req.presence_penalty),
        frequency_penalty=float(req.frequency_penalty),
        min_p=float(req.min_p),
    )
    try:
        params.validate()
    except ValueError as e:
        raise ApiError(400, str(e), param=str(e).split(" ", 1)[0], code="invalid_value")
    return params


def _tenant(request: Request, ctx: ServerState) -> str:
    """The tenant of a request: from its API key when keys are configured, else the header."""
    if ctx.api_keys:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise ApiError(401, "missing API key: send 'Authorization: Bearer YOUR_KEY'", code="invalid_api_key")
        for key, tenant in ctx.api_keys.items():
            if hmac.compare_digest(key.encode(), token.encode()):
                return tenant
        raise ApiError(401, "Incorrect API key provided", code="invalid_api_key")
    tenant = request.headers.get(TENANT_HEADER)
    if tenant is None:
        return DEFAULT_TENANT
    if not _TENANT_RE.match(tenant):
        raise ApiError(400, f"invalid {TENANT_HEADER} header: 1-64 characters of letters, digits and _.:@-, "
                       "starting with a letter or digit", param=TENANT_HEADER, code="invalid_tenant")
    return tenant


def _check_admin(request: Request, ctx: ServerState) -> None:
    """401 without the admin key (or with a wrong one); 403 when no admin key is configured."""
    if not ctx.admin_key:
        raise ApiError(403, "admin endpoints are disabled: start the server with --admin-key "
                       "(or ADASPEC_ADMIN_KEY)", type="permission_error", code="admin_disabled")
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or not hmac.compare_digest(token.encode(), ctx.admin_key.encode()):
        raise ApiError(401, "admin endpoints need 'Authorization: Bearer ADMIN_KEY'", code="invalid_admin_key")


def _model_card(ctx: ServerState) -> dict[str, Any]:
    return {"id": ctx.served_model_name, "object": "model", "created": ctx.created, "owned_by": "adaspec",
            "max_model_len": ctx.max_model_len}


# ---------------------------------------------------------------- errors
class _AsciiJSONResponse(JSONResponse):
    """Error bodies as ASCII JSON: a message that quotes the client's text (a model name, a path)
    stays encodable whatever that text holds (a lone surrogate would make UTF-8 encoding fail)."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def _install_error_handlers(app: FastAPI, ctx: ServerState) -> None:
    def respond(err: ApiError) -> JSONResponse:
        ctx.metrics.record_error(err.status, err.code)
        return _AsciiJSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return respond(exc)

    @app.exception_handler(RequestValidationError)
    async def request_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        loc = errors[0].get("loc", ()) if errors else ()
        param = ".".join(str(p) for p in loc[1:]) or None
        msg = errors[0].get("msg", "invalid request") if errors else "invalid request"
        return respond(ApiError(400, f"Invalid value for '{param}': {msg}" if param else msg, param=param,
                                code="invalid_value"))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        message = f"{request.method} {request.url.path}: {exc.detail}"
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return respond(ApiError(exc.status_code, message, type=kind, code=code,
                                headers=dict(exc.headers or {})))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return respond(ApiError(500, f"internal error: {type(exc).__name__}", type="server_error",
                                code="internal_error"))


# ---------------------------------------------------------------- OpenAPI
def _request_body(schema_name: str) -> dict[str, Any]:
    """``openapi_extra`` declaring a JSON body that the route parses itself (for 400s, not 422s)."""
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{schema_name}"}}}}}


def _openapi(app: FastAPI, ctx: ServerState) -> dict[str, Any]:
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    _, defs = models_json_schema([(CompletionRequest, "validation"), (ChatCompletionRequest, "validation")],
                                 ref_template="#/components/schemas/{model}")
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components.update(defs["$defs"])
    for model in (CompletionRequest, ChatCompletionRequest):
        props = components[model.__name__]["properties"]
        for name, (allowed, reason) in model.unsupported_table.items():  # accepted only at their no-op value
            props[name] = {"enum": list(allowed), "default": None, "description": f"Unsupported: {reason}."}
        if ctx.engine is not None:  # the one valid model id, the context window and vocabulary, as checked
            props["model"]["enum"] = [ctx.served_model_name]
            for key in ("max_tokens", "max_completion_tokens"):
                if key in props:
                    _set_maximum(props[key], ctx.max_model_len)
            if "prompt" in props:
                _set_token_id_range(props["prompt"], int(ctx.engine.target.vocab_size) - 1)
    app.openapi_schema = schema
    return schema


def _set_token_id_range(schema: Any, max_id: int) -> None:
    """Bound every integer in ``schema`` (the prompt's token-id lists) to the vocabulary."""
    if isinstance(schema, dict):
        if schema.get("type") == "integer":
            schema["minimum"], schema["maximum"] = 0, max_id
        for value in schema.values():
            _set_token_id_range(value, max_id)
    elif isinstance(schema, list):
        for value in schema:
            _set_token_id_range(value, max_id)


def _set_maximum(prop: dict[str, Any], maximum: int) -> None:
    for alt in prop.get("anyOf", [prop]):
        if alt.get("type") == "integer":
            alt["maximum"] = maximum


# ---------------------------------------------------------------- learned state
def _load_learned_state(engine: Any, store: Any) -> None:
    """Restore every part's learned state from ``store`` (a missing or bad snapshot: that part starts empty)."""
    from adaspec.config import restore_state

    for name in restore_state(store, engine, log=log.warning):
        log.info("restored learned state %s", name)


def _attach_prefix_cache(engine: Any, max_tokens: int, shared: bool) -> None:
    """Give the engine a prefix cache (lean runtime only; elsewhere prefix reuse stays off, logged)."""
    from adaspec.prefix_cache import PrefixCache

    try:
        engine.prefix_cache = PrefixCache(engine.target, max_tokens, shared=shared)
    except ValueError as e:
        log.info("prefix reuse off: %s", e)


def _forget_tenant(engine: Any, tenant: str) -> int:
    """Drop a tenant's learned state and its cached prefixes (on the engine thread)."""
    cache = getattr(engine, "prefix_cache", None)
    if cache is not None:
        cache.forget_tenant(tenant)
    return sum(s.forget_tenant(tenant) for s in (engine.speculators or {}).values())


def _forget_old(engine: Any, retention_s: float) -> int:
    """Retention: each speculator drops what it learned more than ``retention_s`` ago (call on the engine thread)."""
    dropped = 0
    for name, spec in (getattr(engine, "speculators", {}) or {}).items():
        try:
            dropped += int(spec.forget_older_than(retention_s) or 0)
        except Exception:
            log.exception("retention failed for speculator %s", name)
    return dropped


class _Retention:
    """A daemon thread applying the retention limit every ``min(retention_s / 10, 60)`` seconds."""

    def __init__(self, ctx: ServerState, engine: Any, retention_s: float) -> None:
        self.ctx, self.engine, self.retention_s = ctx, engine, retention_s
        self.period_s = min(retention_s / 10.0, 60.0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="adaspec-retention", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            try:
                dropped = self.ctx.scheduler.run_between_steps(
                    lambda: _forget_old(self.engine, self.retention_s)).result(120.0)
            except Exception:
                log.exception("retention sweep failed")
                continue
            if dropped and self.ctx.snapshots is not None:
                self.ctx.snapshots.mark_dirty()  # the files on disk lose them at the next check

    def stop(self) -> None:
        self._stop.set()


def _start_snapshots(ctx: ServerState, engine: Any, store: Any, interval_s: float,
                     learned_tokens: int) -> SnapshotSaver:
    """The snapshot thread, and the ``adaspec_snapshot_age_seconds`` gauge."""
    scheduler = ctx.scheduler

    def collect() -> dict[str, Any]:
        # state_dict() on the engine thread between steps; encoding and writing on the saver's thread.
        return scheduler.run_between_steps(lambda: collect_learned_state(engine)).result(timeout=120.0)

    last = None
    names = [getattr(getattr(engine, "controller", None), "name", None), *(getattr(engine, "speculators", {}) or {})]
    for name in [n for n in names if n]:
        try:
            last = max(last or 0.0, store.path(name).stat().st_mtime)
        except (OSError, ValueError, AttributeError):
            pass
    saver = SnapshotSaver(store, collect, progress=ctx.metrics.tokens_seen, interval_s=interval_s,
                          learned_tokens=learned_tokens, last_snapshot_unix=last)
    Gauge("adaspec_snapshot_age_seconds", "Seconds since the last good learned-state snapshot "
          "(since the loaded one or the server start before the first)",
          registry=ctx.metrics.registry).set_function(saver.age_s)
    ctx.snapshots = saver
    saver.start()
    return saver


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("adaspec")
    except Exception:
        return "0"
