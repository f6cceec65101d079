"""Governed learned state: delete a tenant, retention by age, per-request opt-out, admin key."""

from __future__ import annotations

import stat
import time

import httpx
import pytest

from adaspec import cli
from adaspec.config import EngineConfig, build_controller
from adaspec.engine import Engine
from adaspec.server import create_app
from adaspec.server.main import parse_duration_s
from adaspec.server.testing import BackgroundServer
from adaspec.speculators.suffix import SuffixSpeculator
from adaspec.store import SnapshotStore
from adaspec.types import ProposeContext, SamplingParams

PATTERN = [5, 6, 7, 8, 9, 10, 11, 12] * 3


def _draft(spec, tenant, ids):
    spec.start_request("probe", ids, tenant)
    try:
        return spec.propose(ProposeContext("probe", ids, len(ids), tenant=tenant), 8).token_ids
    finally:
        spec.stop_request("probe")


def _learn(spec, rid, tenant, prompt, output, learn=True):
    (spec.start_request if learn else spec.start_request_private)(rid, prompt, tenant)
    spec.observe(rid, output, 0, 0)
    spec.stop_request(rid)


def test_forget_tenant_makes_it_cold_and_spares_others():
    spec = SuffixSpeculator()
    _learn(spec, "r1", "a", [1, 2, 3], PATTERN)
    _learn(spec, "r2", "b", [1, 2, 3], PATTERN)
    probe = [1, 2, 3, 5, 6, 7]
    assert _draft(spec, "a", probe)  # learned
    assert spec.forget_tenant("a") >= 1
    assert "a" not in spec.memory_stats()["tenants"] and "a" not in spec.state_dict()["tenants"]
    assert _draft(spec, "a", probe) == _draft(SuffixSpeculator(), "a", probe)  # drafts like a cold one
    assert _draft(spec, "b", probe)  # another tenant keeps its state
    assert spec.forget_tenant("nobody") == 0
    spec.check_integrity()


def test_forget_tenant_during_a_live_request_stops_it_feeding():
    spec = SuffixSpeculator()
    spec.start_request("live", [1, 2, 3], "a")
    spec.observe("live", PATTERN[:8], 0, 0)
    spec.forget_tenant("a")
    spec.observe("live", PATTERN[8:], 0, 0)
    spec.stop_request("live")
    assert "a" not in spec.memory_stats()["tenants"]
    spec.check_integrity()


def test_private_request_leaves_no_trace_but_still_drafts():
    spec = SuffixSpeculator()
    _learn(spec, "r1", "a", [1, 2, 3], PATTERN)
    before = spec.state_dict()
    spec.start_request_private("p", [40, 41, 42, 43] * 4, "a")
    ctx = ProposeContext("p", [40, 41, 42, 43] * 4 + [1, 2, 3, 5, 6], 16, tenant="a")
    assert spec.propose(ctx, 4).token_ids  # drafts from the tenant and its own context
    spec.observe("p", [77, 78, 79] * 5, 0, 0)
    spec.stop_request("p")
    assert spec.state_dict() == before


def test_engine_request_with_learn_false_leaves_no_trace(tiny_target):
    spec = SuffixSpeculator()
    eng = Engine(tiny_target, [spec], lookahead=4)
    eng.generate("the cat sat on the mat " * 3, SamplingParams(max_tokens=16))
    before = spec.state_dict()
    r = eng.generate("a private prompt, never stored " * 2, SamplingParams(max_tokens=16, learn=False))
    assert len(r.token_ids) == 16
    assert spec.state_dict() == before
    atlas = build_controller(EngineConfig(speculator="atlas", lookahead=4, calibrate=False), tiny_target)
    eng = Engine(tiny_target, controller=atlas)
    eng.generate("a private prompt " * 3, SamplingParams(max_tokens=12, learn=False))
    assert not atlas.adaptive.memory_stats()["tenants"].get("default", {}).get("tokens")


def test_retention_drops_old_sequences_and_survives_a_snapshot():
    spec = SuffixSpeculator()
    _learn(spec, "old", "a", [1, 2, 3], PATTERN)
    time.sleep(0.02)
    cut = time.time()
    time.sleep(0.02)
    _learn(spec, "new", "a", [4, 4, 4], [30, 31, 32, 33] * 3)
    restored = SuffixSpeculator()
    restored.load_state_dict(spec.state_dict())  # times travel with the snapshot
    spec.start_request("live", [9, 9], "b")  # live: kept whatever its age
    for s in (spec, restored):
        assert s.forget_older_than(time.time() - cut) == 1
        seqs = s.state_dict()["tenants"]["a"]["sequences"]
        assert len(seqs) == 1 and seqs[0][:3] == [4, 4, 4]
        assert s.forget_older_than(0.0, now=time.time() + 1) == 1
        assert "a" not in s.memory_stats()["tenants"]  # empty and idle: the tenant goes too
        s.check_integrity()
    assert "b" in spec.memory_stats()["tenants"]
    legacy = {k: v for k, v in spec.state_dict().items()}
    for t in legacy["tenants"].values():
        t.pop("learned_unix")
    SuffixSpeculator().load_state_dict(legacy)  # snapshots without times still load


