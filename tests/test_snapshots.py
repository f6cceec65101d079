"""Learned-state snapshots while serving: interval and token triggers, consistency, SIGKILL, 0600, bounds."""

from __future__ import annotations

import os
import random
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from adaspec.engine import Engine
from adaspec.server import create_app
from adaspec.server.scheduler import Scheduler
from adaspec.server.snapshots import DEFAULT_SNAPSHOT_INTERVAL_S, DEFAULT_SNAPSHOT_TOKENS, SnapshotSaver
from adaspec.server.testing import BackgroundServer
from adaspec.speculators.suffix import SuffixSpeculator
from adaspec.store import SnapshotStore
from test_server_cli import _free_port


class _Store:
    def __init__(self) -> None:
        self.saved: list[tuple[str, dict]] = []

    def save(self, name, state):
        self.saved.append((name, state))


def test_saver_triggers_interval_tokens_and_nothing_learned(monkeypatch) -> None:
    monkeypatch.setattr("adaspec.server.snapshots.MIN_GAP_S", 0.0)
    seen = [0]
    store = _Store()
    saver = SnapshotSaver(store, lambda: {"suffix": {"n": seen[0]}}, progress=lambda: seen[0], interval_s=0.3,
                          learned_tokens=100)
    assert not saver._due()  # nothing learned: nothing to write, however long it waits
    time.sleep(0.35)
    assert not saver._due()
    seen[0] = 5
    assert saver._due()  # learned something and the interval passed
    assert saver.snapshot() and store.saved == [("suffix", {"n": 5})] and saver.age_s() < 1
    seen[0] = 200
    assert saver._due()  # the token trigger does not wait for the interval
    saver.snapshot()
    assert not saver._due()
    saver.mark_dirty()
    assert saver._due()  # e.g. a tenant's state was deleted
    assert (DEFAULT_SNAPSHOT_INTERVAL_S, DEFAULT_SNAPSHOT_TOKENS) == (60.0, 50_000)


def test_saver_thread_writes_on_its_interval(tmp_path) -> None:
    seen = [0]
    store = SnapshotStore(tmp_path)
    saver = SnapshotSaver(store, lambda: {"suffix": {"n": seen[0]}}, progress=lambda: seen[0], interval_s=1.0,
                          learned_tokens=0)
    saver.start()
    try:
        seen[0] = 3
        deadline = time.monotonic() + 5
        while saver.snapshots == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        saver.stop()
    assert store.load("suffix") == {"n": 3}
    mode = stat.S_IMODE((tmp_path / "suffix.snap").stat().st_mode)
    assert mode == 0o600, oct(mode)  # learned state is users' text


def test_run_between_steps_runs_on_the_engine_thread(tiny_target) -> None:
    sched = Scheduler(Engine(tiny_target, []))
    sched.start()
    try:
        assert sched.run_between_steps(lambda: threading.current_thread().name).result(5) == "adaspec-engine"
        with pytest.raises(ZeroDivisionError):
            sched.run_between_steps(lambda: 1 / 0).result(5)
    finally:
        sched.shutdown()
    assert sched.run_between_steps(lambda: 7).result(1) == 7  # worker gone: runs on the caller


# ------------------------------------------------------------------ a real server, killed
def _start(cmd, env):
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return proc


