"""RL rollouts (issue 16): group generation, weight updates without a restart, ``n`` on the server.

Exactness: a rollout sample is a draw from the target (distribution test
against the exact probabilities, right after a weight update, with drafting
on); its logprobs are the target's; a request started before an update
finishes on the old weights (its KV cache is pinned to them), one started
after runs on the new ones; an update equals a fresh load of the new weights.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import httpx
import pytest
import torch

from adaspec.controller import ConfidenceAwareController, FixedController
from adaspec.engine import Engine
from adaspec.model.decoder import BatchRequest
from adaspec.rollout import rollout
from adaspec.speculators import NgramSpeculator
from adaspec.speculators.suffix import SuffixSpeculator
from adaspec.target import load_target
from adaspec.types import SamplingParams
from conftest import build_tiny_model_dir
from scripted import RandomSpeculator

PROMPT = "one two three one two three one two"


def _perturbed(model_dir: Path, seed: int, scale: float = 0.05) -> dict[str, torch.Tensor]:
    """The model's state dict plus seeded noise on every weight (a "policy update")."""
    from transformers import AutoModelForCausalLM

    sd = AutoModelForCausalLM.from_pretrained(str(model_dir)).state_dict()
    sd.pop("lm_head.weight", None)  # tied to the embedding (conftest's tiny model): one tensor
    g = torch.Generator().manual_seed(seed)
    return {k: v + scale * v.std() * torch.randn(v.shape, generator=g) for k, v in sd.items()}


