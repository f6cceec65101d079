"""Online learning (issue 15): labels, buffer, trainer, publication, hot swap, rollback, tenants.

Tiny random llamas stand in for the target and a tiny head for the static
one; the trainer process test starts the real ``python -m adaspec.online.trainer``.
"""

from __future__ import annotations

import copy
import time

import pytest
import torch

from adaspec.controller import FixedController
from adaspec.engine import Engine
from adaspec.online.buffer import LabelBuffer, TrafficDoc, doc_from_capture
from adaspec.online.learned import LearnedHeadSpeculator
from adaspec.online.trainer import OnlineConfig, OnlineTrainer, load_replay, save_replay
from adaspec.online.versions import (head_digest, list_versions, load_version, publish, read_current, set_current,
                                     tenant_key, trained_state)
from adaspec.speculators.draft_head import new_draft_head, save_draft_head, target_embedding_weight
from adaspec.types import SamplingParams

PROMPT = "def fibonacci(n):\n    # return the n-th Fibonacci number\n"


class Sink:
    """Stands in for the trainer client: keeps what the speculator sends."""

    def __init__(self):
        self.sent = []
        self.errors = []
        self.alive = False

    def send(self, msg):
        self.sent.append(msg)

    def poll(self):
        return []

    def close(self):
        pass


def case_prompts(target, n=10):
    return [target.tokenizer.encode(PROMPT + f"# case {i}\n") for i in range(n)]


@pytest.fixture(scope="module")
def vocab(tiny_target):
    """A draft vocabulary holding every token the tiny target says after the test prompts."""
    seen = []
    for p in case_prompts(tiny_target) + [tiny_target.tokenizer.encode(PROMPT)]:
        for t in Engine(tiny_target).generate(p, SamplingParams(max_tokens=40, ignore_eos=True)).token_ids:
            if t not in seen:
                seen.append(t)
    return seen + [t for t in range(512) if t not in seen][: max(0, 512 - len(seen))]


@pytest.fixture(scope="module")
def head(tiny_target, vocab):
    return new_draft_head(tiny_target, vocab, intermediate_size=64, seed=3)


@pytest.fixture
def head_path(head, tmp_path):
    return save_draft_head(head, tmp_path / "static.safetensors", dtype=torch.float32)


def learned(tiny_target, head, head_path, root, **kw):
    spec = LearnedHeadSpeculator(head, target_embedding_weight(tiny_target).float(), head_path, root=root,
                                 train=False, **kw)
    spec.client = Sink()
    return spec


def plain_ids(target, prompt, n):
    return Engine(target).generate(prompt, SamplingParams(max_tokens=n, ignore_eos=True)).token_ids


def traffic(tiny_target, spec, prompts, n=24, tenant="default"):
    """Run greedy requests through an engine that only captures (plain decoding); returns the docs sent."""
    eng = Engine(tiny_target, speculators=[spec], controller=FixedController(None, 0))
    for p in prompts:
        eng.generate(p, SamplingParams(max_tokens=n, ignore_eos=True), tenant=tenant)
    return [m[2] for m in spec.client.sent if m[0] == "doc"]


# ---------------------------------------------------------------- labels
def test_captured_labels_are_the_targets_features(tiny_target, head, head_path, tmp_path):
    spec = learned(tiny_target, head, head_path, tmp_path / "v")
    prompt = tiny_target.tokenizer.encode(PROMPT)
    (doc,) = traffic(tiny_target, spec, [prompt], n=20)
    P = len(prompt)
    assert doc.num_prompt_tokens == P and doc.token_ids[:P].tolist() == prompt
    assert doc.num_labels == 20  # features at positions P-1 .. P+18 predicted the 20 generated tokens
    # Reference: one teacher-forced forward over the same tokens.
    kv = tiny_target.new_cache()
    out = tiny_target.forward(kv, doc.token_ids.tolist())
    ref = out.hidden[P - 1:]  # [T - P + 1, H]
    assert torch.allclose(doc.hidden.float(), ref[: doc.num_labels], atol=2e-2, rtol=1e-2)
    # Greedy traffic: the target's argmax at each labelled position is the next token.
    assert doc.target_argmax[:-1].tolist() == doc.token_ids[P:].tolist()


