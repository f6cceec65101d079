"""The workload-drift benchmark harness: phases, systems, records, summary arithmetic, figure."""

from __future__ import annotations

import argparse
import json

import pytest

from adaspec.bench import drift
from adaspec.bench.drift import (
    DEFAULT_PHASES,
    EngineSystem,
    Phase,
    SystemOptions,
    SystemOutput,
    SystemUnavailable,
    add_drift_arguments,
    build_phases,
    build_stream,
    build_systems,
    drift_from_args,
    parse_phase_spec,
    register_system,
    run_drift,
)
from adaspec.prompts import DOMAINS, BenchPrompt
from adaspec.bench.report import (
    RECORD_FIELDS,
    RequestRecord,
    format_markdown,
    load_records,
    mean_acceptance_length,
    plot_drift,
    recovery_requests,
    steady_tokens_per_s,
    summarize,
    tokens_per_s,
)
from adaspec.engine import Engine


def _short(engine: Engine, max_len: int):
    return lambda p: len(engine.apply_chat_template(p.messages)) < max_len


# --------------------------------------------------------------- phases
@pytest.mark.parametrize("domain", DOMAINS)
def test_phase_from_each_prompt_source(domain):
    a = build_phases([domain], 4, seed=1)
    assert [p.name for p in a] == [domain] and a[0].source == domain
    assert len(a[0].prompts) == 4
    assert all(p.domain == domain for p in a[0].prompts)
    assert len({p.prompt_id for p in a[0].prompts}) == 4  # no repeats
    assert all(p.messages and p.messages[0]["role"] == "user" and p.messages[0]["content"] for p in a[0].prompts)
    again = build_phases([domain], 4, seed=1)
    assert [p.prompt_id for p in again[0].prompts] == [p.prompt_id for p in a[0].prompts]
    other = build_phases([domain], 4, seed=2)
    assert [p.prompt_id for p in other[0].prompts] != [p.prompt_id for p in a[0].prompts]


def test_default_phase_order_and_counts():
    assert DEFAULT_PHASES == ("python", "rust", "chat", "sql", "tools")
    phases = build_phases(DEFAULT_PHASES, 3, seed=0)
    assert [p.name for p in phases] == list(DEFAULT_PHASES)
    assert [len(p.prompts) for p in phases] == [3] * 5
    # SQL prompts carry the schema, tool prompts the function schemas.
    assert "CREATE TABLE" in phases[3].prompts[0].messages[0]["content"]
    assert "JSON schemas" in phases[4].prompts[0].messages[0]["content"]


def test_chat_prompts_have_no_duplicate_questions():
    # Spec-Bench repeats the 80 MT-bench questions; the chat set must hold each once.
    from adaspec import prompts

    for root in (prompts.shared_prompts_root(), prompts.shipped_prompts_root()):
        if root is None:  # no full sets beside the checkout: the shipped subset is checked alone
            continue
        texts = [p.messages[0]["content"] for p in prompts.load_domain("chat", root)]
        assert len(texts) == len(set(texts))
        if root == prompts.shared_prompts_root():
            assert len(texts) == 80 + 400


def test_jsonl_phase(tmp_path):
    path = tmp_path / "mine.jsonl"
    rows = [{"prompt": f"question {i}"} for i in range(5)]
    rows.append({"id": "m", "messages": [{"role": "user", "content": "hi"}]})
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert parse_phase_spec(f"mine={path}") == ("mine", str(path))
    phases = build_phases(["sql", f"mine={path}"], 6, seed=0)
    assert phases[1].name == "mine" and phases[1].source == str(path)
    assert sorted(p.prompt_id for p in phases[1].prompts) == ["0", "1", "2", "3", "4", "m"]
    assert all(p.domain == "mine" for p in phases[1].prompts)
    with pytest.raises(ValueError, match="usable prompts"):
        build_phases([f"mine={path}"], 7)


def test_phase_errors_and_filter():
    with pytest.raises(ValueError, match="unknown phase"):
        build_phases(["cobol"], 2)
    with pytest.raises(ValueError, match="name=path"):
        parse_phase_spec("=x.jsonl")
    with pytest.raises(ValueError, match=">= 1"):
        build_phases(["sql"], 0)
    short = build_phases(["tools"], 5, fits=lambda p: len(p.messages[0]["content"]) < 600)
    assert all(len(p.messages[0]["content"]) < 600 for p in short[0].prompts)


