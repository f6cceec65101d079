"""Counts that agree: /metrics, the dashboard and per-request stats equal the responses' usage.

A mixed run on one server: long accepted draft blocks cut by a stop string in
the middle of a block, a stop token inside a block (the EOS case), max_tokens
caps, sampled requests, and streams the client abandons after two chunks.
"""

from __future__ import annotations

import re
import time

import httpx
import openai

from adaspec.engine import Engine
from adaspec.server import create_app
from adaspec.server.testing import BackgroundServer
from adaspec.types import SamplingParams
from test_server import LOOKAHEAD, MODEL, make_engine


def _metric(text: str, name: str) -> float:
    m = re.search(rf"^{name} ([0-9.e+]+)$", text, re.M)
    assert m, name
    return float(m.group(1))


def test_engine_stats_count_committed_tokens_on_a_stop_cut(tiny_target):
    """A stop string completed mid-block: the stats count the kept tokens, not the step's emitted ones."""
    engine, oracle = make_engine(tiny_target)
    ids = engine.encode_prompt("the cat sat on the mat. " * 3)
    plain = Engine(tiny_target).generate(ids, SamplingParams(max_tokens=24))
    oracle.table[tuple(ids)] = list(plain.token_ids)
    stop_tok = plain.token_ids[3]  # ends the output inside the first accepted block (k = 8)
    r = engine.generate(ids, SamplingParams(max_tokens=24, stop_token_ids=[stop_tok]))
    n = plain.token_ids.index(stop_tok) + 1
    s = r.speculation
    assert r.usage.completion_tokens == len(r.token_ids) == n
    assert s.emitted_on_draft_steps + s.steps_by_speculator.get("none", 0) == n
    assert s.accepted <= s.emitted_on_draft_steps and s.accepted <= s.proposed


def test_metrics_dashboard_and_stats_equal_usage_over_a_mixed_run(tiny_target):
    engine, oracle = make_engine(tiny_target)
    plain = Engine(tiny_target)
    prompts = ["the cat sat on the mat. " * 4, "1, 2, 3, 1, 2, 3, 1, 2, 3,", "abc abc abc abc abc",
               "Quantum zebras negotiate"]
    refs = {}
    for p in prompts[:3]:  # oracle: long accepted blocks
        ids = plain.encode_prompt(p)
        refs[p] = plain.generate(ids, SamplingParams(max_tokens=40))
        oracle.table[tuple(ids)] = list(refs[p].token_ids)
    app = create_app(engine, MODEL, max_active=4, max_queue=16, request_timeout_s=120)
    usage_total = 0
    with BackgroundServer(app) as server:
        client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0, timeout=60)
        jobs = []
        for p in prompts[:3]:
            text = refs[p].text
            jobs.append(dict(prompt=p, max_tokens=40, stop=[text[len(text) // 3: len(text) // 3 + 3]]))  # stop string
            jobs.append(dict(prompt=p, max_tokens=40, extra_body={"stop_token_ids": [refs[p].token_ids[5]]}))
            jobs.append(dict(prompt=p, max_tokens=LOOKAHEAD + 1))  # length cap
        jobs.append(dict(prompt=prompts[3], max_tokens=17, temperature=0.9, seed=3))
        jobs.append(dict(prompt=prompts[3], max_tokens=13, temperature=0.9, stop=["e"]))
        finishes = set()
        for kw in jobs:
            kw.setdefault("temperature", 0)
            r = client.completions.create(model=MODEL, **kw)
            usage_total += r.usage.completion_tokens
            finishes.add(r.choices[0].finish_reason)
            ext = r.model_extra["adaspec"]  # per-request stats count the same tokens
            assert ext["emitted_on_draft_steps"] + ext["steps_by_speculator"].get("none", 0) \
                == r.usage.completion_tokens, kw
            stream = client.completions.create(model=MODEL, stream=True, stream_options={"include_usage": True},
                                               **kw)
            usage_total += [c for c in stream if c.usage][-1].usage.completion_tokens
        assert finishes == {"stop", "length"}
        for p in prompts[:2]:  # abandoned streams: their tokens count where the server records them
            with httpx.stream("POST", server.base_url + "/v1/completions", timeout=60,
                              json={"model": MODEL, "prompt": p, "max_tokens": 200, "stream": True}) as s:
                for i, _ in enumerate(s.iter_lines()):
                    if i >= 2:
                        break
        deadline = time.monotonic() + 30
        while app.state.adaspec.scheduler.active_count and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)
        metrics = httpx.get(server.base_url + "/metrics").text
        dash = httpx.get(server.base_url + "/dashboard/stats.json").json()
    records = dash["recent_requests"]
    assert len(records) == 2 * len(jobs) + 2  # every request is listed (the dashboard keeps 25)
    aborted = [r for r in records if r["finish_reason"] == "abort"]
    assert len(aborted) == 2 and all(0 < r["completion_tokens"] < 200 for r in aborted)
    total = usage_total + sum(r["completion_tokens"] for r in aborted)
    assert sum(r["completion_tokens"] for r in records) == total
    assert _metric(metrics, "adaspec_generation_tokens_total") == total
    assert dash["totals"]["generated_tokens"] == total
    by_spec = dash["totals"]["by_speculator"]
    assert all(t["accepted"] <= t["proposed"] for t in by_spec.values())
