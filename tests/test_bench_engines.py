"""bench engines: the record formulas, the summary table, and a short run on the tiny model (no llama.cpp)."""

from __future__ import annotations

import math

import pytest

from adaspec.bench.engines import (AdaspecSystem, BenchRequest, RunTiming, format_engines, make_record, run_engines,
                                   summarize)


def _rec(system, total_s, first_s, n, first_tokens=1, stream="drift", threads=1, plain=None, ids=None):
    ids = ids if ids is not None else list(range(n))
    return make_record(stream, 0, "python", "p0", system, threads, 10, RunTiming(ids, total_s, first_s, first_tokens),
                       plain)


def test_record_formulas():
    r = _rec("atlas", total_s=2.0, first_s=0.5, n=31, first_tokens=4)
    assert math.isclose(r.decode_tokens_per_s, (31 - 4) / 1.5)
    assert math.isclose(r.request_tokens_per_s, 31 / 2.0)
    assert r.same_as_plain is None
    one = _rec("plain", total_s=1.0, first_s=1.0, n=1)  # nothing after the first token
    assert one.decode_tokens_per_s is None and one.request_tokens_per_s == 1.0
    assert _rec("x", 1.0, 0.1, 3, plain=[0, 1, 2]).same_as_plain is True
    assert _rec("x", 1.0, 0.1, 3, plain=[0, 1, 5]).same_as_plain is False


def test_summary_pools_tokens_over_time_and_ratios_to_llama_plain():
    recs = [_rec("llama-plain", 2.0, 1.0, 11), _rec("llama-plain", 3.0, 1.0, 21),
            _rec("plain", 1.0, 0.5, 11, plain=list(range(11))),
            _rec("atlas", 1.0, 0.5, 11, first_tokens=3, plain=list(range(11)))]
    rows = {r["system"]: r for r in summarize(recs)}
    assert math.isclose(rows["llama-plain"]["decode_tokens_per_s"], (10 + 20) / (1.0 + 2.0))
    assert math.isclose(rows["llama-plain"]["request_tokens_per_s"], 32 / 5.0)
    assert math.isclose(rows["plain"]["decode_tokens_per_s"], 10 / 0.5)
    assert math.isclose(rows["atlas"]["decode_tokens_per_s"], 8 / 0.5)
    assert math.isclose(rows["plain"]["decode_ratio"], 20 / 10) and rows["llama-plain"]["decode_ratio"] == 1.0
    assert rows["plain"]["reference"] == "llama-plain" and rows["atlas"]["same_as_plain"] == (1, 1)
    table = format_engines(list(rows.values()))
    assert table.splitlines()[0].startswith("| stream | threads | system |")
    assert "| drift | 1 | plain | 1 | 11 | 20.0 | 2.00 | 11.0 | 1.72 | 1/1 |" in table
    # without llama.cpp the reference is this engine's plain decoding
    alone = {r["system"]: r for r in summarize(recs[2:])}
    assert alone["atlas"]["reference"] == "plain" and alone["plain"]["decode_ratio"] == 1.0


def test_short_run_on_tiny_model(tiny_target):
    from adaspec.config import EngineConfig, build_engine

    systems = [AdaspecSystem(name, build_engine(EngineConfig(model=tiny_target.name, dtype=tiny_target.dtype,
                                                             speculator=spec, threads=1, calibrate=False),
                                                target=tiny_target))
               for name, spec in (("plain", "none"), ("atlas", "atlas"))]
    prompt = tiny_target.tokenizer.encode("def add(a, b):\n    return a + b\n\ndef add(a, b):")
    reqs = [BenchRequest("drift", "python", "p0", prompt, 12, False),
            BenchRequest("long", "chat", "c0", prompt[:5], 20, True)]
    lines = []
    records = run_engines(reqs, systems, threads=1, log=lines.append)
    assert len(records) == 4 and len(lines) == 2
    assert all(r.same_as_plain for r in records)  # greedy speculation is lossless
    long_ = [r for r in records if r.stream == "long"]
    assert all(r.new_tokens == 20 for r in long_)  # ignore_eos: exactly max_tokens
    assert all(r.first_s <= r.total_s and r.decode_tokens_per_s > 0 for r in records)
    table = format_engines(summarize(records))
    assert "| long | 1 | atlas |" in table and "ratios (x ref) are to plain" in table


def test_unknown_system_is_refused(tiny_target):
    from adaspec.bench.engines import _build_systems

    with pytest.raises(ValueError, match="unknown system"):
        _build_systems(["plain", "vllm"], tiny_target, 1, None, 10, print)


def test_without_llama_cpp_only_this_engine_runs(tiny_target, monkeypatch):
    from adaspec.bench import engines

    monkeypatch.setattr(engines, "llama_cpp_missing", lambda: "ModuleNotFoundError: No module named 'llama_cpp'")
    said = []
    systems = engines._build_systems(["plain", "llama-plain", "llama-lookup"], tiny_target, 1, "x.gguf", 10,
                                     said.append)
    assert [s.name for s in systems] == ["plain"]
    assert "llama.cpp not run" in said[0] and "this engine's systems only" in said[0]


def test_a_failing_peer_leaves_the_request_out_for_everyone(tiny_target):
    """llama-cpp-python's prompt lookup raised mid-run twice ("could not broadcast ..."): the run goes on."""
    from adaspec.config import EngineConfig, build_engine

    plain = AdaspecSystem("plain", build_engine(EngineConfig(model=tiny_target.name, dtype=tiny_target.dtype,
                                                             speculator="none", threads=1, calibrate=False),
                                                target=tiny_target))

    class Flaky:
        name = "flaky"

        def __init__(self):
            self.calls = 0

        def run(self, prompt_ids, max_tokens, ignore_eos):
            self.calls += 1
            if self.calls == 2:
                raise ValueError("could not broadcast input array from shape (245760,) into shape (0,)")
            return RunTiming(list(prompt_ids[:3]), 0.1, 0.05, 1)

    prompt = tiny_target.tokenizer.encode("def add(a, b):\n    return a + b\n")
    reqs = [BenchRequest("drift", "python", f"p{i}", prompt, 4, False) for i in range(3)]
    lines, skipped = [], []
    records = run_engines(reqs, [plain, Flaky()], threads=1, log=lines.append, skipped=skipped)
    assert sorted({r.request for r in records}) == [0, 2] and len(records) == 4
    assert len(skipped) == 1 and skipped[0]["request"] == 1 and "broadcast" in skipped[0]["errors"]["flaky"]
    assert "left out for every system" in lines[1]