def _wait_up(proc, base, timeout_s=300):  # start-up imports torch; slow on a loaded machine
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(base + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, "server did not come up"
        time.sleep(0.2)


def _contains(seq, sub) -> bool:
    n = len(sub)
    return any(seq[i:i + n] == sub for i in range(len(seq) - n + 1))


def test_sigkill_during_traffic_loses_at_most_one_interval_and_never_tears(tiny_model_dir, tmp_path) -> None:
    """Traffic, SIGKILL at random points, restart: the learned state is the last whole snapshot."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    state_dir = tmp_path / "state"
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "adaspec.server.main", "--model", str(tiny_model_dir), "--port", str(port),
           "--served-model-name", "tiny", "--max-model-len", "256", "--log-level", "warning",
           "--dtype", "float32", "--threads", "1", "--speculator", "suffix", "--state-dir", str(state_dir), "--snapshot-interval", "1",
           "--snapshot-tokens", "0", "--shutdown-timeout", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    rng = random.Random(0)
    interval_s = 1.0
    for round_ in range(2):
        proc = _start(cmd, env)
        try:
            _wait_up(proc, base)
            client = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0, timeout=30)
            marker = f"marker {round_} zebra quartz {round_} " * 2
            client.completions.create(model="tiny", prompt=marker, max_tokens=8, temperature=0)
            marked_at = time.monotonic()
            stop = threading.Event()

            def traffic():
                i = 0
                while not stop.is_set():
                    try:
                        client.completions.create(model="tiny", prompt=f"round {round_} request {i} " * 3,
                                                  max_tokens=12, temperature=0)
                    except Exception:
                        return  # the server was killed
                    i += 1

            t = threading.Thread(target=traffic, daemon=True)
            t.start()
            time.sleep(interval_s * 2.5 + rng.random() * 2)  # a random point, well after the marker
            proc.send_signal(signal.SIGKILL)
            proc.wait(30)
            killed_at = time.monotonic()
            stop.set()
            t.join(30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert not list(state_dir.glob("*.corrupt-*")) and not list(state_dir.glob("*.foreign-*"))
        state = SnapshotStore(state_dir).load("suffix")  # a whole snapshot, never a torn one
        assert state is not None
        seqs = [s for c in state["tenants"].values() for s in c["sequences"]]
        assert killed_at - marked_at > interval_s + 1.0
        marker_ids = tok.encode(marker, add_special_tokens=False)[2:12]
        assert any(_contains(s, marker_ids) for s in seqs), "learned more than one interval ago, yet lost"
    # Restart without traffic and stop gracefully: what it saves is what it loaded, the last snapshot.
    last = SnapshotStore(state_dir).load("suffix")
    proc = _start(cmd, env)
    try:
        _wait_up(proc, base)
        age = float(next(line.split()[-1] for line in httpx.get(base + "/metrics").text.splitlines()
                         if line.startswith("adaspec_snapshot_age_seconds")))
        assert 0 <= age < 120
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert SnapshotStore(state_dir).load("suffix") == last


def test_learned_state_plateaus_at_its_bounds_on_a_long_stream(tiny_target) -> None:
    """Small caps, a stream long enough to pass them many times: stored tokens, records and resident memory stay flat."""
    cap_tokens, cap_nodes = 1500, 4000
    spec = SuffixSpeculator(max_tokens_per_tenant=cap_tokens, max_nodes_per_tenant=cap_nodes)
    app = create_app(Engine(tiny_target, [spec], lookahead=4), "tiny", request_timeout_s=120)
    import gc

    import psutil

    sizes, rss = [], {}
    with BackgroundServer(app) as server:
        client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0, timeout=60)
        for i in range(120):
            client.completions.create(model="tiny", prompt=f"stream item {i}: " + f"w{i % 13} " * 12,
                                      max_tokens=24, temperature=0)
            stats = spec.memory_stats()["tenants"]["default"]
            sizes.append((stats["tokens"], stats["nodes"]))
            if i in (59, 119):  # the server process's resident memory, half way and at the end
                gc.collect()
                rss[i] = psutil.Process().memory_info().rss
        spec.check_integrity()
    # Resident memory stays flat once the learned state is at its bounds.
    assert rss[119] - rss[59] < max(0.10 * rss[59], 16 << 20), rss
    total_learned = 120 * (24 + 30)
    assert total_learned > 4 * cap_tokens  # the stream passes the bound several times over
    assert all(t <= cap_tokens and n <= cap_nodes for t, n in sizes)
    tail = [t for t, _ in sizes[60:]]
    assert max(tail) - min(tail) < 0.2 * cap_tokens, tail  # flat once at the bound
    assert min(tail) > 0.7 * cap_tokens
