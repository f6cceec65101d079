"""`adaspec bench serve`: its client against a real server, its summary math, its SQL phase."""

from __future__ import annotations

import asyncio

from adaspec.bench.serve import Record, _pct, _sql_by_database, render, run_phase, summarize
from adaspec.engine import Engine
from adaspec.server import create_app
from adaspec.server.testing import BackgroundServer


def test_clients_stream_and_count_tokens_against_the_server(tiny_target):
    engine = Engine(tiny_target)
    app = create_app(engine, "bench", max_active=4, prefix_cache_tokens=2048)
    jobs = [(f"p{i}", [{"role": "user", "content": f"Question number {i}: tell me about apples."}])
            for i in range(6)]
    with BackgroundServer(app) as s:
        recs, wall = asyncio.run(run_phase(s.base_url, "bench", "none", 3, "chat", jobs, 12))
        conv, _ = asyncio.run(run_phase(s.base_url, "bench", "none", 2, "multiturn", jobs[:2], 6, turns=3))
    assert len(recs) == 6 and all(r.ok and r.completion_tokens > 0 and r.ttft_s is not None for r in recs)
    assert wall > 0 and sorted(r.key for r in recs) == [f"p{i}" for i in range(6)]
    assert sorted(r.key for r in conv) == ["p0#0", "p0#1", "p0#2", "p1#0", "p1#1", "p1#2"]
    m0 = {"adaspec_prefix_cache_tokens_saved_total": 10.0, "adaspec_prefix_cache_lookup_tokens_total": 100.0,
          "adaspec_batch_size_count": 2.0, "adaspec_batch_size_sum": 2.0, "adaspec_batch_rows_fed_sum": 2.0}
    m1 = {"adaspec_prefix_cache_tokens_saved_total": 60.0, "adaspec_prefix_cache_lookup_tokens_total": 200.0,
          "adaspec_batch_size_count": 12.0, "adaspec_batch_size_sum": 32.0, "adaspec_batch_rows_fed_sum": 52.0}
    s = summarize("none", 3, "chat", recs + [Record("none", 3, "chat", "x", ok=False, status=500)], wall, m0, m1)
    assert s.requests == 7 and s.failed == 1 and s.tokens == sum(r.completion_tokens for r in recs)
    assert s.prefix_saved == 0.5 and s.prefix_tokens_saved == 50 and s.mean_batch == 3.0 and s.mean_rows == 5.0
    md = render([s], {("none", 3): (6, 6)}, ["# t"])
    assert "| none | 3 | chat | 7 | 1 |" in md and "50% (50)" in md and "none at 3 clients: 6/6" in md


def test_percentiles():
    assert _pct([], 0.5) is None
    assert _pct([3.0, 1.0, 2.0], 0.5) == 2.0 and _pct(list(range(101)), 0.99) == 99


def test_sql_phase_shares_schemas():
    jobs = _sql_by_database(16, 2, seed=0)
    schemas = {m[-1]["content"].split("\n\nWrite one SQL query")[0] for _, m in jobs}
    # 16 with the full Spider set; the shipped subset has at most 4 questions per database
    assert 2 * 2 <= len(jobs) <= 16 and len(schemas) <= 2



def test_llama_server_peer_command(tmp_path, monkeypatch):
    import argparse
    import shutil

    import pytest

    from adaspec.bench import serve

    p = argparse.ArgumentParser()
    serve.add_serve_bench_arguments(p)
    fake = tmp_path / "llama-server"
    fake.write_text("")
    gguf = tmp_path / "m.gguf"
    gguf.write_text("")
    args = p.parse_args(["--peer", "llama-server", "--llama-server", str(fake), "--gguf", str(gguf)])
    cmd = serve.llama_server_cmd(args, 8123, 16)
    assert cmd[0] == str(fake) and cmd[cmd.index("--parallel") + 1] == "16"
    assert cmd[cmd.index("--ctx-size") + 1] == str(16 * 2048) and cmd[cmd.index("--model") + 1] == str(gguf)
    monkeypatch.setattr(serve, "LLAMA_SERVER_BUILD", tmp_path / "none")
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(FileNotFoundError, match="make llama-server"):
        serve.llama_server_cmd(p.parse_args(["--llama-server", str(tmp_path / "missing")]), 8123, 1)