def test_stream_applies_chat_template(tiny_target):
    tok = tiny_target.tokenizer
    phases = build_phases(["chat", "sql"], 2, seed=3, fits=_short(Engine(tiny_target), 400))
    stream = build_stream(tiny_target, phases)
    assert [r.request_index for r in stream] == [0, 1, 2, 3]
    assert [(r.phase, r.phase_index, r.index_in_phase) for r in stream] == [
        ("chat", 0, 0), ("chat", 0, 1), ("sql", 1, 0), ("sql", 1, 1)]
    for r, p in zip(stream, phases[0].prompts + phases[1].prompts):
        text = tok.apply_chat_template(p.messages, tokenize=False, add_generation_prompt=True)
        assert r.prompt_ids == tok.encode(text, add_special_tokens=False)
        assert r.prompt_id == p.prompt_id
    assert tok.decode(stream[0].prompt_ids).startswith("<|im_start|>")


# --------------------------------------------------------------- systems
class Perturbed:
    """Wraps a system and changes one output token: the equality check must catch it."""

    def __init__(self, inner, at: int) -> None:
        self.name = "perturbed"
        self.inner = inner
        self.at = at

    def run(self, prompt_ids, params):
        out = self.inner.run(prompt_ids, params)
        ids = list(out.token_ids)
        if len(ids) > self.at:
            ids[self.at] = (ids[self.at] + 1) % 100
        return SystemOutput(ids, out.seconds, out.stats)


class Logged:
    """Records the order systems are called in."""

    def __init__(self, name: str, log: list) -> None:
        self.name = name
        self.log = log

    def run(self, prompt_ids, params):
        self.log.append(self.name)
        return SystemOutput([1, 2, 3], 0.01)


def test_run_drift_records_schema_and_equality_check(tiny_target, tmp_path):
    phases = build_phases(["sql", "tools"], 2, seed=0, fits=_short(Engine(tiny_target), 300))
    built = build_systems(tiny_target, ["plain", "hf-plain", "hf-prompt-lookup", "ngram", "suffix"])
    built.append(Perturbed(drift.SYSTEMS["plain"](tiny_target, SystemOptions()), at=1))
    records = run_drift(tiny_target, phases, [], max_tokens=8, progress=False, out_dir=tmp_path, built=built)
    assert len(records) == 6 * 4
    lines = [json.loads(x) for x in (tmp_path / "drift.jsonl").read_text().splitlines()]
    assert len(lines) == len(records)
    for d in lines:
        assert tuple(d) == RECORD_FIELDS
        assert d["tokens"] > 0 and d["seconds"] > 0
        assert d["tokens_per_s"] == pytest.approx(d["tokens"] / d["seconds"])
        assert isinstance(d["speculator_shares"], dict) and isinstance(d["lookahead_hist"], dict)
    assert load_records(tmp_path / "drift.jsonl") == records
    by = {(r.system, r.request_index): r for r in records}
    for i in range(4):
        assert by["plain", i].matches_plain is None
        for s in ("hf-plain", "hf-prompt-lookup", "ngram", "suffix"):
            assert by[s, i].matches_plain is True, (s, i)
        bad = by["perturbed", i]
        assert bad.matches_plain is (by["plain", i].tokens <= 1)
        if by["plain", i].tokens > 1:
            assert bad.first_mismatch == 1
    ngram = by["ngram", 0]
    assert ngram.target_forwards == sum(ngram.lookahead_hist.values()) == sum(ngram.steps_by_speculator.values())
    assert sum(ngram.speculator_shares.values()) == pytest.approx(1.0)
    assert by["hf-plain", 0].mean_acceptance_length is None and by["hf-plain", 0].target_forwards is None
    summary = summarize(records)
    assert {m.system for m in summary.mismatches} <= {"perturbed"} and summary.mismatches
    assert summary.matched["ngram"] == summary.checked["ngram"] == 4
    assert "perturbed" in format_markdown(summary)