def _save(sd: dict[str, torch.Tensor], like: Path, out: Path) -> Path:
    """A model folder with ``like``'s config and tokenizer and the weights ``sd``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(like))
    model.load_state_dict(sd, strict=False)
    model.tie_weights()
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(str(like)).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    base = build_tiny_model_dir(tmp_path_factory.mktemp("rl") / "policy0", seed=11)
    sd1 = _perturbed(base, 1)
    new = _save(sd1, base, tmp_path_factory.mktemp("rl") / "policy1")
    return base, new, sd1


def base_vocab(model_dir: Path) -> int:
    return json.loads((Path(model_dir) / "config.json").read_text())["vocab_size"]


def _greedy(engine: Engine, prompt=PROMPT, n: int = 24) -> list[int]:
    return engine.generate(prompt, SamplingParams(max_tokens=n, ignore_eos=True)).token_ids


# ------------------------------------------------------------------ weight updates
@pytest.mark.parametrize("dtype,calibration", [("float32", "initial"), ("int8", "recalibrate")])
def test_update_equals_fresh_load(dirs, dtype, calibration) -> None:
    base, new, sd1 = dirs
    engine = Engine(load_target(str(base), dtype=dtype, max_model_len=256), [NgramSpeculator()], lookahead=4)
    before = _greedy(engine)
    assert engine.update_weights(sd1, calibration=calibration) == 1 and engine.policy_version == 1
    fresh = Engine(load_target(str(new), dtype=dtype, max_model_len=256), [])
    after = _greedy(engine)
    assert after == _greedy(fresh) and after != before
    ids = engine.encode_prompt(PROMPT)
    a = engine.target.forward(engine.target.new_cache(), ids).logits
    b = fresh.target.forward(fresh.target.new_cache(), ids).logits
    # int8 recalibration collects its statistics as a fresh load does (same attention kernel), so the same bits
    assert torch.equal(a, b)


def test_update_from_safetensors_and_int8_initial_calibration(dirs) -> None:
    base, new, sd1 = dirs
    engine = Engine(load_target(str(base), dtype="int8", max_model_len=256), [])
    assert engine.update_weights(new) == 1  # a folder of safetensors; the initial policy's activation stats
    assert engine.target.quant_report["policy_calibration"] == "initial"
    fp32 = Engine(load_target(str(new), dtype="float32", max_model_len=256), [])
    ids = engine.encode_prompt(PROMPT)
    lp8 = torch.log_softmax(engine.target.forward(engine.target.new_cache(), ids).logits, -1)
    lp32 = torch.log_softmax(fp32.target.forward(fp32.target.new_cache(), ids).logits, -1)
    # int8 of the new weights tracks their fp32 forward (it is not the old policy's)
    old = Engine(load_target(str(base), dtype="float32", max_model_len=256), [])
    lp_old = torch.log_softmax(old.target.forward(old.target.new_cache(), ids).logits, -1)
    assert (lp8 - lp32).abs().mean() < (lp_old - lp32).abs().mean()


@pytest.mark.parametrize("bad,match", [
    ("missing", "missing"), ("unknown", "does not have"), ("shape", "shape"), ("nan", "NaN"), ("path", "no weights"),
    ("int", "floating point"),
])
def test_bad_updates_are_refused_and_change_nothing(dirs, bad, match) -> None:
    base, _, sd1 = dirs
    engine = Engine(load_target(str(base), max_model_len=256), [])
    before = _greedy(engine, n=8)
    sd = dict(sd1)
    key = "model.layers.0.mlp.up_proj.weight"
    if bad == "missing":
        del sd[key]
    elif bad == "unknown":
        sd["model.layers.9.extra.weight"] = torch.zeros(3)
    elif bad == "shape":
        sd[key] = sd[key][:-1]
    elif bad == "nan":
        sd[key] = sd[key].clone()
        sd[key][0, 0] = float("nan")
    elif bad == "int":
        sd[key] = sd[key].long()
    source = "/nonexistent/weights.safetensors" if bad == "path" else sd
    with pytest.raises(ValueError, match=match):
        engine.update_weights(source)
    assert engine.policy_version == 0 and _greedy(engine, n=8) == before


def test_request_started_before_an_update_finishes_on_old_weights(dirs) -> None:
    """Request A spans the update and ends exactly as on the old weights; B, started after, as on the new."""
    base, new, sd1 = dirs
    engine = Engine(load_target(str(base), max_model_len=256), [NgramSpeculator()], lookahead=3)
    old_plain = _greedy(Engine(load_target(str(base), max_model_len=256), []))
    new_plain = _greedy(Engine(load_target(str(new), max_model_len=256), []))
    assert old_plain != new_plain
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    a = engine.start(engine.encode_prompt(PROMPT), params)
    for _ in range(3):
        engine.step(a)
    assert 0 < len(a.output_ids) < 24
    engine.update_weights(sd1)
    b = engine.start(engine.encode_prompt(PROMPT), params)
    while not (a.finished and b.finished):  # interleaved: both weights versions live at once
        engine.step(a)
        engine.step(b)
    assert (a.policy_version, b.policy_version) == (0, 1)
    assert a.output_ids == old_plain and b.output_ids == new_plain
    assert engine.num_live_requests == 0


def test_forward_batch_with_caches_on_two_weights_versions(dirs) -> None:
    base, _, sd1 = dirs
    target = load_target(str(base), max_model_len=256)
    ids = target.tokenizer.encode(PROMPT)
    old_cache = target.new_cache()
    engine = Engine(target, [])
    engine.update_weights(sd1)
    new_cache = target.new_cache()
    outs = target.forward_batch([BatchRequest(old_cache, ids), BatchRequest(new_cache, ids)])
    solo_old = load_target(str(base), max_model_len=256)
    ref = solo_old.forward(solo_old.new_cache(), ids).logits
    assert torch.equal(outs[0].logits, ref) and not torch.equal(outs[1].logits, ref)
    assert torch.equal(outs[1].logits, target.forward(target.new_cache(), ids).logits)


# ------------------------------------------------------------------ group generation
def test_shared_prefill_runs_the_prompt_once(dirs) -> None:
    base, _, _ = dirs
    target = load_target(str(base), max_model_len=256)
    engine = Engine(target, [NgramSpeculator()], lookahead=4)
    solo = _greedy(engine)
    fed = []
    forward = target.forward
    target.forward = lambda kv, toks, last_only=False: (fed.append(len(toks)), forward(kv, toks, last_only))[1]
    try:
        ids = engine.encode_prompt(PROMPT)
        states = [engine.start(ids, SamplingParams(max_tokens=24, ignore_eos=True), share_prefill=("g", 3))
                  for _ in range(3)]
        assert fed.count(len(ids) - 1) == 1  # one prefill for the group
        for st in states:
            while not st.finished:
                engine.step(st)
    finally:
        target.forward = forward
    assert all(st.output_ids == solo for st in states)
    assert not engine._shared_prefills  # dropped once every member started


def test_rollout_returns_ids_and_the_targets_logprobs(dirs) -> None:
    base, _, _ = dirs
    target = load_target(str(base), dtype="int8", max_model_len=256)
    engine = Engine(target, controller=ConfidenceAwareController(adaptive=SuffixSpeculator()))
    groups = rollout(engine, [PROMPT, [5, 6, 7, 8, 5, 6, 7]], n=4, params=SamplingParams(temperature=1.0, max_tokens=16))
    assert [len(g.samples) for g in groups] == [4, 4]
    assert groups[1].prompt_ids == [5, 6, 7, 8, 5, 6, 7]
    for g in groups:
        for s in g.samples:
            assert len(s.logprobs) == len(s.completion_ids) > 0 and s.policy_version == 0
            full = g.prompt_ids + s.completion_ids
            logits = target.forward(target.new_cache(), full[:-1]).logits  # [T-1, V]
            ref = torch.log_softmax(logits[len(g.prompt_ids) - 1:], -1)
            ref = ref[torch.arange(len(s.completion_ids)), torch.tensor(s.completion_ids)]
            assert torch.allclose(torch.tensor(s.logprobs), ref, atol=1e-5)


def test_seeded_rollouts_are_identical_sequential_batched_and_plain(dirs) -> None:
    """Seeded draws are drafter-invariant: speculative, batched-plain and solo-plain rollouts agree token for token."""
    base, _, _ = dirs
    params = SamplingParams(temperature=1.0, max_tokens=16, seed=7, ignore_eos=True)
    spec = Engine(load_target(str(base), max_model_len=256), [SuffixSpeculator()], lookahead=4)
    plain = Engine(load_target(str(base), max_model_len=256), [])
    a = rollout(spec, [PROMPT], n=6, params=params)[0]
    b = rollout(plain, [PROMPT], n=6, params=params, mode="batched")[0]
    solo = [plain.generate(PROMPT, SamplingParams(temperature=1.0, max_tokens=16, seed=7 + i, ignore_eos=True)).token_ids
            for i in range(6)]
    c = rollout(spec, [PROMPT], n=6, params=params, mode="batched")[0]  # speculative, the group in one forward
    assert [s.completion_ids for s in a.samples] == [s.completion_ids for s in b.samples] == solo
    assert [s.completion_ids for s in c.samples] == solo
    atlas = Engine(load_target(str(base), max_model_len=256), controller=ConfidenceAwareController(
        adaptive=SuffixSpeculator(sample_drafts=True, vocab_size=base_vocab(base))))
    d = rollout(atlas, [PROMPT], n=6, params=params, mode="batched")[0]  # drafts cut by budget_batch
    assert [s.completion_ids for s in d.samples] == solo
    assert len({tuple(x) for x in solo}) > 1  # the group's samples differ
    assert sum(s.stats.proposed for s in a.samples) > 0  # drafts were verified (a random model rarely repeats)


def test_budget_batch_keeps_the_drafts_that_pay() -> None:
    from types import SimpleNamespace

    from adaspec.controller import CostModel
    from adaspec.rollout import budget_batch
    from adaspec.types import DraftProposal

    class Ctrl:
        def __init__(self, costs):
            self.costs = costs

        def accept_probs(self, d, tenant, temperature):
            return list(d.confidence)

    live = [SimpleNamespace(tenant="t", params=SimpleNamespace(temperature=1.0))] * 2
    props = [(DraftProposal(token_ids=[1, 2, 3], confidence=[0.9, 0.9, 0.1], speculator="s"), 0.0),
             (DraftProposal(token_ids=[4, 5], confidence=[0.2, 0.9], speculator="s"), 0.0)]
    eng = lambda costs: SimpleNamespace(controller=Ctrl(costs), target=SimpleNamespace(vocab_size=10))  # noqa: E731
    flat = CostModel({1: 10.0, 2: 10.0, 4: 10.0, 8: 10.0})  # a row costs nothing: every draft pays
    assert [p.token_ids for p, _ in budget_batch(eng(flat), live, props)] == [[1, 2, 3], [4, 5]]
    steep = CostModel({1: 10.0, 2: 13.0, 4: 19.0, 8: 31.0})  # 3 ms a row: only likely tokens pay
    assert [p.token_ids for p, _ in budget_batch(eng(steep), live, props)] == [[1, 2], []]


def test_rollout_validation(dirs) -> None:
    base, _, _ = dirs
    engine = Engine(load_target(str(base), max_model_len=256), [])
    for n in (0, 65, True, 2.0):
        with pytest.raises(ValueError, match="n must be"):
            rollout(engine, [PROMPT], n=n)
    with pytest.raises(ValueError, match="mode"):
        rollout(engine, [PROMPT], n=2, mode="parallel")


SMALL_V = 16


def _exact_two_token_probs(target, prompt_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact P(t1) [V] and P(t2) [V] (marginal) of plain sampling at temperature 1."""
    kv = target.new_cache()
    p1 = torch.softmax(target.forward(kv, prompt_ids).logits[-1].double(), -1)
    p2 = torch.zeros_like(p1)
    for t1 in range(SMALL_V):
        kv = target.new_cache()
        row = target.forward(kv, prompt_ids + [t1]).logits[-1].double()
        p2 += p1[t1] * torch.softmax(row, -1)
    return p1, p2