def test_private_requests_are_not_captured(tiny_target, head, head_path, tmp_path):
    spec = learned(tiny_target, head, head_path, tmp_path / "v")
    eng = Engine(tiny_target, speculators=[spec], controller=FixedController(None, 0))
    prompt = tiny_target.tokenizer.encode(PROMPT)
    eng.generate(prompt, SamplingParams(max_tokens=8, ignore_eos=True, learn=False))
    assert spec.client.sent == []


def test_buffer_budgets_heldout_and_reservoir():
    H = 4

    def doc(n, i):
        return TrafficDoc(torch.arange(n + 2), 3, torch.zeros(n, H, dtype=torch.float16), torch.zeros(n, dtype=torch.long), str(i))

    buf = LabelBuffer(max_recent_positions=30, max_reservoir_positions=20, heldout_every=3, max_heldout_positions=25)
    where = [buf.add(doc(10, i)) for i in range(30)]
    assert where.count("heldout") == 10 and where[1] == where[4] == "heldout" and where[0] == where[2] == "recent"
    assert buf.recent_positions <= 30 and buf.reservoir_positions <= 20 and buf.heldout_positions <= 25
    assert len(buf.reservoir) == 2 and buf.positions_seen == 300
    assert buf.new_positions == 200
    with pytest.raises(ValueError):
        buf.add(TrafficDoc(torch.arange(5), 3, torch.zeros(2, H), torch.zeros(3, dtype=torch.long)))
    with pytest.raises(ValueError):
        LabelBuffer(heldout_every=1)
    assert doc_from_capture([1, 2, 3], 3, [], []) is None


def test_replay_file_roundtrip(tmp_path):
    docs = [TrafficDoc(torch.arange(7), 3, torch.randn(5, 4).half(), torch.arange(5), "a"),
            TrafficDoc(torch.arange(4), 1, torch.randn(4, 4).half(), torch.arange(4), "b")]
    back = load_replay(save_replay(tmp_path / "r.safetensors", docs))
    assert [d.token_ids.tolist() for d in back] == [d.token_ids.tolist() for d in docs]
    assert all(torch.equal(a.hidden, b.hidden) and torch.equal(a.target_argmax, b.target_argmax)
               for a, b in zip(back, docs))


def test_shipped_replay_has_no_drift_domains():
    from adaspec.online.trainer import shipped_replay_path

    path = shipped_replay_path("smollm2-135m-instruct")
    assert path.is_file() and path.stat().st_size < 10e6
    docs = load_replay(path)
    assert sum(d.num_labels for d in docs) > 2000


# ---------------------------------------------------------------- versions
def test_publish_versions_atomically_and_keep_the_newest(head, tmp_path):
    base = head_digest(head)
    for i in range(4):
        with torch.no_grad():
            head.fc_in.weight.add_(0.0)  # same weights, new version each time
        assert publish(tmp_path, "acme", head, base, info={"i": i}, keep=3) == i + 1
    assert list_versions(tmp_path, "acme") == [2, 3, 4]
    folder = tmp_path / tenant_key("acme")
    assert all((p.stat().st_mode & 0o777) == 0o600 for p in folder.iterdir())
    cur = read_current(tmp_path, "acme")
    assert cur["version"] == 4 and cur["info"] == {"i": 3}
    net = load_version(tmp_path, "acme", 4, head)
    for k, v in trained_state(head).items():
        assert torch.equal(trained_state(net)[k], v.half().float()), k
    set_current(tmp_path, "acme", 3)
    assert read_current(tmp_path, "acme")["version"] == 3
    with pytest.raises(FileNotFoundError):
        set_current(tmp_path, "acme", 1)
    # A crash mid-publish leaves a temp file and maybe a newer version not yet current: current still loads.
    (folder / ".v000005.safetensors.tmp-1-ab").write_bytes(b"partial")
    assert read_current(tmp_path, "acme")["version"] == 3
    (folder / "current.json").write_text("{not json")
    assert read_current(tmp_path, "acme") is None
    with pytest.raises(ValueError, match="another static head"):
        changed = type(head)(head.config)
        changed.load_state_dict(head.state_dict())
        with torch.no_grad():
            changed.lm_head.add_(1.0)
        load_version(tmp_path, "acme", 4, changed)


def test_tenant_keys_are_safe_and_distinct():
    keys = {tenant_key(t) for t in ("a/b", "a_b", "../x", "", "Ω")}
    assert len(keys) == 5 and all("/" not in k and not k.startswith(".") for k in keys)