def test_systems_interleaved_in_rotated_order(tiny_target):
    log: list[str] = []
    phases = [Phase("sql", [BenchPrompt("sql", str(i), [{"role": "user", "content": f"q{i}"}]) for i in range(3)], "sql")]
    built = [Logged(n, log) for n in ("plain", "a", "b")]
    records = run_drift(tiny_target, phases, [], max_tokens=4, progress=False, built=built, warm_up=False)
    assert log == ["plain", "a", "b", "a", "b", "plain", "b", "plain", "a"]
    assert all(r.matches_plain is True for r in records if r.system != "plain")


def test_sampling_skips_equality_check(tiny_target):
    phases = [Phase("chat", [BenchPrompt("chat", "x", [{"role": "user", "content": "hello"}])], "chat")]
    records = run_drift(tiny_target, phases, ["plain", "ngram"], max_tokens=4, temperature=0.8, seed=3,
                        progress=False, warm_up=False)
    assert [r.matches_plain for r in records] == [None, None]


def test_registry_extend_skip_and_unknown(tiny_target, monkeypatch):
    messages = []
    monkeypatch.setitem(drift.OPTIONAL_SYSTEMS, "future", (lambda: "not built yet", None))
    register_system("plain-again", lambda target, opts: EngineSystem("plain-again", Engine(target)))

    def unavailable(target, opts):
        raise SystemUnavailable("no checkpoint")

    register_system("broken", unavailable)
    try:
        built = build_systems(tiny_target, ["plain", "plain-again", "future", "broken"], log=messages.append)
        assert [s.name for s in built] == ["plain", "plain-again"]
        assert messages == ["skipping system future: not built yet", "skipping system broken: no checkpoint"]
        with pytest.raises(ValueError, match="unknown systems"):
            build_systems(tiny_target, ["nope"])
        with pytest.raises(ValueError, match="repeated"):
            build_systems(tiny_target, ["plain", "plain"])
    finally:
        drift.SYSTEMS.pop("plain-again", None)
        drift.SYSTEMS.pop("broken", None)


def test_optional_static_and_atlas(tiny_target):
    """The tiny model has no draft head: static is skipped with its reason; atlas runs and stays exact."""
    messages: list[str] = []
    built = build_systems(tiny_target, ["plain", "static", "atlas"], log=messages.append)
    names = [s.name for s in built]
    assert "static" not in names and any(m.startswith("skipping system static") for m in messages)
    assert "atlas" in names
    phases = [Phase("chat", [BenchPrompt("chat", "x", [{"role": "user", "content": "count to ten twice"}])], "chat")]
    records = run_drift(tiny_target, phases, [], max_tokens=12, progress=False, built=built, warm_up=False)
    assert {r.system: r.matches_plain for r in records} == {"plain": None, "atlas": True}


def test_learning_systems_are_built_empty(tiny_target):
    a = build_systems(tiny_target, ["suffix"])[0]
    b = build_systems(tiny_target, ["suffix"])[0]
    sa, sb = a.engine.speculators["suffix"], b.engine.speculators["suffix"]
    assert sa is not sb
    assert sa.memory_stats() == sb.memory_stats()


def test_vllm_systems_glue_with_a_stand_in(tiny_target, monkeypatch, tmp_path):
    """vLLM runs in its own environment; check the glue against a stand-in worker (tests/test_vllm_inside.py runs the real one)."""
    from adaspec.integrations import vllm_client

    made = []

    class Worker:
        def __init__(self, model_dir, method, k, max_model_len, threads):
            made.append((method, k))

        def generate(self, prompts, max_tokens, temperature, seed):
            return {"outputs": [{"token_ids": list(prompts[0][:max_tokens])}], "seconds": 0.25}

        def close(self):
            pass

    fake_python = tmp_path / "python"
    fake_python.touch()
    monkeypatch.setenv(vllm_client.VLLM_PYTHON_ENV, str(fake_python))
    monkeypatch.setattr(vllm_client, "VllmWorker", Worker)
    import adaspec.models

    monkeypatch.setattr(adaspec.models, "resolve_model", lambda name: tmp_path)
    built = build_systems(tiny_target, ["vllm-plain", "vllm-ngram", "vllm-adaspec-suffix"],
                          SystemOptions(prompt_lookup_tokens=5, lookahead=7))
    assert [s.name for s in built] == ["vllm-plain", "vllm-ngram", "vllm-adaspec-suffix"]
    assert made == [("plain", 7), ("ngram", 5), ("adaspec-suffix", 7)]
    from adaspec.types import SamplingParams as Params

    out = built[0].run([5, 6, 7, 8], Params(max_tokens=2))
    assert out.token_ids == [5, 6] and out.stats is None and out.seconds == 0.25


