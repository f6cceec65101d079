"""The confidence-aware controller: pure decisions on synthetic traces, and end to end (tiny model)."""

import pytest

from adaspec.controller import (
    AcceptanceEstimator,
    ConfidenceAwareController,
    CostModel,
    choose_lookahead,
    expected_emitted,
)
from adaspec.engine import Engine
from adaspec.speculators import SuffixSpeculator
from adaspec.speculators.base import Speculator
from adaspec.types import DraftProposal, SamplingParams
from scripted import PlainLookup

# Verify cost shaped like the int8 path on this machine: nearly flat in k.
FLAT = {n: 40.0 + 1.5 * (n - 1) for n in range(1, 18)}
# Shaped like fp32 at its worst: each extra token costs nearly a full forward.
STEEP = {n: 40.0 * n for n in range(1, 18)}


def frozen_costs(table):
    return CostModel(dict(table), ema=0.0)


def test_expected_emitted_matches_closed_form():
    for a in (0.0, 0.3, 0.8, 0.99):
        for k in (1, 4, 8):
            assert expected_emitted([a] * k) == pytest.approx((1 - a ** (k + 1)) / (1 - a))


@pytest.mark.parametrize("max_k", [0, 1, 5, 16])
def test_chosen_k_within_bounds(max_k):
    k, rate = choose_lookahead([0.9] * 16, 0.1, frozen_costs(FLAT).verify_ms, max_k)
    assert 0 <= k <= max_k and rate > 0


def test_k_grows_with_acceptance_and_falls_back_to_plain():
    vm = frozen_costs(FLAT).verify_ms
    ks = [choose_lookahead([a] * 16, 0.1, vm, 16)[0] for a in (0.0, 0.2, 0.5, 0.8, 0.95)]
    assert ks[0] == 0  # nothing pays: decode plainly
    assert ks == sorted(ks) and ks[-1] > ks[1]
    # Expensive verification: speculation rarely pays.
    assert choose_lookahead([0.3] * 16, 0.1, frozen_costs(STEEP).verify_ms, 16)[0] == 0
    # Expensive drafting: fewer tokens than with free drafting.
    assert choose_lookahead([0.7] * 16, 20.0, vm, 16)[0] < choose_lookahead([0.7] * 16, 0.0, vm, 16)[0]


def test_cost_model_fits_a_line_and_follows_the_machine():
    cm = CostModel({1: 10.0, 9: 18.0}, ema=0.1)
    assert cm.verify_ms(5) == pytest.approx(14.0)
    assert cm.verify_ms(17) == pytest.approx(26.0)
    # The machine gets slower by 10 ms per forward: the fit follows.
    for _ in range(200):
        for n in (1, 2, 3):
            cm.observe_verify(n, 20.0 + n)
    a, b = cm.line()
    assert cm.verify_ms(2) == pytest.approx(22.0, abs=1.0) and b > 0
    cm.observe_draft("x", 4, 8.0)
    assert cm.draft_ms_per_token("x") == pytest.approx(2.0)
    assert CostModel().verify_ms(3) == 50.0  # flat prior before any data


def test_cost_model_is_not_thrown_by_one_slow_step():
    # A noisy seed table (one stalled measurement at n = 12) and stalls during decoding:
    # a per-n table would price k >= 11 out; the robust shape and pooled scale stay close.
    truth = {n: 40.0 + 1.0 * n for n in range(1, 18)}
    noisy = {1: 41.0, 2: 38.0, 3: 45.0, 5: 44.0, 9: 50.0, 12: 120.0, 17: 57.0}
    cm = CostModel(noisy)
    for i in range(300):
        n = 1 + i % 4
        cm.observe_verify(n, truth[n] * (1.5 if i % 50 == 0 else 1.0))
    cm.observe_verify(12, 400.0)  # a stall
    for n in (1, 4, 12, 17):
        assert cm.verify_ms(n) == pytest.approx(truth[n], rel=0.15), n
    best_k = choose_lookahead([0.9] * 16, 0.1, lambda n: truth[n], 16)[0]
    assert best_k >= 11 and abs(choose_lookahead([0.9] * 16, 0.1, cm.verify_ms, 16)[0] - best_k) <= 1


def test_estimator_follows_drift():
    est = AcceptanceEstimator(prior=0.3, decay=0.9)
    for _ in range(60):
        est.observe(4, 4, [0.95] * 4)
    high = est.position_probs(4)
    assert min(high) > 0.9
    assert est.calibrated([0.95])[0] > 0.9
    for _ in range(60):
        est.observe(4, 0, [0.95] * 4)
    assert est.position_probs(1)[0] < 0.1
    assert est.calibrated([0.95])[0] < 0.1