@pytest.mark.parametrize("mode,sampled", [("sequential", False), ("batched", False), ("sequential", True),
                                          ("batched", True)])
def test_rollouts_right_after_an_update_are_exact_draws(tmp_path, mode, sampled) -> None:
    """Speculative rollouts (suffix drafts from the group, random drafts: every accept/reject case) right after
    a weight update follow the *new* weights' distribution; old-version suffix state is there to tempt it."""
    from transformers import AutoModelForCausalLM

    d = build_tiny_model_dir(tmp_path / "v16", seed=5, vocab_size=SMALL_V, max_position_embeddings=64)
    model = AutoModelForCausalLM.from_pretrained(str(d))
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(0.15)  # soft logits (tied head): several tokens carry mass
    model.save_pretrained(d)
    target = load_target(str(d), max_model_len=64)
    prompt = [3, 4, 5, 3, 4, 5, 3, 4]
    suffix = SuffixSpeculator(min_confidence=0.0, sample_drafts=sampled, vocab_size=SMALL_V)
    engine = Engine(target, controller=_Alternating(suffix, RandomSpeculator(SMALL_V, seed=1), k=3))
    params = SamplingParams(temperature=1.0, max_tokens=2, ignore_eos=True)
    rollout(engine, [prompt] * 10, n=8, params=params)  # old-policy samples in the suffix state
    sd = {k: v + 0.3 * v.std() * torch.randn(v.shape, generator=torch.Generator().manual_seed(3))
          for k, v in model.state_dict().items() if k != "lm_head.weight"}
    engine.update_weights(sd)
    p1, p2 = _exact_two_token_probs(target, prompt)
    old = load_target(str(d), max_model_len=64)
    q1, _ = _exact_two_token_probs(old, prompt)
    assert 0.5 * (p1 - q1).abs().sum() > 0.1  # the update moved the distribution
    first, second = Counter(), Counter()
    groups = rollout(engine, [prompt] * 300, n=8, params=params, mode=mode)
    drafted = sum(s.stats.proposed for g in groups for s in g.samples)
    for g in groups:
        for s in g.samples:
            assert s.policy_version == 1
            first[s.completion_ids[0]] += 1
            second[s.completion_ids[1]] += 1
    N = sum(first.values())
    tv1 = 0.5 * sum(abs(first[t] / N - float(p1[t])) for t in range(SMALL_V))
    tv2 = 0.5 * sum(abs(second[t] / N - float(p2[t])) for t in range(SMALL_V))
    assert drafted > N // 2  # drafts were really verified
    assert tv1 < 0.05 and tv2 < 0.05, (tv1, tv2)