def test_parse_duration():
    assert [parse_duration_s(x) for x in ("3600", "90s", "15m", "12h", "30d")] == [3600, 90, 900, 43200, 2592000]
    for bad in ("", "0", "-1d", "soon", "inf"):
        with pytest.raises(ValueError):
            parse_duration_s(bad)


def test_state_delete_cli(tmp_path, capsys):
    spec = SuffixSpeculator()
    _learn(spec, "r1", "a", [1, 2, 3], PATTERN)
    _learn(spec, "r2", "b", [1, 2, 3], PATTERN)
    store = SnapshotStore(tmp_path)
    store.save("suffix", spec.state_dict())
    store.save("atlas", {"children": {"suffix": spec.state_dict()},
                         "estimates": [{"speculator": "suffix", "tenant": "a", "mode": "g", "position": [],
                                        "calibration": []}]})
    assert cli.main(["state", "delete", str(tmp_path), "--tenant", "a"]) == 0
    assert "removed" in capsys.readouterr().out
    assert list(store.load("suffix")["tenants"]) == ["b"]
    atlas = store.load("atlas")
    assert list(atlas["children"]["suffix"]["tenants"]) == ["b"] and atlas["estimates"] == []
    assert stat.S_IMODE((tmp_path / "suffix.snap").stat().st_mode) == 0o600
    assert cli.main(["state", "delete", str(tmp_path / "missing"), "--tenant", "a"]) == 2


def test_admin_delete_endpoint_and_opt_out_through_the_server(tiny_target, tmp_path):
    spec = SuffixSpeculator()
    store = SnapshotStore(tmp_path)
    app = create_app(Engine(tiny_target, [spec], lookahead=6), "tiny", state_store=store, admin_key="root",
                     snapshot_interval_s=0, snapshot_tokens=0)
    body = {"model": "tiny", "prompt": "one two three four " * 4, "max_tokens": 24, "temperature": 0}
    with BackgroundServer(app) as server:
        base = server.base_url

        def complete(tenant, **extra):
            r = httpx.post(base + "/v1/completions", json={**body, **extra},
                           headers={"X-Adaspec-Tenant": tenant}, timeout=60)
            assert r.status_code == 200, r.text
            return r.json()["adaspec"]

        cold = complete("a")
        warm = complete("a")
        assert warm["accepted"] > cold["accepted"]  # learned from the first
        complete("b")
        url = base + "/admin/tenants/a/state"
        assert httpx.delete(url).status_code == 401
        r = httpx.delete(url, headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_admin_key"
        assert httpx.delete(base + "/admin/tenants/bad%20name/state",
                            headers={"Authorization": "Bearer root"}).status_code == 400
        r = httpx.delete(url, headers={"Authorization": "Bearer root"})
        assert r.status_code == 200 and r.json()["snapshot_written"] is True, r.text
        assert "a" not in spec.memory_stats()["tenants"]
        assert "a" not in store.load("suffix")["tenants"] and "b" in store.load("suffix")["tenants"]
        again = complete("a")  # drafts like a cold one
        assert (again["proposed"], again["accepted"]) == (cold["proposed"], cold["accepted"])

        before = spec.state_dict()
        complete("a", prompt="never store this " * 3, adaspec={"learn": False})
        assert spec.state_dict() == before
        for bad in ({"learn": "no"}, {"forget": True}, "off"):
            r = httpx.post(base + "/v1/completions", json={**body, "adaspec": bad}, timeout=30)
            assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error", r.text
    disabled = create_app(Engine(tiny_target, []), "tiny")
    with BackgroundServer(disabled) as server:
        r = httpx.delete(server.base_url + "/admin/tenants/a/state", headers={"Authorization": "Bearer x"})
        assert r.status_code == 403 and r.json()["error"]["code"] == "admin_disabled"


def test_serve_governance_and_snapshot_option_defaults(monkeypatch):
    import argparse

    from adaspec.server import add_serve_arguments

    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    a = parser.parse_args([])
    assert (a.snapshot_interval, a.snapshot_tokens, a.admin_key, a.state_retention) == (60.0, 50_000, None, None)
    assert parser.parse_args(["--state-retention", "2d"]).state_retention == 172800.0