def test_atlas_exact_and_shifts_between_static_and_adaptive(tiny_target):
    tok = tiny_target.tokenizer
    phase_a = [tok.encode(f"SELECT * FROM t{i} WHERE") for i in range(3)]
    phase_b = [tok.encode(f"fn main{i}() {{ let") for i in range(3)]
    params = SamplingParams(max_tokens=32, ignore_eos=True)
    plain_engine = Engine(tiny_target)
    plain = {tuple(p): plain_engine.generate(p, params).token_ids for p in phase_a + phase_b}
    static = PlainLookup("static", plain, 2, tiny_target.vocab_size)
    atlas = ConfidenceAwareController(static=static, adaptive=SuffixSpeculator(), cost_model=frozen_costs(FLAT),
                            static_prior=0.6)
    eng = Engine(tiny_target, controller=atlas)

    def share(result, name):
        steps = result.speculation.steps_by_speculator
        return steps.get(name, 0) / max(1, sum(steps.values()))

    shares = []
    for phase in (phase_a, phase_b):
        for rep in range(3):  # each prompt family repeats: the adaptive speculator learns it
            for p in phase:
                r = eng.generate(p, params)
                assert r.token_ids == plain[tuple(p)]  # exactness, whoever drafts
                shares.append((share(r, "static"), share(r, "suffix"), r.speculation.mean_acceptance_length))
    # Phase A: static carries the first request, adaptive dominates once learned.
    assert shares[0][0] > shares[0][1]
    assert shares[8][1] > shares[8][0]
    # After the switch to phase B, static carries again, then adaptive takes over.
    assert shares[9][0] > shares[9][1]
    assert shares[17][1] > shares[17][0]
    # Lookahead grows with confidence: late requests accept long drafts.
    assert shares[17][2] > 4.0


def test_atlas_decodes_plainly_when_nothing_pays(tiny_target):
    class Wrong(Speculator):
        name = "wrong"

        def propose(self, ctx, k):
            return DraftProposal(token_ids=[7] * k, confidence=[0.9] * k, speculator=self.name)

    atlas = ConfidenceAwareController(static=Wrong(), adaptive=SuffixSpeculator(), cost_model=frozen_costs(FLAT),
                            static_prior=0.5)
    eng = Engine(tiny_target, controller=atlas)
    r = None
    for i in range(3):  # novel prompts: the adaptive speculator has nothing to offer
        r = eng.generate(f"zzq xk {i} {i * 7}", SamplingParams(max_tokens=40, ignore_eos=True))
    steps = r.speculation.steps_by_speculator
    assert steps.get("wrong", 0) <= 2  # the always-wrong static speculator is dropped
    assert steps.get("none", 0) > 0.7 * sum(steps.values())


def test_atlas_state_round_trip():
    a = ConfidenceAwareController(adaptive=SuffixSpeculator())
    a.start_request("r", [1, 2, 3, 4], "default")
    a.observe("r", [5, 6], 0, 0)
    a.stop_request("r")
    b = ConfidenceAwareController(adaptive=SuffixSpeculator())
    b.load_state_dict(a.state_dict())
    assert b.state_dict() == a.state_dict()
    with pytest.raises(ValueError):
        b.load_state_dict({"children": {"nope": {}}})
    with pytest.raises(ValueError):
        ConfidenceAwareController()


def test_atlas_warns_when_the_static_checkpoint_does_not_fit(tiny_target, monkeypatch):
    # No checkpoint for the model: atlas runs with the adaptive speculator only, quietly.
    from adaspec import config
    from adaspec.speculators import draft_head

    cfg = config.EngineConfig(speculator="atlas", calibrate=False)
    atlas = config.build_controller(cfg, tiny_target)
    assert atlas.static is None and atlas.adaptive is not None

    # A checkpoint that does not fit the target is reported, not swallowed.
    def wrong(target):
        raise ValueError("checkpoint trained for hidden size 576, target has 64")

    monkeypatch.setattr(draft_head, "load_static_speculator", wrong)
    with pytest.warns(RuntimeWarning, match="hidden size 576"):
        atlas = config.build_controller(cfg, tiny_target)
    assert atlas.static is None
    with pytest.raises(ValueError, match="hidden size 576"):
        config.build_controller(config.EngineConfig(speculator="static"), tiny_target)


