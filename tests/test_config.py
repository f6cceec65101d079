"""One place builds the engine: defaults defined once, and the import directions between the layers."""

from __future__ import annotations

import argparse
import ast
from pathlib import Path

import pytest

from adaspec import config
from adaspec.threads import THREADS_AUTO, parse_threads

SRC = Path(__file__).resolve().parents[1] / "src" / "adaspec"


def _parse(argv: list[str]) -> argparse.Namespace:
    from adaspec.cli import build_parser

    return build_parser().parse_args(argv)


def test_cli_server_and_bench_defaults_come_from_config():
    from adaspec.bench.drift import add_drift_arguments
    from adaspec.bench.restart import add_restart_arguments
    from adaspec.server import add_serve_arguments

    want = (config.DEFAULT_MODEL, config.DEFAULT_DTYPE, THREADS_AUTO)
    gen = _parse(["generate", "--prompt", "x"])
    serve = argparse.ArgumentParser()
    add_serve_arguments(serve)
    srv = serve.parse_args([])
    drift = argparse.ArgumentParser()
    add_drift_arguments(drift)
    dr = drift.parse_args([])
    demo = _parse(["demo"])
    restart = argparse.ArgumentParser()
    add_restart_arguments(restart)
    rs = restart.parse_args([])
    for ns in (gen, srv, dr, demo):
        assert (ns.model, ns.dtype, ns.threads) == want
    assert (rs.model, rs.dtype, rs.threads) == want
    for ns in (gen, srv):
        assert (ns.speculator, ns.lookahead, ns.state_dir) == (config.DEFAULT_SPECULATOR, None, None)
        cfg = config.config_from_args(ns)
        assert cfg.effective_lookahead == config.ATLAS_LOOKAHEAD
    assert dr.lookahead == config.DEFAULT_LOOKAHEAD
    assert config.EngineConfig() == config.config_from_args(srv)


def test_documented_defaults():
    assert (config.DEFAULT_DTYPE, config.DEFAULT_SPECULATOR) == ("int8", "atlas")
    assert (config.default_lookahead("ngram"), config.default_lookahead("atlas")) == (8, 16)
    assert config.EngineConfig().threads == "auto" and config.EngineConfig().runtime == "auto"
    assert _parse(["generate", "--prompt", "x"]).runtime == "auto"


@pytest.mark.parametrize("field,value,match", [
    ("dtype", "int4", "dtype"), ("speculator", "psychic", "speculator"), ("lookahead", -1, "lookahead"),
    ("threads", "many", "threads"), ("threads", 0, "threads"), ("max_model_len", 1, "max_model_len"),
    ("draft_model", "x", "--draft-model"), ("runtime", "cuda", "runtime"),
])
def test_bad_settings_are_refused(field, value, match):
    cfg = config.EngineConfig(**{field: value})
    with pytest.raises(ValueError, match=match):
        cfg.validate()


def test_parse_threads():
    assert parse_threads("auto") == parse_threads(None) == THREADS_AUTO
    assert parse_threads("2") == parse_threads(2) == 2
    for bad in ("0", "-1", "two", True, 1.5):
        with pytest.raises(ValueError):
            parse_threads(bad)


def test_cli_refuses_bad_threads(capsys):
    from adaspec.cli import main

    assert main(["generate", "--prompt", "x", "--threads", "zero"]) == 2
    assert "threads must be" in capsys.readouterr().err