class _Alternating(FixedController):
    """Suffix drafts on even steps, random drafts on odd ones (k each)."""

    def __init__(self, suffix, rand, k: int) -> None:
        super().__init__(suffix, k)
        self.speculators = [suffix, rand]
        self.rand, self.suffix, self.turn = rand, suffix, 0

    def decide(self, ctx, max_lookahead):
        from adaspec.controller import Decision

        self.turn += 1
        k = min(self.lookahead, max_lookahead)
        if k <= 0:
            return Decision(None, 0)
        return Decision((self.suffix if self.turn % 2 else self.rand).name, k)

    def propose(self, ctx, max_lookahead, speculators):
        from adaspec.controller import Controller

        return Controller.propose(self, ctx, max_lookahead, speculators)


# ------------------------------------------------------------------ speculators are told
def test_suffix_forgets_old_policies_and_controller_speeds_up() -> None:
    s = SuffixSpeculator(policy_memory=2)
    for v in range(4):
        if v:
            s.on_policy_update(v)
        s.start_request(f"r{v}", [1, 2, 3, 10 + v])
        s.stop_request(f"r{v}")
    seqs = s.state_dict()
    stored = [x for x in json.dumps(seqs)]
    assert stored  # something is kept
    kept = {tuple(seq) for c in s._tenants.values() for seq in c.sequences()}
    assert kept == {(1, 2, 3, 12), (1, 2, 3, 13)}
    with pytest.raises(ValueError, match="policy_memory"):
        SuffixSpeculator(policy_memory=0)

    c = ConfidenceAwareController(adaptive=SuffixSpeculator())
    est = c.estimator("suffix", "default", "sampled")
    for _ in range(50):
        est.observe(2, 2, [0.9, 0.9])
    before = est.position_probs(2)
    weight = est.position[0].accepted + est.position[0].rejected
    c.on_policy_update(1)
    assert est.position_probs(2) == pytest.approx(before)
    assert est.position[0].accepted + est.position[0].rejected == pytest.approx(weight * c.POLICY_UPDATE_KEEP)