def test_vllm_systems_skip_without_vllms_environment(tiny_target, monkeypatch, tmp_path):
    from adaspec.integrations import vllm_client

    monkeypatch.setenv(vllm_client.VLLM_PYTHON_ENV, str(tmp_path / "missing" / "python"))
    messages: list[str] = []
    assert build_systems(tiny_target, ["vllm-plain"], log=messages.append) == []
    assert messages and "does not exist" in messages[0]


# --------------------------------------------------------------- summary arithmetic
def _rec(system, phase_index, idx, tokens, seconds, n_per_phase=10, draft_steps=None, emitted=None, **kw):
    return RequestRecord(system=system, phase=f"p{phase_index}", phase_index=phase_index,
                         request_index=phase_index * n_per_phase + idx, index_in_phase=idx, prompt_id=str(idx),
                         prompt_tokens=10, tokens=tokens, seconds=seconds, tokens_per_s=tokens / seconds,
                         draft_steps=draft_steps, emitted_on_draft_steps=emitted, **kw)


def test_tokens_per_s_and_speedup_pooled():
    recs = [_rec("plain", 0, 0, 10, 1.0), _rec("plain", 0, 1, 30, 2.0),
            _rec("fast", 0, 0, 10, 0.5), _rec("fast", 0, 1, 30, 0.5)]
    assert tokens_per_s(recs[:2]) == pytest.approx(40 / 3)  # not the mean of 10 and 15
    s = summarize(recs, skip=1)
    assert s.overall["fast"] == pytest.approx(40.0)
    assert s.speedup["fast"] == pytest.approx(40.0 / (40 / 3))
    assert s.speedup["plain"] == pytest.approx(1.0)
    assert s.tokens_per_s_after_skip["fast"]["p0"] == pytest.approx(60.0)  # only index 1
    assert s.speedup_after_skip["fast"] == pytest.approx(60.0 / 15.0)
    assert summarize(recs).tokens_per_s_after_skip["fast"]["p0"] is None  # default skip 10 > phase
    assert s.tokens_per_s_last_half["fast"]["p0"] == pytest.approx(60.0)  # index >= 2 // 2
    assert "| fast | 60.0 (4.00x) |" in format_markdown(s)


def test_recovery_and_steady_speed():
    speeds = [1, 1, 5, 10, 10, 10, 10, 10]
    recs = [_rec("s", 1, i, v, 1.0) for i, v in enumerate(speeds)]
    assert steady_tokens_per_s(recs) == 10  # median of indices 4..7
    # 3-request means: 2.33, 5.33, 8.33 (< 9), 10 -> back at request 3.
    assert recovery_requests(recs) == 3
    assert recovery_requests(recs, window=1) == 3
    assert recovery_requests(recs, fraction=0.5) == 1
    # Odd length: last half is indices >= n // 2.
    assert steady_tokens_per_s([_rec("s", 0, i, v, 1.0) for i, v in enumerate([1, 2, 3, 4, 100])]) == 4
    # Steady 10 (median of 10, 10, 1); no 3-request mean reaches 9: 7, 5.5, 1.
    never = [_rec("s", 0, i, v, 1.0) for i, v in enumerate([1, 1, 10, 10, 1])]
    assert steady_tokens_per_s(never) == 10 and recovery_requests(never) is None
    assert recovery_requests([]) is None
    assert recovery_requests([_rec("s", 0, 0, 5, 1.0)]) == 0
    with pytest.raises(ValueError):
        recovery_requests(recs, window=0)