# ---------------------------------------------------------------- the trainer
def test_trainer_learns_the_tenants_traffic_and_publishes(tiny_target, head, head_path, tmp_path):
    spec = learned(tiny_target, head, head_path, tmp_path / "v")
    prompts = case_prompts(tiny_target)
    docs = traffic(tiny_target, spec, prompts, n=32)
    cfg = OnlineConfig(min_new_positions=32, min_heldout_positions=8, steps_per_round=40, lr=3e-3,
                       heldout_every=4, batch_size=32)
    tr = OnlineTrainer(head, target_embedding_weight(tiny_target).float(), tmp_path / "v", cfg)
    for d in docs:
        tr.add_doc("acme", d)
    assert tr.next_tenant() == "acme"
    r = tr.train_round("acme")
    assert r.candidate_acceptance_length > r.static_acceptance_length
    assert r.published == 1 and read_current(tmp_path / "v", "acme")["version"] == 1
    assert tr.next_tenant() is None  # no new data since the round
    assert tr.stats()["acme"]["serving_version"] == 1


def test_config_is_validated():
    with pytest.raises(ValueError, match="keep_versions"):
        OnlineConfig(keep_versions=1).validate()
    with pytest.raises(ValueError, match="mix"):
        OnlineConfig(mix=(0, 0, 0)).validate()
    with pytest.raises(ValueError, match="lr"):
        OnlineConfig(lr=float("nan")).validate()


# ---------------------------------------------------------------- serving: swap, pin, rollback, tenants
def _trained_version(tiny_target, head, root, tenant, seed=0):
    net = new_draft_head(tiny_target, head.draft_to_target.tolist(), intermediate_size=64, seed=seed)
    net.lm_head.copy_(head.lm_head)
    net.draft_to_target.copy_(head.draft_to_target)
    return publish(root, tenant, net, head_digest(head))


def test_hot_swap_mid_request_keeps_output_and_pins_the_version(tiny_target, head, head_path, tmp_path):
    root = tmp_path / "v"
    _trained_version(tiny_target, head, root, "default", seed=5)
    spec = learned(tiny_target, head, head_path, root)
    assert spec.current_version() == 1  # loaded from disk at start
    swaps = []
    spec.on_swap = lambda t, v, info: swaps.append((t, v))
    prompt = tiny_target.tokenizer.encode(PROMPT)
    plain = plain_ids(tiny_target, prompt, 40)
    eng = Engine(tiny_target, controller=FixedController(spec, 4))
    state = eng.start(prompt, SamplingParams(max_tokens=40, ignore_eos=True))
    for _ in range(3):
        eng.step(state)
    v2 = _trained_version(tiny_target, head, root, "default", seed=6)
    spec._swap("default", v2, spec._prepare(load_version(root, "default", v2, head)), {})
    assert swaps == [("default", 2)] and spec.current_version() == 2
    assert spec._captures[state.request_id].version == 1  # the request keeps the version it started with
    while not state.finished:
        eng.step(state)
    r = eng.result(state)
    assert r.token_ids == plain and r.speculation.proposed > 0
    state2 = eng.start(prompt, SamplingParams(max_tokens=8, ignore_eos=True))
    assert spec._captures[state2.request_id].version == 2
    eng.abort(state2)


def test_a_tenant_never_drafts_with_another_tenants_head(tiny_target, head, head_path, tmp_path):
    root = tmp_path / "v"
    _trained_version(tiny_target, head, root, "a")
    spec = learned(tiny_target, head, head_path, root)
    prompt = tiny_target.tokenizer.encode(PROMPT)
    eng = Engine(tiny_target, controller=FixedController(spec, 4))
    ra = eng.generate(prompt, SamplingParams(max_tokens=12, ignore_eos=True), tenant="a")
    rb = eng.generate(prompt, SamplingParams(max_tokens=12, ignore_eos=True), tenant="b")
    assert ra.speculation.proposed > 0 and rb.speculation.proposed == 0
    assert ra.token_ids == rb.token_ids == plain_ids(tiny_target, prompt, 12)
    assert spec.forget_tenant("a") == 1 and spec.current_version("a") == 0
    assert not (root / tenant_key("a")).exists()