# ------------------------------------------------------------------ the server: n and /admin/weights
@pytest.fixture(scope="module")
def rl_server(dirs):
    from adaspec.server import create_app
    from adaspec.server.testing import BackgroundServer

    base, _, _ = dirs
    engine = Engine(load_target(str(base), max_model_len=256), [SuffixSpeculator()], lookahead=4)
    app = create_app(engine, "tiny-rl", admin_key="sekrit", max_active=8, max_queue=80)
    with BackgroundServer(app) as server:
        server.engine = engine
        yield server


def _post(server, path: str, body, **kw) -> httpx.Response:
    return httpx.post(server.base_url + path, json=body, timeout=60, **kw)


def test_n_choices_non_streaming(rl_server, dirs) -> None:
    base, _, _ = dirs
    plain = Engine(load_target(str(base), max_model_len=256), [])
    r = _post(rl_server, "/v1/completions", {"model": "tiny-rl", "prompt": PROMPT, "n": 3, "seed": 40,
                                             "max_tokens": 12, "ignore_eos": True, "logprobs": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    for i, c in enumerate(body["choices"]):
        ref = plain.generate(PROMPT, SamplingParams(max_tokens=12, temperature=1.0, seed=40 + i, ignore_eos=True))
        assert c["text"] == ref.text and len(c["logprobs"]["tokens"]) == 12
    assert body["usage"]["completion_tokens"] == 36
    assert body["usage"]["total_tokens"] == 36 + body["usage"]["prompt_tokens"]
    assert len(body["adaspec"]["choices"]) == 3


def test_n_choices_streaming_chat(rl_server) -> None:
    body = {"model": "tiny-rl", "messages": [{"role": "user", "content": "hi"}], "n": 2, "seed": 5,
            "max_tokens": 10, "ignore_eos": True}
    full = _post(rl_server, "/v1/chat/completions", body).json()
    texts, finishes, usage, done = {0: "", 1: ""}, {}, None, 0
    with httpx.stream("POST", rl_server.base_url + "/v1/chat/completions", timeout=60,
                      json={**body, "stream": True, "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done += 1
                continue
            ev = json.loads(line[6:])
            if ev.get("usage"):
                usage = ev["usage"]
            for c in ev["choices"]:
                texts[c["index"]] += c["delta"].get("content") or ""
                if c["finish_reason"]:
                    finishes[c["index"]] = c["finish_reason"]
    assert done == 1 and finishes == {0: "length", 1: "length"}
    assert [texts[0], texts[1]] == [c["message"]["content"] for c in full["choices"]]
    assert usage["completion_tokens"] == 20


def test_admin_weights_endpoint(rl_server, dirs, tmp_path) -> None:
    base, new, sd1 = dirs
    assert _post(rl_server, "/admin/weights", {"path": str(new)}).status_code == 401
    wrong = _post(rl_server, "/admin/weights", {"path": str(new)}, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_admin_key"
    auth = {"Authorization": "Bearer sekrit"}
    for bad, param in [({"path": "/nope"}, "path"), ({}, "path"), ({"path": str(new), "calibration": "x"},
                                                                    "calibration"), ({"path": str(new), "x": 1}, "x")]:
        r = _post(rl_server, "/admin/weights", bad, headers=auth)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    r = httpx.post(rl_server.base_url + "/admin/weights", content=b"not safetensors", timeout=60,
                   headers={**auth, "Content-Type": "application/octet-stream"})
    assert r.status_code == 400
    r = _post(rl_server, "/admin/weights", {"path": str(new)}, headers=auth)
    assert r.status_code == 200 and r.json()["policy_version"] == 1, r.text
    assert httpx.get(rl_server.base_url + "/health").json()["policy_version"] == 1
    fresh = Engine(load_target(str(new), max_model_len=256), [])
    out = _post(rl_server, "/v1/completions", {"model": "tiny-rl", "prompt": PROMPT, "max_tokens": 12,
                                               "temperature": 0, "ignore_eos": True}).json()
    assert out["choices"][0]["text"] == fresh.generate(PROMPT, SamplingParams(max_tokens=12, ignore_eos=True)).text
    from safetensors.torch import save

    r = httpx.post(rl_server.base_url + "/admin/weights", content=save({k: v.contiguous() for k, v in sd1.items()}),
                   headers={**auth, "Content-Type": "application/octet-stream"}, timeout=60)
    assert r.status_code == 200 and r.json()["policy_version"] == 2


def test_admin_weights_disabled_without_key(dirs) -> None:
    from adaspec.server import create_app
    from adaspec.server.testing import BackgroundServer

    base, new, _ = dirs
    app = create_app(Engine(load_target(str(base), max_model_len=256), []), "tiny-rl")
    with BackgroundServer(app) as server:
        r = _post(server, "/admin/weights", {"path": str(new)}, headers={"Authorization": "Bearer x"})
        assert r.status_code == 403 and r.json()["error"]["code"] == "admin_disabled"


# ------------------------------------------------------------------ TRL's rollout_func
def test_trl_rollout_func_pushes_weights_when_the_step_moves(dirs) -> None:
    """:class:`AdaspecRollouts` as TRL calls it (a stand-in trainer: TRL itself is slow to start here;
    ``scripts/trl_grpo.py`` runs the real GRPOTrainer)."""
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM

    from adaspec.trl_rollouts import AdaspecRollouts

    base, new, _ = dirs
    engine = Engine(load_target(str(base), max_model_len=256), [SuffixSpeculator()], lookahead=4)
    policy = AutoModelForCausalLM.from_pretrained(str(base))
    trainer = SimpleNamespace(model=policy, state=SimpleNamespace(global_step=0), num_generations=3,
                              temperature=1.0, max_completion_length=6, args=None)
    fn = AdaspecRollouts(engine)
    chat = [{"role": "user", "content": "hi"}]
    out = fn([PROMPT, PROMPT, PROMPT, chat, chat, chat], trainer)  # TRL repeats each prompt num_generations times
    assert len(out["completion_ids"]) == 6 and engine.policy_version == 1  # first call: pushed
    assert out["prompt_ids"][0] == engine.encode_prompt(PROMPT)
    assert out["prompt_ids"][3] == engine.apply_chat_template(chat)
    assert all(len(c) == len(lp) <= 6 for c, lp in zip(out["completion_ids"], out["logprobs"]))
    fn([PROMPT, chat], trainer)  # each prompt once: num_generations samples each
    assert engine.policy_version == 1  # same step: no push
    trainer.model = AutoModelForCausalLM.from_pretrained(str(new))
    trainer.state.global_step = 1
    out = fn([PROMPT] * 3, trainer)
    assert engine.policy_version == 2 and len(out["completion_ids"]) == 3
    fresh = Engine(load_target(str(new), max_model_len=256), [])
    assert _greedy(engine) == _greedy(fresh)  # the trainer's weights are what the engine serves


def test_sampled_suffix_drafts_carry_their_frequencies() -> None:
    from adaspec.types import ProposeContext

    s = SuffixSpeculator(sample_drafts=True, vocab_size=20, min_confidence=0.0)
    for i, tail in enumerate([[7, 8], [7, 8], [7, 9], [5, 8]]):
        s.start_request(f"r{i}", [1, 2, 3] + tail)
        s.stop_request(f"r{i}")
    seen = Counter()
    for k in range(400):
        d = s.propose(ProposeContext(request_id="x", token_ids=[1, 2, 3], num_prompt_tokens=3, temperature=1.0), 1)
        assert d.draft_probs is not None and d.draft_probs.shape == (1, 20)
        assert d.draft_probs[0, 7] == pytest.approx(0.75) and d.draft_probs[0, 5] == pytest.approx(0.25)
        seen[d.token_ids[0]] += 1
    assert 0.65 < seen[7] / 400 < 0.85  # drawn from the frequencies, not the mode
    greedy = s.propose(ProposeContext(request_id="x", token_ids=[1, 2, 3], num_prompt_tokens=3), 2)
    assert greedy.token_ids == [7, 8] and greedy.draft_probs is None  # greedy requests: the mode, deterministic
    with pytest.raises(ValueError, match="vocab_size"):
        SuffixSpeculator(sample_drafts=True)


def test_transformers_runtime_updates_between_requests_only(dirs) -> None:
    base, new, sd1 = dirs
    engine = Engine(load_target(str(base), max_model_len=256, runtime="transformers"), [NgramSpeculator()], lookahead=3)
    with pytest.raises(ValueError, match="batched"):
        rollout(engine, [PROMPT], n=2, mode="batched")
    live = engine.start(engine.encode_prompt(PROMPT), SamplingParams(max_tokens=4))
    with pytest.raises(RuntimeError, match="running"):
        engine.update_weights(sd1)  # no pinning on this runtime: refused while a request runs
    assert engine.policy_version == 0
    engine.abort(live)
    assert engine.update_weights(sd1) == 1
    fresh = Engine(load_target(str(new), max_model_len=256, runtime="transformers"), [])
    assert _greedy(engine) == _greedy(fresh)