def test_summary_recovery_per_phase_and_blocks():
    recs = []
    for p, speeds in enumerate([[4, 8, 8, 8], [1, 2, 8, 8]]):
        for i, v in enumerate(speeds):
            recs.append(_rec("plain", p, i, 4, 1.0, n_per_phase=4))
            recs.append(_rec("suffix", p, i, v, 1.0, n_per_phase=4, draft_steps=2, emitted=2 + v))
    s = summarize(recs, block=3)
    assert s.phases == ["p0", "p1"]
    assert s.recovery["plain"] == {"p0": 0, "p1": 0}
    assert s.recovery["suffix"] == {"p0": 1, "p1": 2}  # p0: (8+8+8)/3; p1: steady 8, (8+8)/2 at r=2
    assert s.steady_tokens_per_s["suffix"]["p1"] == 8
    assert [(b.start, b.size, b.phases) for b in s.blocks] == [(0, 3, ["p0"]), (3, 3, ["p0", "p1"]), (6, 2, ["p1"])]
    assert s.blocks[0].tokens_per_s["suffix"] == pytest.approx(20 / 3)
    assert s.blocks[0].mean_acceptance_length["suffix"] == pytest.approx((6 + 10 + 10) / 6)
    assert s.blocks[0].mean_acceptance_length["plain"] is None
    assert mean_acceptance_length([r for r in recs if r.system == "plain"]) is None
    md = format_markdown(s, ["header line"])
    assert md.startswith("header line") and "| 6-7 | p1 |" in md and "recovery" in md


def test_summary_defaults():
    s = summarize([_rec("plain", 0, 0, 1, 1.0)])
    assert (s.skip, s.fraction, s.window, s.block) == (10, 0.9, 3, 10)
    o = SystemOptions()
    assert (o.lookahead, o.prompt_lookup_tokens) == (8, 10)
    p = argparse.ArgumentParser()
    add_drift_arguments(p)
    a = p.parse_args([])
    assert a.phases == "python,rust,chat,sql,tools"
    assert (a.phase_length, a.max_tokens, a.temperature, a.seed, a.lookahead, a.skip) == (20, 64, 0.0, 0, 8, 10)
    assert a.systems.split(",")[:5] == ["plain", "hf-plain", "hf-prompt-lookup", "ngram", "suffix"]


