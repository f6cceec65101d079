"""Snapshot store: round trip, corruption detection, crash consistency, inspect."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import adaspec
from adaspec.speculators.suffix import SuffixSpeculator
from adaspec.store import (
    FORMAT_VERSION,
    SnapshotError,
    SnapshotStore,
    decode_snapshot,
    encode_snapshot,
    format_inspect,
    inspect,
    summarize_state,
)
from adaspec.types import ProposeContext

SRC = str(Path(adaspec.__file__).resolve().parents[1])

STATE = {
    "format": "adaspec.suffix",
    "version": 1,
    "tenants": {"acme": {"sequences": [[1, 2, 3], [4, 5]]}, "beta": {"sequences": [[7] * 10]}},
    "shared": {"sequences": [[9, 9]]},
}


def files(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


def test_round_trip(tmp_path):
    store = SnapshotStore(tmp_path)
    path = store.save("suffix", STATE)
    assert path == tmp_path / "suffix.snap"
    assert store.load("suffix") == STATE
    assert files(tmp_path) == ["suffix.snap"]  # no temp file left behind
    assert store.names() == ["suffix"]
    assert store.load("missing") is None
    store.save("suffix", {"tenants": {}})  # overwrite
    assert store.load("suffix") == {"tenants": {}}


def test_speculator_state_survives_a_restart(tmp_path):
    spec = SuffixSpeculator()
    spec.start_request("r", [5, 6], "acme")
    spec.observe("r", [10, 11, 12, 13, 14], 0, 0)
    spec.stop_request("r")
    SnapshotStore(tmp_path).save("suffix", spec.state_dict())
    restarted = SuffixSpeculator()
    restarted.load_state_dict(SnapshotStore(tmp_path).load("suffix"))
    ctx = ProposeContext("new", [10, 11], 0, tenant="acme")
    assert restarted.propose(ctx, 3).token_ids == spec.propose(ctx, 3).token_ids == [12, 13, 14]


def test_bad_name_and_bad_state_write_nothing(tmp_path):
    store = SnapshotStore(tmp_path)
    for name in ["", "../x", ".hidden", "a/b", "-x", "x" * 200]:
        with pytest.raises(ValueError):
            store.save(name, STATE)
    with pytest.raises((TypeError, ValueError)):
        store.save("s", {"x": object()})
    with pytest.raises(ValueError):
        store.save("s", {"x": float("nan")})
    with pytest.raises(TypeError):
        store.save("s", [1, 2])  # type: ignore[arg-type]
    assert files(tmp_path) == []


def _assert_set_aside(tmp_path, caplog, kind):
    names = files(tmp_path)
    assert "suffix.snap" not in names
    assert len(names) == 1 and names[0].startswith(f"suffix.snap.{kind}-")
    assert any(r.levelno == logging.WARNING and "suffix.snap" in r.getMessage() for r in caplog.records)


def test_truncated_snapshot_is_detected_and_set_aside(tmp_path, caplog):
    store = SnapshotStore(tmp_path)
    path = store.save("suffix", STATE)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 7])
    with caplog.at_level(logging.WARNING, logger="adaspec.store"):
        assert store.load("suffix") is None
    _assert_set_aside(tmp_path, caplog, "corrupt")
    # The service starts fresh and can save again.
    assert store.load("suffix") is None
    store.save("suffix", STATE)
    assert store.load("suffix") == STATE


@pytest.mark.parametrize("where", ["payload", "header-value", "header-digest"])
def test_bit_flip_is_detected(tmp_path, caplog, where):
    store = SnapshotStore(tmp_path)
    path = store.save("suffix", STATE)
    data = bytearray(path.read_bytes())
    header_end = data.index(b"\n")
    if where == "payload":
        i = header_end + (len(data) - header_end) // 2
    elif where == "header-value":
        i = data.index(b'"created_unix":') + len('"created_unix":') + 1  # a digit of the time
    else:
        i = data.index(b'"sha256":"') + len('"sha256":"') + 3
    data[i] ^= 0x01
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="adaspec.store"):
        assert store.load("suffix") is None
    _assert_set_aside(tmp_path, caplog, "corrupt")


def test_foreign_version_is_detected_and_set_aside(tmp_path, caplog):
    store = SnapshotStore(tmp_path)
    path = store.save("suffix", STATE)
    data = path.read_bytes()
    header, payload = data.split(b"\n", 1)
    meta = json.loads(header)
    meta["version"] = FORMAT_VERSION + 1
    path.write_bytes(json.dumps(meta).encode() + b"\n" + payload)
    with caplog.at_level(logging.WARNING, logger="adaspec.store"):
        assert store.load("suffix") is None
    _assert_set_aside(tmp_path, caplog, "foreign")
    assert "another format version" in caplog.text


@pytest.mark.parametrize("content", [b"", b"\n", b"garbage", b"{}\n", b'{"magic": "adaspec-snapshot"}\n', b"\xff\xfe\n"])
def test_garbage_files_never_raise(tmp_path, content):
    store = SnapshotStore(tmp_path)
    (tmp_path / "suffix.snap").write_bytes(content)
    assert store.load("suffix") is None
    assert "suffix.snap" not in files(tmp_path)


_BLOB = encode_snapshot("suffix", STATE, created_unix=1_700_000_000.0)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pos=st.integers(0, len(_BLOB) - 1), xor=st.integers(1, 255))
def test_any_single_byte_change_is_detected(pos, xor):
    data = bytearray(_BLOB)
    data[pos] ^= xor
    with pytest.raises(SnapshotError):
        decode_snapshot(bytes(data))


def test_decode_rejects_a_gzip_payload_that_is_not_a_dict():
    assert decode_snapshot(_BLOB)[1] == STATE
    assert decode_snapshot(_BLOB)[0]["summary"] == {"tenants": {"acme": 5, "beta": 10}, "shared_tokens": 2, "tokens": 17}


# -- crash consistency ----------------------------------------------------------

_WRITER = textwrap.dedent(
    """
    import os, signal, sys
    from adaspec.store import SnapshotStore
    store = SnapshotStore(sys.argv[1])
    mode = sys.argv[2]
    blob = list(range(150_000))
    if mode == "die-mid-write":
        # SIGKILL ourselves after half the bytes reached the temp file.
        real_fdopen = os.fdopen
        class HalfWriter:
            def __init__(self, f): self.f = f
            def __enter__(self): return self
            def __exit__(self, *a): return False
            def write(self, data):
                self.f.write(data[: len(data) // 2]); self.f.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            def __getattr__(self, k): return getattr(self.f, k)
        os.fdopen = lambda fd, mode: HalfWriter(real_fdopen(fd, mode))
    i = 0
    while True:
        i += 1
        store.save("suffix", {"i": i, "check": 7 * i, "blob": blob})
        print(i, flush=True)
    """
)


def _spawn_writer(state_dir, mode):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")]))
    return subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(state_dir), mode], stdout=subprocess.PIPE, env=env, text=True
    )


def _check_intact(state):
    assert state is not None
    if "i" in state:  # one of the writer's complete snapshots
        assert state["check"] == 7 * state["i"] and state["blob"] == list(range(150_000))
    else:
        assert state == STATE


def test_sigkill_mid_write_keeps_the_previous_snapshot(tmp_path):
    SnapshotStore(tmp_path).save("suffix", STATE)
    proc = _spawn_writer(tmp_path, "die-mid-write")
    assert proc.wait(timeout=60) == -signal.SIGKILL
    names = files(tmp_path)
    assert "suffix.snap" in names and any(n.startswith(".suffix.snap.tmp-") for n in names)  # the torn write
    store = SnapshotStore(tmp_path)  # a restart
    assert store.load("suffix") == STATE
    assert files(tmp_path) == ["suffix.snap"]  # the dead writer's temp file is cleaned up


def test_sigkill_at_random_times_while_saving_in_a_loop(tmp_path):
    SnapshotStore(tmp_path).save("suffix", STATE)
    for delay in (0.0, 0.05, 0.13):
        proc = _spawn_writer(tmp_path, "loop")
        assert proc.stdout is not None
        proc.stdout.readline()  # at least one save completed
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        proc.stdout.close()
        state = SnapshotStore(tmp_path).load("suffix")
        _check_intact(state)
        assert state is not None and "i" in state
        assert not any(n.startswith(".") for n in files(tmp_path))


# -- inspect --------------------------------------------------------------------


def test_inspect_reports_tenants_tokens_size_and_age(tmp_path):
    store = SnapshotStore(tmp_path)
    store.save("suffix", STATE)
    store.save("other", {"speculators": {"suffix": {"tenants": {"x": {"sequences": [[1, 2]]}}}}})
    (tmp_path / "broken.snap").write_bytes(b"nonsense")
    entries = {e["name"]: e for e in inspect(tmp_path)}
    ok = entries["suffix"]
    assert ok["status"] == "ok" and ok["version"] == FORMAT_VERSION
    assert ok["tenants"] == {"acme": 5, "beta": 10} and ok["tokens"] == 17
    assert ok["size_bytes"] == (tmp_path / "suffix.snap").stat().st_size
    assert 0 <= ok["age_s"] < 60
    assert entries["other"]["tenants"] == {"x": 2}  # nested namespaces are found
    assert entries["broken"]["status"] == "corrupt"
    assert files(tmp_path) == ["broken.snap", "other.snap", "suffix.snap"]  # inspect changes nothing
    text = format_inspect(tmp_path)
    for needle in ("suffix", "acme", "beta", "17", "corrupt", "TENANTS", "AGE"):
        assert needle in text
    store.load("broken")
    assert any(e["status"] == "set-aside" for e in inspect(tmp_path))


def test_inspect_missing_or_empty_dir(tmp_path):
    assert inspect(tmp_path / "nope") == []
    assert "no such state directory" in format_inspect(tmp_path / "nope")
    assert "no snapshots" in format_inspect(tmp_path)


def test_summarize_state_ignores_odd_shapes():
    assert summarize_state({"tenants": "x"})["tokens"] == 0
    assert summarize_state({"tenants": {"a": {"sequences": [[1], "x", [2, 3]]}}}) == {
        "tenants": {"a": 3},
        "shared_tokens": 0,
        "tokens": 3,
    }