def test_live_acceptance_drop_rolls_back(tiny_target, head, head_path, tmp_path):
    root = tmp_path / "v"
    spec = learned(tiny_target, head, head_path, root, rollback_min_drafts=8, rollback_margin=0.1)
    events = []
    spec.on_swap = lambda t, v, info: events.append((v, info))
    v1 = _trained_version(tiny_target, head, root, "default", seed=1)
    spec._swap("default", v1, spec._prepare(load_version(root, "default", v1, head)), {})
    cap = spec._captures.setdefault("r1", None)
    from adaspec.online.learned import _Capture

    cap = _Capture("default", 1, [0], v1, None)
    for _ in range(4):
        spec._judge(cap, [1, 2, 3], [1, 2, 3, 4])  # v1 accepts everything
    v2 = _trained_version(tiny_target, head, root, "default", seed=2)
    spec._swap("default", v2, spec._prepare(load_version(root, "default", v2, head)), {})
    cap2 = _Capture("default", 1, [0], v2, None)
    for _ in range(4):
        spec._judge(cap2, [9, 9, 9], [1, 2, 3, 4])  # v2 accepts nothing
    assert spec.current_version() == v1 and spec.rollbacks == 1
    assert events[-1] == (v1, {"rollback_from": v2})
    assert ("rollback", "default", v1) in spec.client.sent


# ---------------------------------------------------------------- the real process
def test_trainer_process_trains_publishes_and_the_speculator_swaps(tiny_target, head, head_path, tmp_path):
    root = tmp_path / "v"
    cfg = OnlineConfig(min_new_positions=32, min_heldout_positions=8, steps_per_round=20, lr=3e-3,
                       heldout_every=4, batch_size=32)
    spec = LearnedHeadSpeculator(head, target_embedding_weight(tiny_target).float(), head_path, root=root,
                                 config=cfg, train=True)
    try:
        prompts = case_prompts(tiny_target)
        eng = Engine(tiny_target, speculators=[spec], controller=FixedController(None, 0))
        for p in prompts:
            eng.generate(p, SamplingParams(max_tokens=32, ignore_eos=True))
        assert spec.docs_sent == 10
        deadline = time.time() + 120
        while time.time() < deadline and spec.current_version() == 0:
            spec.poll_trainer()
            time.sleep(0.2)
        assert spec.client.alive, list(spec.client.errors)
        assert spec.rounds and spec.rounds[-1]["published"] == 1, (list(spec.rounds), list(spec.client.errors))
        assert spec.current_version() == 1
        assert spec.online_stats()["published"] == 1
    finally:
        spec.close()
    assert not spec.client.alive


def test_metrics_and_dashboard_show_the_trainers_state(tiny_target, head, head_path, tmp_path):
    from adaspec.server.metrics import ServerMetrics

    root = tmp_path / "v"
    _trained_version(tiny_target, head, root, "acme")
    spec = learned(tiny_target, head, head_path, root)
    spec.rounds.append({"tenant": "acme", "candidate_acceptance_length": 2.5, "serving_acceptance_length": 2.0,
                        "static_acceptance_length": 1.8, "published": 1, "buffer": {"recent_positions": 300}})
    m = ServerMetrics(speculators=lambda: {"learned_head": spec})
    text = m.render().decode()
    assert 'adaspec_online_head_version{speculator="learned_head",tenant="acme"} 1.0' in text
    assert 'adaspec_online_heldout_acceptance_length{head="static",speculator="learned_head",tenant="acme"} 1.8' in text
    assert 'adaspec_online_buffer_positions{part="recent",speculator="learned_head",tenant="acme"} 300.0' in text
    assert m.snapshot()["online_learning"]["learned_head"]["versions"] == {"acme": 1}


def test_online_learning_config_is_checked(tiny_target):
    from adaspec.config import EngineConfig, build_controller

    with pytest.raises(ValueError, match="needs --speculator atlas"):
        EngineConfig(speculator="suffix", online_learning=True).validate()
    with pytest.raises(ValueError, match="starts from the static draft head"):
        build_controller(EngineConfig(model=str(tiny_target.name), speculator="atlas", online_learning=True,
                                      calibrate=False), tiny_target)


def test_cli_flag_sets_online_learning():
    import argparse

    from adaspec.config import add_speculator_arguments, config_from_args

    p = argparse.ArgumentParser()
    add_speculator_arguments(p, "state")
    assert config_from_args(p.parse_args(["--online-learning"])).online_learning
    assert not config_from_args(p.parse_args([])).online_learning


