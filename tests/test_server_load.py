"""Server under load: bounded queue (429), client disconnects, request timeout, fair interleaving, shutdown.

A gated engine (steps wait on an event, optionally sleep) makes "the server is
busy" a state the test controls instead of a race.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import httpx
import openai
import pytest

from adaspec.engine import Engine
from adaspec.server import create_app
from adaspec.server.testing import BackgroundServer
from adaspec.speculators import NgramSpeculator

MODEL = "tiny-test"


class GatedEngine(Engine):
    """An Engine whose steps wait for ``gate`` and then sleep ``step_delay_s``; records aborts."""

    def __init__(self, *args: Any, step_delay_s: float = 0.0, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.gate = threading.Event()
        self.gate.set()
        self.step_delay_s = step_delay_s
        self.aborted: list[tuple[str, str]] = []

    def step(self, state: Any) -> list[int]:
        self.gate.wait(30)
        if self.step_delay_s:
            time.sleep(self.step_delay_s)
        return super().step(state)

    def step_batch(self, states: Any, **kw: Any) -> list[Any]:  # the scheduler's continuous-batching step
        self.gate.wait(30)
        if self.step_delay_s:
            time.sleep(self.step_delay_s)
        return super().step_batch(states, **kw)

    def abort(self, state: Any, reason: str = "abort") -> None:
        self.aborted.append((state.request_id, reason))
        super().abort(state, reason)


def wait_for(cond: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.01)


@pytest.fixture()
def gated(tiny_target):
    """A server with one active slot and one queue place over a gated engine."""
    engine = GatedEngine(tiny_target, [NgramSpeculator()], step_delay_s=0.01)
    app = create_app(engine, MODEL, max_active=1, max_queue=1, request_timeout_s=None)
    with BackgroundServer(app) as server:
        server.engine = engine
        server.scheduler = app.state.adaspec.scheduler
        yield server
        engine.gate.set()


def body(max_tokens: int = 8, **kw: Any) -> dict[str, Any]:
    return {"model": MODEL, "prompt": "hello there", "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            **kw}


def test_full_queue_answers_429_with_retry_after(gated) -> None:
    gated.engine.gate.clear()  # the running request blocks in its first step
    sched = gated.scheduler
    with ThreadPoolExecutor(2) as pool:
        running = pool.submit(httpx.post, gated.base_url + "/v1/completions", json=body(), timeout=30)
        wait_for(lambda: sched.active_count == 1)
        queued = pool.submit(httpx.post, gated.base_url + "/v1/completions", json=body(), timeout=30)
        wait_for(lambda: sched.queue_depth == 1)
        client = openai.OpenAI(base_url=gated.base_url + "/v1", api_key="x", max_retries=0)
        try:
            with pytest.raises(openai.RateLimitError) as e:
                client.completions.create(model=MODEL, prompt="hi", max_tokens=8)
        finally:
            gated.engine.gate.set()
        assert e.value.response.headers["retry-after"] == "1"
        assert e.value.body["code"] == "queue_full" and e.value.body["message"]
        gated.engine.gate.set()
        assert running.result().status_code == 200 and queued.result().status_code == 200
    assert sched.queue_depth == 0 and sched.active_count == 0
    assert 'adaspec_request_errors_total{code="queue_full",status="429"} 1.0' in httpx.get(
        gated.base_url + "/metrics").text


def test_streaming_disconnect_cancels_the_request(gated) -> None:
    sched = gated.scheduler
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", gated.base_url + "/v1/completions", json=body(400, stream=True)) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            assert next(line for line in lines if line.startswith("data:"))
            assert sched.active_count == 1
        # leaving the block closes the connection mid-stream
    wait_for(lambda: sched.active_count == 0)
    assert gated.engine.aborted and gated.engine.aborted[-1][1] == "abort"
    recent = httpx.get(gated.base_url + "/dashboard/stats.json").json()["recent_requests"]
    assert recent[0]["finish_reason"] == "abort" and recent[0]["completion_tokens"] < 400
    # The freed slot serves the next request at once.
    assert httpx.post(gated.base_url + "/v1/completions", json=body(3), timeout=30).status_code == 200


def test_non_streaming_disconnect_cancels_the_request(gated) -> None:
    sched = gated.scheduler
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(gated.base_url + "/v1/completions", json=body(400), timeout=httpx.Timeout(30, read=0.3))
    wait_for(lambda: sched.active_count == 0)
    assert gated.engine.aborted[-1][1] == "abort"


def test_queued_request_whose_client_left_is_dropped(gated) -> None:
    gated.engine.gate.clear()
    sched = gated.scheduler
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(httpx.post, gated.base_url + "/v1/completions", json=body(2), timeout=30)
        wait_for(lambda: sched.active_count == 1)
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(gated.base_url + "/v1/completions", json=body(2), timeout=httpx.Timeout(30, read=0.3))
        try:
            wait_for(lambda: sched.queue_depth == 0)
        finally:
            gated.engine.gate.set()
        assert running.result().status_code == 200


def test_request_timeout_cuts_with_length(tiny_target) -> None:
    engine = GatedEngine(tiny_target, [NgramSpeculator()], step_delay_s=0.02)
    with BackgroundServer(create_app(engine, MODEL, request_timeout_s=1.5)) as server:
        t0 = time.monotonic()
        r = httpx.post(server.base_url + "/v1/completions", json=body(400), timeout=30).json()
        assert time.monotonic() - t0 < 6  # 400 steps would take >= 8 s
        assert r["choices"][0]["finish_reason"] == "length"
        assert r["adaspec"]["finish_detail"] == "timeout"
        assert 0 < r["usage"]["completion_tokens"] < 400
        events = []
        with httpx.stream("POST", server.base_url + "/v1/chat/completions", timeout=30, json={
                "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 400,
                "temperature": 0, "ignore_eos": True, "stream": True}) as s:
            assert s.status_code == 200
            events = [line for line in s.iter_lines() if line.startswith("data:")]
        assert events[-1] == "data: [DONE]" and '"finish_detail":"timeout"' in events[-2]


def test_request_timeout_while_queued_is_a_429(tiny_target) -> None:
    engine = GatedEngine(tiny_target, [])
    app = create_app(engine, MODEL, request_timeout_s=1.0, max_active=1)
    with BackgroundServer(app) as server, ThreadPoolExecutor(1) as pool:
        engine.gate.clear()
        try:
            running = pool.submit(httpx.post, server.base_url + "/v1/completions", json=body(50), timeout=30)
            wait_for(lambda: app.state.adaspec.scheduler.active_count == 1)
            r = httpx.post(server.base_url + "/v1/completions", json=body(2), timeout=30)
        finally:
            engine.gate.set()
        assert r.status_code == 429 and r.json()["error"]["code"] == "queue_timeout"
        assert r.headers["retry-after"] == "1"
        assert running.result().json()["adaspec"]["finish_detail"] == "timeout"
        wait_for(lambda: app.state.adaspec.scheduler.queue_depth == 0)


def test_shutdown_drains_in_flight_requests(tiny_target) -> None:
    engine = GatedEngine(tiny_target, [], step_delay_s=0.01)
    server = BackgroundServer(create_app(engine, MODEL, drain_timeout_s=10)).__enter__()
    with ThreadPoolExecutor(1) as pool:
        fut = pool.submit(httpx.post, server.base_url + "/v1/completions", json=body(40), timeout=30)
        wait_for(lambda: server.app.state.adaspec.scheduler.active_count == 1)
        server.stop()
        r = fut.result()
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 40


def test_shutdown_cuts_what_does_not_finish_in_time(tiny_target) -> None:
    engine = GatedEngine(tiny_target, [], step_delay_s=0.02)
    app = create_app(engine, MODEL, drain_timeout_s=0.2)
    server = BackgroundServer(app).__enter__()
    sched = app.state.adaspec.scheduler
    events: list[str] = []

    def consume() -> None:
        with httpx.stream("POST", server.base_url + "/v1/completions", json=body(400, stream=True), timeout=30) as s:
            for line in s.iter_lines():
                if line.startswith("data:"):
                    events.append(line)

    t = threading.Thread(target=consume)
    t.start()
    wait_for(lambda: sched.active_count == 1)
    threading.Thread(target=sched.shutdown, args=(0.2,)).start()  # what the lifespan does, without uvicorn's wait
    t.join(30)
    server.stop()
    assert events[-1] == "data: [DONE]" and '"finish_detail":"shutdown"' in events[-2]
    assert ('"finish_reason":"length"') in events[-2]


class FailingEngine(Engine):
    """Raises inside step while ``fail`` is set (an engine bug, as seen from the server)."""

    fail = False

    def step(self, state: Any) -> list[int]:
        if self.fail and len(state.output_ids) >= 2:
            raise RuntimeError("boom")
        return super().step(state)

    def step_batch(self, states: Any, **kw: Any) -> list[Any]:
        # a failing batched step: the scheduler steps the requests one by one, so only the failing one fails
        if self.fail and any(len(s.output_ids) >= 2 for s in states):
            raise RuntimeError("boom")
        return super().step_batch(states, **kw)


def test_engine_error_is_a_json_500_and_the_worker_survives(tiny_target) -> None:
    engine = FailingEngine(tiny_target, [])
    with BackgroundServer(create_app(engine, MODEL)) as server:
        engine.fail = True
        r = httpx.post(server.base_url + "/v1/completions", json=body(10), timeout=30)
        assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
        with httpx.stream("POST", server.base_url + "/v1/completions", json=body(10, stream=True), timeout=30) as s:
            events = [line for line in s.iter_lines() if line.startswith("data:")]
        assert '"error"' in events[-2] and events[-1] == "data: [DONE]"
        engine.fail = False
        assert httpx.post(server.base_url + "/v1/completions", json=body(4), timeout=30).status_code == 200
