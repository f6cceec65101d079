"""`adaspec bench soak`: its clients against a real server, and its checks."""

from __future__ import annotations

import asyncio
import os

import httpx

from adaspec.bench.soak import SoakRecord, idle_health, judge, reference_answer, render, rss_mb, run_soak
from adaspec.engine import Engine
from adaspec.server import create_app
from adaspec.server.testing import BackgroundServer


def test_soak_streams_match_their_references_and_dropped_streams_free_their_requests(tiny_target):
    engine = Engine(tiny_target)
    app = create_app(engine, "bench", max_active=3, prefix_cache_tokens=256)
    pool = [(f"p{i}", [{"role": "user", "content": f"Question {i}: tell me about apples and pears."}])
            for i in range(4)]

    async def go(url: str):
        async with httpx.AsyncClient(timeout=60) as client:
            refs = {k: await reference_answer(client, url, "bench", m, 10) for k, m in pool}
        recs = await run_soak(url, "bench", pool, clients=3, duration_s=2.0, max_tokens=10, abort_every=3)
        return refs, recs

    with BackgroundServer(app) as s:
        refs, recs = asyncio.run(go(s.base_url))
        # every dropped stream was cancelled: nothing is left running
        health = idle_health(s.base_url, 10.0)
    assert all(r["tokens"] > 0 for r in refs.values())
    assert any(r.aborted for r in recs) and any(not r.aborted for r in recs)
    v = judge(recs, refs, [(0.0, 100.0), (1.0, 101.0), (2.0, 104.0)], warm_s=1.0)
    assert v.status_5xx == 0 and v.failed == 0 and v.mismatched == [] and v.completed > 0
    assert v.rss_warm_mb == 101.0 and v.rss_end_mb == 104.0 and v.rss_ok and v.ok
    assert health["active_requests"] == 0 and health["queue_depth"] == 0


def test_judge_catches_every_failure_kind():
    refs = {"a": {"text": "hello world", "tokens": 2}}
    recs = [SoakRecord(0, "a", 0.0, 200, completion_tokens=2, text="hello world"),
            SoakRecord(0, "a", 0.1, 200, completion_tokens=3, text="hello world"),   # a duplicated token
            SoakRecord(1, "a", 0.2, 200, completion_tokens=2, text="hello"),         # a lost piece
            SoakRecord(1, "a", 0.3, 503, error="overloaded"),
            SoakRecord(2, "a", 0.4, 429, error="queue full"),
            SoakRecord(2, "a", 0.5, 0, error="ReadError"),
            SoakRecord(3, "a", 0.6, 200, aborted=True, text="hel")]
    v = judge(recs, refs, [(0.0, 100.0), (60.0, 200.0), (600.0, 221.0)])
    assert (v.requests, v.completed, v.aborted, v.status_5xx, v.status_4xx, v.failed) == (7, 3, 1, 1, 1, 1)
    assert v.mismatched == ["a", "a"]
    assert v.rss_warm_mb == 200.0 and not v.rss_ok and not v.ok
    md = render(v, ["# t"], clients=4, minutes=10, tok_s=1.0, warm_s=60)
    assert "verdict: FAILED" in md and "| no 5xx | 1 | **FAILED** |" in md and "+10.5%" in md
    # no sample after the warm-up: the memory check cannot pass
    assert not judge(recs[:1], refs, [(0.0, 100.0)]).ok


def test_rss_of_this_process_is_read():
    assert rss_mb(os.getpid()) > 10