def test_a_policy_update_drops_old_weights_traffic(tiny_target, head, head_path, tmp_path):
    spec = learned(tiny_target, head, head_path, tmp_path / "v")
    eng = Engine(tiny_target, speculators=[spec], controller=FixedController(None, 0))
    prompt = tiny_target.tokenizer.encode(PROMPT)
    state = eng.start(prompt, SamplingParams(max_tokens=8, ignore_eos=True))
    eng.step(state)
    spec.on_policy_update(1)
    while not state.finished:
        eng.step(state)
    eng.result(state)
    assert spec.client.sent == [("policy_update",)]  # the old weights' request was not sent
    eng.generate(prompt, SamplingParams(max_tokens=8, ignore_eos=True))
    assert spec.client.sent[-1][0] == "doc"


@pytest.mark.real_model
def test_server_with_online_learning_serves_reports_and_stops_the_trainer(real_target, tmp_path):
    """`serve --online-learning` on the real model: exact output, the trainer on /metrics, stopped at shutdown."""
    import httpx

    from adaspec.config import EngineConfig, build_controller
    from adaspec.server import create_app
    from adaspec.server.testing import BackgroundServer

    cfg = EngineConfig(speculator="atlas", online_learning=True, calibrate=False, state_dir=str(tmp_path))
    engine = Engine(real_target, controller=build_controller(cfg, real_target))
    spec = engine.speculators["learned_head"]
    assert spec.root == tmp_path / "learned_head"
    prompt = "Write a Python function that returns the square of a number."
    ids = engine.apply_chat_template([{"role": "user", "content": prompt}])
    plain = Engine(real_target).generate(ids, SamplingParams(max_tokens=16)).token_ids
    with BackgroundServer(create_app(engine, "m")) as server:
        r = httpx.post(server.base_url + "/v1/chat/completions", timeout=120, json={
            "model": "m", "messages": [{"role": "user", "content": prompt}], "max_tokens": 16, "temperature": 0})
        assert r.status_code == 200
        assert r.json()["choices"][0]["message"]["content"] == real_target.tokenizer.decode(
            plain, skip_special_tokens=True)
        deadline = time.time() + 60
        while not spec.client.alive and time.time() < deadline:
            time.sleep(0.2)
        metrics = httpx.get(server.base_url + "/metrics", timeout=30).text
        assert 'adaspec_online_trainer_alive{speculator="learned_head"} 1.0' in metrics
        assert 'adaspec_online_events{event="docs_sent",speculator="learned_head"} 1.0' in metrics
    assert not spec.client.alive  # the app's shutdown stopped the trainer


def test_closing_a_busy_trainer_terminates_it(tiny_target, head, head_path, tmp_path):
    """A trainer that does not answer "stop" (busy in a round) is terminated; close never raises."""
    spec = LearnedHeadSpeculator(head, target_embedding_weight(tiny_target).float(), head_path, root=tmp_path / "v")
    client = spec.client
    client.send(("stats",))
    deadline = time.time() + 60
    while time.time() < deadline and not any(m[0] == "ready" for m in client.poll()):
        time.sleep(0.1)
    import os
    import signal

    os.kill(client.pid, signal.SIGSTOP)  # stands in for a long round: it reads nothing
    t0 = time.time()
    client.close(timeout_s=1.0)
    assert time.time() - t0 < 10 and not client.alive


# ---------------------------------------------------------------- the buffer survives restarts and crashes
def _docs(n, H=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        m = 3 + i % 4
        out.append(TrafficDoc(torch.randint(0, 50, (m + 2,), generator=g), 3,
                              torch.randn(m, H, generator=g).half(), torch.randint(0, 50, (m,), generator=g), f"d{i}"))
    return out


def test_label_buffer_saves_and_loads_every_part(tmp_path):
    buf = LabelBuffer(max_recent_positions=20, max_reservoir_positions=12, heldout_every=3, max_heldout_positions=15)
    for d in _docs(24):
        buf.add(d)
    assert buf.recent and buf.reservoir and buf.heldout
    path = buf.save(tmp_path / "t" / "buffer.safetensors", info={"base": "x"})
    assert (path.stat().st_mode & 0o777) == 0o600
    back = LabelBuffer(max_recent_positions=20, max_reservoir_positions=12, heldout_every=3, max_heldout_positions=15)
    assert back.load(path, hidden_size=4) == {"base": "x"}
    for a, b in ((buf.recent, back.recent), (buf.reservoir, back.reservoir), (buf.heldout, back.heldout)):
        assert [d.token_ids.tolist() for d in a] == [d.token_ids.tolist() for d in b]
        assert all(torch.equal(x.hidden, y.hidden) and torch.equal(x.target_argmax, y.target_argmax)
                   for x, y in zip(a, b))
    assert back.stats() == buf.stats()
    for d in _docs(12, seed=1):  # the reservoir's random choices go on where they left off
        buf.add(d)
        back.add(d)
    assert [d.doc_id for d in back.reservoir] == [d.doc_id for d in buf.reservoir]
    with pytest.raises(ValueError, match="width"):
        LabelBuffer().load(path, hidden_size=8)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ValueError):
        LabelBuffer().load(bad)
    with pytest.raises(FileNotFoundError):
        LabelBuffer().load(tmp_path / "none.safetensors")
    empty = LabelBuffer()
    empty.load(empty.save(tmp_path / "empty.safetensors"))
    assert empty.stats()["docs_seen"] == 0