def test_figure_written(tmp_path):
    recs = []
    for p in range(3):
        for i in range(15):
            recs.append(_rec("plain", p, i, 10, 1.0, n_per_phase=15))
            recs.append(_rec("suffix", p, i, 10 + i, 1.0, n_per_phase=15, draft_steps=5, emitted=5 + i))
    path = plot_drift(recs, tmp_path / "sub" / "drift.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 20_000  # two panels, lines, labels: not an empty canvas


def test_drift_from_args_end_to_end(tiny_model_dir, tmp_path, capsys):
    p = argparse.ArgumentParser()
    add_drift_arguments(p)
    out = tmp_path / "out"
    args = p.parse_args(["--model", str(tiny_model_dir), "--phases", "sql,tools", "--phase-length", "2",
                         "--systems", "plain,ngram,suffix,static", "--max-tokens", "6", "--out", str(out),
                         "--no-progress"])
    assert drift_from_args(args) == 0
    for name in ("drift.jsonl", "summary.md", "drift.png", "run.json"):
        assert (out / name).stat().st_size > 0
    info = json.loads((out / "run.json").read_text())
    assert info["phases"] == ["sql", "tools"] and "plain" in info["systems"]
    assert len(load_records(out / "drift.jsonl")) == 4 * len(info["systems"])
    text = capsys.readouterr().out
    assert "tokens/s per phase" in text and "summary.md" in text
    again = p.parse_args(["--from-jsonl", str(out / "drift.jsonl"), "--out", str(tmp_path / "re")])
    assert drift_from_args(again) == 0
    assert (tmp_path / "re" / "summary.md").read_text() == (out / "summary.md").read_text()


def test_demo_runs_the_short_drift_benchmark(tiny_model_dir, tmp_path, capsys):
    from adaspec import cli

    out = tmp_path / "demo"
    assert cli.main(["demo", "--model", str(tiny_model_dir), "--dtype", "float32", "--phase-length", "1",
                     "--systems", "plain,suffix,atlas", "--max-tokens", "4", "--out", str(out)]) == 0
    records = load_records(out / "drift.jsonl")
    assert sorted({r.phase for r in records}) == sorted(["python", "rust", "chat", "sql", "tools"])
    assert {r.system for r in records} == {"plain", "suffix", "atlas"}
    text = capsys.readouterr().out
    assert "drifting request stream" in text and "tokens/s per phase" in text
    assert str(out / "drift.png") in text and (out / "drift.png").stat().st_size > 0


def test_who_drafted_and_time_shares():
    recs = [_rec("atlas", 0, 0, 10, 1.0, steps_by_speculator={"suffix": 6, "none": 2},
                 draft_seconds=0.1, verify_seconds=0.9, controller_seconds=0.01),
            _rec("atlas", 0, 1, 10, 1.0, steps_by_speculator={"suffix": 1, "draft_head": 3},
                 draft_seconds=0.3, verify_seconds=0.7, controller_seconds=0.03)]
    s = summarize(recs)
    assert s.speculator_shares["atlas"]["p0"] == pytest.approx({"draft_head": 0.25, "none": 1 / 6,
                                                                "suffix": 7 / 12})
    assert s.draft_share["atlas"] == pytest.approx(0.2) and s.controller_share["atlas"] == pytest.approx(0.02)
    md = format_markdown(s)
    assert "draft_head 25%, none 17%, suffix 58%" in md and "| 20.0% | 2.00% |" in md


def test_atlas_system_records_controller_time(tiny_target):
    systems = build_systems(tiny_target, ["atlas"], SystemOptions())
    from adaspec.types import SamplingParams

    out = systems[0].run(tiny_target.tokenizer.encode("def f(x):"), SamplingParams(max_tokens=8, ignore_eos=True))
    assert out.controller_seconds is not None and 0 < out.controller_seconds < out.seconds


def test_floor_systems_exact_and_controller_drops_random_drafts(tiny_target):
    from adaspec.types import SamplingParams

    systems = {s.name: s for s in build_systems(tiny_target, ["plain", "nothing", "random", "atlas-random"],
                                                 SystemOptions())}
    params = SamplingParams(max_tokens=48, ignore_eos=True)
    prompts = [tiny_target.tokenizer.encode(f"zq{i} xv{i * 3} kw") for i in range(3)]
    for p in prompts:
        want = systems["plain"].run(p, params).token_ids
        outs = {n: systems[n].run(p, params) for n in ("nothing", "random", "atlas-random")}
        assert all(o.token_ids == want for o in outs.values())
    assert outs["nothing"].stats.proposed == 0
    assert outs["random"].stats.proposed > 0 and outs["random"].stats.acceptance_rate < 0.1
    # By the third request the controller has stopped drafting with the random speculator.
    steps = outs["atlas-random"].stats.steps_by_speculator
    assert steps.get("random", 0) <= 0.1 * sum(steps.values())


def test_peer_systems_are_told_apart():
    from adaspec.bench.report import is_peer

    assert is_peer("hf-plain") and is_peer("vllm-ngram")
    assert not any(is_peer(s) for s in ("plain", "ngram", "suffix", "static", "atlas", "atlas-random"))


def test_bad_bench_arguments_are_refused(tmp_path, capsys):
    from adaspec import cli

    assert cli.main(["bench", "quality", "--dtypes", ""]) == 2
    assert cli.main(["bench", "quality", "--dtypes", "float32,int4"]) == 2
    assert cli.main(["demo", "--skip", "-1", "--out", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err
    assert "at least one dtype" in err and "int4" in err and "--skip must be >= 0" in err
    assert not (tmp_path / "d").exists()


def test_mismatch_cell_lists_whole_entries_then_a_count():
    from types import SimpleNamespace

    from adaspec.bench.report import _mismatch_cell

    assert _mismatch_cell([]) == "none"
    ms = [SimpleNamespace(request_index=i, phase="rust", prompt_id=f"HumanEval/{i}", first_mismatch=3) for i in range(8)]
    cell = _mismatch_cell(ms)
    assert cell.count("(rust HumanEval/") == 5 and cell.endswith("and 3 more (first_mismatch in drift.jsonl)")
    assert _mismatch_cell(ms[:2]) == "#0 (rust HumanEval/0, token 3), #1 (rust HumanEval/1, token 3)"