def _imports(path: Path) -> set[str]:
    """Every ``adaspec.*`` module a file imports, at top level or inside functions."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return {m for m in out if m.startswith("adaspec")}


def _layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in ("cli", "bench", "server"):
        return parts[1]
    return "runtime"


def test_import_directions():
    """cli may import anything; bench and server never import cli; server never imports bench;
    the runtime (everything else) imports none of cli, bench, server."""
    allowed = {"cli": {"cli", "bench", "server", "runtime"}, "bench": {"bench", "server", "runtime"},
               "server": {"server", "runtime"}, "runtime": {"runtime"}}
    bad = []
    for path in SRC.rglob("*.py"):
        module = "adaspec." + ".".join(path.relative_to(SRC).with_suffix("").parts)
        layer = _layer(module)
        for imp in _imports(path):
            if _layer(imp) not in allowed[layer]:
                bad.append(f"{module} ({layer}) imports {imp}")
    assert not bad, "\n".join(bad)


def test_speculators_and_controller_do_not_import_transformers_or_the_engine():
    files = [SRC / "controller.py", SRC / "estimates.py", *(SRC / "speculators").glob("*.py")]
    for path in files:
        if path.name == "draft_model.py":  # loads its small LM with transformers by design
            continue
        text = path.read_text(encoding="utf-8")
        assert "import transformers" not in text and "from transformers" not in text, path
        assert "adaspec.engine" not in _imports(path) and "adaspec.target" not in _imports(path), path


def test_thread_governor_drops_to_one_thread_while_others_are_busy():
    from adaspec.threads import ThreadGovernor

    clock = [0.0]
    state = {"busy": 0.0, "own": 0.0}
    applied = []

    def sample():
        return clock[0], state["busy"], state["own"]

    gov = ThreadGovernor(2, interval_s=1.0, busy_cores=0.25, sample=sample, set_threads=applied.append,
                         clock=lambda: clock[0])
    assert gov.available and gov.poll() == 2

    def advance(seconds, own_cores, other_cores):
        clock[0] += seconds
        state["own"] += own_cores * seconds
        state["busy"] += (own_cores + other_cores) * seconds
        return gov.poll()

    assert advance(1.0, 2.0, 0.0) == 2 and applied == []     # only this process: stays at 2
    assert advance(1.0, 1.0, 0.9) == 1 and applied == [1]     # another process took most of a core
    assert advance(0.5, 1.0, 0.0) == 1                         # within the interval: no new look
    assert advance(1.0, 1.0, 0.2) == 1 and applied == [1]     # between half the threshold and it: stays
    assert advance(1.0, 1.0, 0.1) == 2 and applied == [1, 2]  # quiet again
    assert gov.switches == 2
    assert ThreadGovernor(2, sample=lambda: None).available is False
    with pytest.raises(ValueError, match="threads must be"):
        ThreadGovernor(0)


def test_wait_policy_bounds_spinning_unless_the_user_chose():
    import subprocess
    import sys

    code = "import adaspec, os; print(os.environ.get('GOMP_SPINCOUNT'), os.environ.get('OMP_WAIT_POLICY'))"
    env = {k: v for k, v in __import__("os").environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True).stdout.split()
    assert out == ["100000", "None"]
    out = subprocess.run([sys.executable, "-c", code], env={**env, "OMP_WAIT_POLICY": "PASSIVE"},
                         capture_output=True, text=True).stdout.split()
    assert out == ["None", "PASSIVE"]


def test_cost_tables_are_measured_once_per_machine_setting_and_read_back(tiny_target, tmp_path, monkeypatch):
    """The controller's verify-cost tables: measured on the first start, read from disk on the next (no
    forward), measured again for another thread count, after damage to the file, or with the cache off."""
    import torch

    from adaspec import step_cost

    monkeypatch.setenv("ADASPEC_CACHE", str(tmp_path))
    monkeypatch.delenv("ADASPEC_COST_CACHE", raising=False)
    calls = []
    real_step, real_batch = step_cost.measure_step_cost, step_cost.measure_batch_cost
    monkeypatch.setattr(step_cost, "measure_step_cost", lambda *a, **k: calls.append("step") or real_step(*a, **k))
    monkeypatch.setattr(step_cost, "measure_batch_cost", lambda *a, **k: calls.append("batch") or real_batch(*a, **k))

    def fresh_start():  # a new process: nothing kept on the target
        for attr in ("_adaspec_verify_ms_table", "_adaspec_batch_ms_table"):
            monkeypatch.delattr(tiny_target, attr, raising=False)
        return config.calibrated_cost_model(tiny_target)

    first = fresh_start()
    assert calls == ["step", "batch"]
    (stored,) = (tmp_path / "costs").glob("*.json")
    second = fresh_start()
    assert calls == ["step", "batch"], "read back, not measured"
    assert second.verify == first.verify and second.batch == first.batch and first.batch

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)
        fresh_start()
    finally:
        torch.set_num_threads(threads)
    assert calls == ["step", "batch"] * 2, "another thread count is measured anew"
    assert len(list((tmp_path / "costs").glob("*.json"))) == 2

    stored.write_text('{"verify_ms": {"1": -3')  # damaged: measured again, and replaced
    fresh_start()
    assert calls == ["step", "batch"] * 3
    fresh_start()
    assert calls == ["step", "batch"] * 3

    monkeypatch.setenv("ADASPEC_COST_CACHE", "0")
    fresh_start()
    assert calls == ["step", "batch"] * 4


def test_auto_threads_takes_one_thread_on_a_busy_machine_without_timing_more(monkeypatch):
    """``--threads auto`` at start-up: other processes busy while the one-thread forwards ran -> one
    thread, and the multi-thread forwards (seconds each beside a busy process) are not timed; on a
    quiet machine both are timed, the faster is set, and a team that runs 3x slower is cut short."""
    import torch

    from adaspec import threads

    class Target:
        pass

    calls, logs = [], []
    monkeypatch.setattr(threads, "available_cores", lambda: 2)
    before = torch.get_num_threads()
    try:
        monkeypatch.setattr(threads, "_forward_ms", lambda t, n, give_up_ms=None: calls.append(n) or 10.0)
        samples = iter([(0.0, 0.0, 0.0), (1.0, 1.1, 0.2)])  # others: 0.9 cores
        monkeypatch.setattr(threads, "cpu_sample", lambda: next(samples))
        assert threads.tune_threads(Target(), THREADS_AUTO, log=logs.append) == 1
        assert calls == [1, 1] and "other processes used 0.90 cores" in logs[-1]

        calls.clear()
        monkeypatch.setattr(threads, "_forward_ms",
                            lambda t, n, give_up_ms=None: calls.append((n, give_up_ms)) or (10.0 if n == 1 else 6.0))
        samples = iter([(0.0, 0.0, 0.0), (1.0, 0.3, 0.25)])  # others: 0.05 cores
        monkeypatch.setattr(threads, "cpu_sample", lambda: next(samples))
        t = Target()
        assert threads.tune_threads(t, THREADS_AUTO, log=logs.append) == 2
        assert calls == [(1, None), (1, None), (2, 30.0), (2, 30.0)] and "6.0 ms at 2" in logs[-1]
        assert isinstance(t.thread_governor, threads.ThreadGovernor)

        calls.clear()
        monkeypatch.setattr(threads, "_forward_ms",
                            lambda t, n, give_up_ms=None: calls.append(n) or (10.0 if n == 1 else 95.0))
        samples = iter([(0.0, 0.0, 0.0), (1.0, 0.3, 0.25)])
        monkeypatch.setattr(threads, "cpu_sample", lambda: next(samples))
        assert threads.tune_threads(Target(), THREADS_AUTO) == 1
        assert calls == [1, 1, 2], "a team 3x slower than one thread is timed once"
    finally:
        torch.set_num_threads(before)


def test_auto_threads_reuses_an_earlier_starts_timings_and_only_checks_the_load(monkeypatch, tmp_path):
    """``--threads auto``: timings taken on a quiet machine are kept in the cost cache; a later start
    times nothing and decides from them, unless other processes were busy while the target loaded
    (``since``), when it takes one thread. A damaged file is timed again."""
    import torch

    from adaspec import threads

    class Target:
        name = "tiny-thread-test"

    monkeypatch.setenv("ADASPEC_CACHE", str(tmp_path))
    monkeypatch.setattr(threads, "available_cores", lambda: 2)
    calls, logs = [], []
    monkeypatch.setattr(threads, "_forward_ms",
                        lambda t, n, give_up_ms=None: calls.append(n) or (10.0 if n == 1 else 6.0))

    def start(*samples, since=None):
        it = iter(samples)
        monkeypatch.setattr(threads, "cpu_sample", lambda: next(it))
        torch.set_num_threads(1)  # what apply_threads sets for "auto" before the target loads
        return threads.tune_threads(Target(), THREADS_AUTO, log=logs.append, since=since)

    before = torch.get_num_threads()
    try:
        quiet = (1.0, 0.3, 0.25)  # others: 0.05 cores
        assert start((0.0, 0.0, 0.0), quiet) == 2 and calls == [1, 1, 2, 2]
        assert len(list((tmp_path / "costs").glob("*.json"))) == 1
        calls.clear()
        assert start(quiet, since=(0.0, 0.0, 0.0)) == 2 and calls == []
        assert "6.0 ms at 2 (timed at an earlier start)" in logs[-1]
        assert start((1.0, 1.1, 0.2), since=(0.0, 0.0, 0.0)) == 1 and calls == []  # busy while loading
        assert "other processes used 0.90 cores" in logs[-1]
        next((tmp_path / "costs").glob("*.json")).write_text('{"thread_timings_ms": {"1": -1')
        assert start((0.0, 0.0, 0.0), quiet, since=(0.0, 0.0, 0.0)) == 2 and calls == [1, 1, 2, 2]
    finally:
        torch.set_num_threads(before)


def test_console_entry_skips_teardown_only_once_everything_is_written(monkeypatch):
    """``adaspec`` (cli.entry): after a command that set the fast-exit flag, with no other thread or
    child process alive, it leaves by os._exit with main's status; otherwise, and before the flag
    is set, by sys.exit. A closed pipe is exit status 1 without a traceback."""
    import threading

    from adaspec import cli

    exits = []

    def fake_exit(rc):
        exits.append(("os._exit", rc))
        raise SystemExit(rc)

    monkeypatch.setattr(cli.os, "_exit", fake_exit)
    monkeypatch.setitem(cli._FAST_EXIT, "ok", False)
    monkeypatch.setattr(cli, "main", lambda: 3)
    with pytest.raises(SystemExit) as e:
        cli.entry()
    assert e.value.code == 3 and exits == []  # nothing said it is safe: the normal exit

    def generate_done():
        cli._FAST_EXIT["ok"] = True
        return 0

    monkeypatch.setattr(cli, "main", generate_done)
    with pytest.raises(SystemExit):
        cli.entry()
    assert exits == [("os._exit", 0)]

    release = threading.Event()
    worker = threading.Thread(target=release.wait)  # a non-daemon thread still running: no fast exit
    worker.start()
    try:
        with pytest.raises(SystemExit) as e:
            cli.entry()
        assert e.value.code == 0 and exits == [("os._exit", 0)]
    finally:
        release.set()
        worker.join()

    def broken_pipe():
        raise BrokenPipeError

    monkeypatch.setattr(cli, "main", broken_pipe)
    monkeypatch.setattr(cli.os, "dup2", lambda a, b: None)
    with pytest.raises(SystemExit) as e:
        cli.entry()
    assert e.value.code == 1