def test_trainer_restores_buffers_after_a_restart_and_forgets_them(tiny_target, head, tmp_path):
    root = tmp_path / "v"
    embed = target_embedding_weight(tiny_target).float()
    H = head.config.hidden_size
    cfg = OnlineConfig(min_new_positions=8, min_heldout_positions=4, heldout_every=3)
    tr = OnlineTrainer(head, embed, root, cfg)
    for tenant in ("acme", "globex"):
        for d in _docs(9, H=H):
            tr.add_doc(tenant, d)
    assert sorted(tr.save_buffers(force=True)) == ["acme", "globex"]
    assert tr.save_buffers(force=True) == []  # nothing new since
    before = tr.stats()["acme"]["buffer"]

    again = OnlineTrainer(head, embed, root, cfg)  # the trainer process restarted
    assert again.restore_saved_buffers() == ["acme", "globex"]
    assert again.stats()["acme"]["buffer"] == before and again.ready("acme")

    again.forget_tenant("globex")
    assert not again.buffer_path("globex").exists() and again.buffer_path("acme").exists()
    again.clear_buffers()  # a policy update: old traffic is gone from disk too
    assert not again.buffer_path("acme").exists()
    assert OnlineTrainer(head, embed, root, cfg).restore_saved_buffers() == []

    # a damaged file is set aside, never trusted
    tr.add_doc("acme", _docs(1, H=H)[0])
    tr.save_buffers(force=True)
    path = tr.buffer_path("acme")
    path.write_bytes(path.read_bytes()[:300])
    third = OnlineTrainer(head, embed, root, cfg)
    assert third.tenant("acme").buffer.stats()["docs_seen"] == 0 and "acme" in third.restore_errors
    assert path.with_name(path.name + ".bad").exists()

    off = OnlineTrainer(head, embed, tmp_path / "off", OnlineConfig(save_buffer_every_s=0))
    off.add_doc("acme", _docs(1, H=H)[0])
    assert off.save_buffers(force=True) == [] and not off.buffer_path("acme").exists()


@pytest.mark.parametrize("how", ["server gone", "terminated"])
def test_the_trainer_process_keeps_its_buffer_when_the_server_dies(tiny_target, head, head_path, tmp_path, how):
    """The server crashing closes the trainer's pipe (EOF); a close mid-round terminates it: both save the buffer."""
    import os
    import signal

    root = tmp_path / "v"
    cfg = OnlineConfig(min_new_positions=10**6, save_buffer_every_s=3600)  # no round, no timed save
    spec = LearnedHeadSpeculator(head, target_embedding_weight(tiny_target).float(), head_path, root=root,
                                 config=cfg, train=True)
    client = spec.client
    H = head.config.hidden_size
    for d in _docs(6, H=H):
        client.send(("doc", "acme", d))
    client.send(("stats",))
    deadline = time.time() + 120
    stats = None
    while time.time() < deadline and stats is None:
        stats = next((m[1] for m in client.poll() if m[0] == "stats"), None)
        time.sleep(0.1)
    assert stats and stats["acme"]["buffer"]["docs_seen"] == 6
    path = root / tenant_key("acme") / "buffer.safetensors"
    assert not path.exists()
    if how == "server gone":
        client._outbox.put(None)  # the sender thread ends, then the pipe closes as a dead process's would
        client._sender.join(10)
        client._conn_out.close()
    else:
        os.kill(client.pid, signal.SIGTERM)
    client._proc.wait(60)
    back = LabelBuffer()
    back.load(path)
    assert back.stats()["docs_seen"] == 6
    client.closed = True
    spec.close()