@pytest.mark.parametrize("explore_every", [0, 16])
def test_static_speculator_is_probed_again_after_it_was_dropped(tiny_target, explore_every):
    # Phase 1 the static speculator is always wrong and gets dropped; phase 2 it is
    # always right. Only the shadow probes let its estimate recover.
    tok = tiny_target.tokenizer
    prompts = [tok.encode(f"zzq xk {i} {i * 7}") for i in range(6)]
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    plain_engine = Engine(tiny_target)
    plain = {tuple(p): plain_engine.generate(p, params).token_ids for p in prompts}
    static = PlainLookup("static", plain, 0, tiny_target.vocab_size)
    atlas = ConfidenceAwareController(static=static, adaptive=None, cost_model=frozen_costs(FLAT), static_prior=0.5,
                            explore_every=explore_every)
    eng = Engine(tiny_target, controller=atlas)
    for p in prompts[:3]:
        r = eng.generate(p, params)
    assert r.speculation.steps_by_speculator.get("none", 0) > 0.8 * r.speculation.target_forwards
    static.num_right = 16
    for p in prompts[3:]:
        r = eng.generate(p, params)
        assert r.token_ids == plain[tuple(p)]
    share = r.speculation.steps_by_speculator.get("static", 0) / r.speculation.target_forwards
    if explore_every:
        assert share > 0.5 and r.speculation.mean_acceptance_length > 4.0
    else:
        assert share == 0.0  # without probes a dropped speculator never returns
    with pytest.raises(ValueError):
        ConfidenceAwareController(static=static, explore_every=-1)


def test_sampled_requests_keep_a_sampled_draft_whose_confidence_is_low(small_vocab_target, monkeypatch):
    # At a high temperature a draft sampled from a flat distribution is accepted often
    # (min(1, p/q) with p nearly flat too) although each token's q(x) is 1/16. The
    # controller must judge it by its acceptance, per mode, not by that confidence.
    # Unseeded requests: rejection sampling (a seeded request is verified by coupled
    # sampling, which accepts an independently sampled draft only ~1/16 of the time);
    # os.urandom, which seeds them, made reproducible.
    import itertools

    import torch

    counter = itertools.count(1)
    monkeypatch.setattr("adaspec.engine.os.urandom", lambda n: next(counter).to_bytes(n, "little"))

    from scripted import SampledDraftSpeculator

    t = small_vocab_target

    class Flat(SampledDraftSpeculator):
        name = "flat"

        def propose(self, ctx, k):
            d = super().propose(ctx, k)
            d.confidence = [float(self.row[x]) for x in d.token_ids]
            d.speculator = self.name
            return d

    V = t.vocab_size
    atlas = ConfidenceAwareController(static=Flat(torch.full((V,), 1.0 / V)), adaptive=SuffixSpeculator(),
                            cost_model=frozen_costs(FLAT), static_prior=0.5)
    eng = Engine(t, controller=atlas)
    for seed in range(3):
        r = eng.generate([3, 7, 1, 9], SamplingParams(max_tokens=48, temperature=2.0, ignore_eos=True))
    steps = r.speculation.steps_by_speculator
    assert steps.get("flat", 0) > 0.5 * sum(steps.values())
    assert r.speculation.mean_acceptance_length > 2.0
    # Sampled traffic taught the sampled-mode estimates only.
    assert atlas.estimator("flat", "default", "greedy").position_probs(1)[0] == pytest.approx(0.5)
    assert atlas.estimator("flat", "default", "sampled").position_probs(1)[0] > 0.6


def test_atlas_estimates_survive_a_snapshot(tiny_target):
    import json

    tok = tiny_target.tokenizer
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    prompts = [tok.encode(f"SELECT a{i} FROM t WHERE") for i in range(3)]
    plain_engine = Engine(tiny_target)
    plain = {tuple(p): plain_engine.generate(p, params).token_ids for p in prompts}

    def build():
        return ConfidenceAwareController(static=PlainLookup("static", plain, 2, tiny_target.vocab_size),
                               adaptive=SuffixSpeculator(), cost_model=frozen_costs(FLAT), static_prior=0.6)

    a = build()
    eng_a = Engine(tiny_target, controller=a)
    for p in prompts[:2]:
        eng_a.generate(p, params)
    state = json.loads(json.dumps(a.state_dict(), allow_nan=False))  # what the snapshot store writes
    assert {e["speculator"] for e in state["estimates"]} == {"static", "suffix"}
    b = build()
    b.load_state_dict(state)
    assert b.state_dict() == a.state_dict()
    # Restored, it decides exactly as the original would on the next request.
    ra = eng_a.generate(prompts[2], params)
    rb = Engine(tiny_target, controller=b).generate(prompts[2], params)
    assert ra.token_ids == rb.token_ids == plain[tuple(prompts[2])]
    assert ra.speculation.steps_by_speculator == rb.speculation.steps_by_speculator
    bad = dict(state, estimates=[dict(state["estimates"][0], calibration=[[1.0, 1.0]])])
    with pytest.raises(ValueError, match="invalid estimate"):
        build().load_state_dict(bad)
    with pytest.raises(ValueError, match="malformed"):
        build().load_state_dict(dict(state, estimates=[{"speculator": "static"}]))