def test_candidates_are_judged_on_the_newest_heldout_documents(tiny_target, head, tmp_path):
    """After a shift, the gate measures today's traffic, not the domain left behind."""
    H = head.config.hidden_size
    cfg = OnlineConfig(heldout_every=2, heldout_positions=4096, eval_max_positions=12)
    tr = OnlineTrainer(head, target_embedding_weight(tiny_target).float(), tmp_path / "v", cfg)
    docs = _docs(40, H=H)
    for d in docs:
        tr.add_doc("acme", d)
    held = list(tr.tenant("acme").buffer.heldout)
    assert len(held) == 20
    packed = tr.heldout_packed("acme")
    # the newest held-out documents, up to the first that reaches 12 labelled positions, in order
    newest, n = [], 0
    for d in reversed(held):
        if n >= 12:
            break
        newest.append(d)
        n += d.num_labels
    want = torch.cat([d.to_feature_doc().token_ids for d in reversed(newest)])
    assert torch.equal(packed.token_ids[: want.numel()], want) and len(newest) < len(held)


# ---------------------------------------------------------------- the adapted draft vocabulary
def test_draft_vocabulary_adapts_to_the_tenants_tokens_and_survives_publication(tiny_target, head_path, tmp_path):
    """Tokens the target keeps choosing that the static draft vocabulary lacks take its last slots; the
    version carries them; drafting with it stays exact and drafts the new tokens."""
    embed = target_embedding_weight(tiny_target).float()
    said = []
    prompts = case_prompts(tiny_target)
    for p in prompts:
        for t in plain_ids(tiny_target, p, 32):
            if t not in said:
                said.append(t)
    missing = said[::2]  # half of what the target says is not in this head's vocabulary
    vocab = [t for t in said if t not in missing] + [t for t in range(600) if t not in said][:200]
    static = new_draft_head(tiny_target, vocab, intermediate_size=64, seed=3)
    spec = learned(tiny_target, static, head_path, tmp_path / "v")
    docs = traffic(tiny_target, spec, prompts, n=32)
    counts = torch.bincount(torch.cat([d.target_argmax for d in docs]), minlength=embed.shape[0])
    slots = 64
    tr = OnlineTrainer(static, embed, tmp_path / "v", OnlineConfig(vocab_slots=slots, vocab_min_count=2))
    net = copy.deepcopy(static)
    changed = tr.adapt_vocabulary(net, docs)
    Vd = len(vocab)
    lo = Vd - slots
    d2t = net.draft_to_target
    assert torch.equal(d2t[:lo], static.draft_to_target[:lo])  # only the last slots are ever reassigned
    assert torch.unique(d2t).numel() == Vd
    newcomers = [t for t in d2t[lo:].tolist() if t not in vocab]
    assert changed == len(newcomers) > 0
    # every newcomer was the target's choice at least twice, and at least as often as any static token it displaced
    assert all(t in missing and counts[t] >= 2 for t in newcomers)
    evicted = [t for t in static.draft_to_target[lo:].tolist() if t not in d2t.tolist()]
    assert len(evicted) == len(newcomers)
    assert min(int(counts[t]) for t in newcomers) >= max(int(counts[t]) for t in evicted)
    static_row = {int(t): static.lm_head[i] for i, t in enumerate(static.draft_to_target.tolist())}
    for s in range(lo, Vd):  # a newcomer's row is its token's LM-head (tied embedding) row, stored as float16
        t = int(d2t[s])
        assert torch.equal(net.lm_head[s], static_row[t] if t in static_row else embed[t].half().float())
    assert tr.adapt_vocabulary(net, docs) == 0  # stable: nothing changes on the same traffic
    # published and read back: the same vocabulary and rows
    v = publish(tmp_path / "v", "default", net, head_digest(static), base=static)
    back = load_version(tmp_path / "v", "default", v, static)
    assert torch.equal(back.draft_to_target, d2t) and torch.equal(back.lm_head, net.lm_head)
    # serving it: exact, and it drafts tokens the static vocabulary lacks
    spec2 = learned(tiny_target, static, head_path, tmp_path / "v")
    assert spec2.current_version() == 1
    eng = Engine(tiny_target, controller=FixedController(spec2, 4))
    drafted = set()
    for p in prompts[:4]:
        st = eng.start(p, SamplingParams(max_tokens=32, ignore_eos=True))
        while not st.finished:
            eng.step(st)
        r = eng.result(st)
        assert r.token_ids == plain_ids(tiny_target, p, 32)
        drafted.update(r.token_ids)
    assert set(newcomers) & drafted
    # visible: the served version's adapted draft ids, in the stats and on /metrics
    from adaspec.server.metrics import ServerMetrics

    assert spec2.online_stats()["vocab_adapted"] == {"default": changed}
    text = ServerMetrics(speculators=lambda: {"learned_head": spec2}).render().decode()
    assert f'adaspec_online_draft_vocab_adapted{{speculator="learned_head",tenant="default"}} {float(changed)}' in text


def test_a_version_with_a_malformed_vocabulary_change_is_refused(tiny_target, head, tmp_path):
    from safetensors.torch import load_file, save_file

    net = copy.deepcopy(head)
    net.draft_to_target[-1] = 499 if 499 not in head.draft_to_target.tolist() else 511
    v = publish(tmp_path, "acme", net, head_digest(head), base=head)
    path = tmp_path / tenant_key("acme") / f"v{v:06d}.safetensors"
    tensors = load_file(str(path))
    assert tensors["vocab_slots"].tolist() == [head.draft_to_target.numel() - 1]
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    tensors["vocab_tokens"] = head.draft_to_target[:1].clone()  # the same token as draft id 0
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(ValueError, match="two draft ids"):
        load_version(tmp_path, "acme", v, head)
    tensors["vocab_tokens"] = torch.tensor([10 ** 6])
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(ValueError, match="malformed"):
        load_version(tmp_path, "acme", v, head)
    with pytest.raises(ValueError, match="vocab_slots"):
        OnlineConfig(vocab_slots=-1).validate()


def test_a_round_without_enough_heldout_data_trains_but_never_publishes(tiny_target, head, head_path, tmp_path):
    """A new tenant's candidate starts learning before it can be judged; it is published only once judged."""
    spec = learned(tiny_target, head, head_path, tmp_path / "v")
    docs = traffic(tiny_target, spec, case_prompts(tiny_target), n=32)
    cfg = OnlineConfig(min_new_positions=32, min_heldout_positions=10 ** 6, steps_per_round=5, batch_size=16)
    tr = OnlineTrainer(head, target_embedding_weight(tiny_target).float(), tmp_path / "v", cfg)
    for d in docs:
        tr.add_doc("acme", d)
    assert tr.next_tenant() == "acme"
    r = tr.train_round("acme")
    assert r.published is None and r.heldout_positions == 0 and r.candidate_acceptance_length != r.candidate_acceptance_length
    assert read_current(tmp_path / "v", "acme") is None
    trained = tr.tenant("acme").net
    assert any(not torch.equal(a, b) for a, b in zip(trained.parameters(), head.parameters()))


def test_an_idle_trainer_trains_the_last_tenant_again_a_bounded_number_of_times(tiny_target, head, head_path, tmp_path):
    spec = learned(tiny_target, head, head_path, tmp_path / "v")
    docs = traffic(tiny_target, spec, case_prompts(tiny_target), n=32)
    cfg = OnlineConfig(min_new_positions=32, min_heldout_positions=8, steps_per_round=2, batch_size=8, extra_rounds=2)
    tr = OnlineTrainer(head, target_embedding_weight(tiny_target).float(), tmp_path / "v", cfg)
    assert tr.idle_tenant() is None  # nothing trained yet
    for d in docs[:6]:
        tr.add_doc("acme", d)
    tr.train_round(tr.next_tenant())
    assert tr.next_tenant() is None and tr.idle_tenant() == "acme"
    tr.train_round("acme")
    tr.train_round("acme")
    assert tr.idle_tenant() is None  # two extra rounds on the same data, then it waits
    for d in docs[6:]:
        tr.add_doc("acme", d)
    tr.train_round(tr.next_tenant())  # new data: extra rounds allowed again
    assert tr.idle_tenant() == "acme"
    assert OnlineTrainer(head, target_embedding_weight(tiny_target).float(), tmp_path / "w",
                         OnlineConfig(extra_rounds=0)).idle_tenant() is None
    with pytest.raises(ValueError, match="extra_rounds"):
        OnlineConfig(extra_rounds=-1).validate()
