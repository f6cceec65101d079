"""The controller's learned head (issue 15): a second model-based drafter beside the static one.

Pure decisions on a simulated stream (scripted heads, the target's continuation
known), then end to end on the tiny model (greedy exactness with a learned
candidate, chain and tree mode), and ``--speculator static`` under the controller.
"""

from collections import Counter

import pytest
import torch

from adaspec.controller import ConfidenceAwareController, CostModel
from adaspec.engine import Engine
from adaspec.speculators import SuffixSpeculator
from adaspec.speculators.base import Speculator
from adaspec.types import DraftProposal, ProposeContext, SamplingParams, common_prefix_len
from scripted import PlainLookup

FLAT = {n: 40.0 + 1.5 * (n - 1) for n in range(1, 18)}  # verify ms by tokens fed, nearly flat (int8 here)
PROMPT = [1, 2, 3, 4]
TRUTH = [5 + (i * 7) % 40 for i in range(20000)]  # the target's continuation in the simulation
V = 64


def frozen_costs():
    return CostModel(dict(FLAT), ema=0.0)


class Head(Speculator):
    """A scripted model-based head: its first ``right`` draft tokens are the target's, the rest wrong.

    ``available=False`` proposes nothing (no version for this tenant yet);
    ``sampled=True`` attaches ``draft_probs`` (a draft drawn from them, as a
    draft head drafts for a sampled request). Each call's k is recorded.
    """

    needs_hidden_states = True

    def __init__(self, name, right, confidence=0.6, sampled=False, available=True):
        self.name, self.right, self.confidence = name, right, confidence
        self.sampled, self.available = sampled, available
        self.calls: list[int] = []

    def propose(self, ctx, k):
        self.calls.append(k)
        if not self.available:
            return DraftProposal(speculator=self.name)
        pos = len(ctx.token_ids) - ctx.num_prompt_tokens
        truth = TRUTH[pos:pos + k]
        r = min(self.right, len(truth))
        ids = truth[:r] + [t + 1 for t in truth[r:]]
        probs = torch.full((len(ids), V), 1.0 / V) if self.sampled else None
        return DraftProposal(token_ids=ids, draft_probs=probs, confidence=[self.confidence] * len(ids),
                             speculator=self.name)


class Stream:
    """Drives a controller through one request as the engine would, the target emitting ``TRUTH``.

    A draft is accepted up to its first token that differs from ``TRUTH`` (what
    greedy verification does; the sampled runs reuse it: the controller only
    sees the counts). Per step it records who was verified and which heads drafted.
    """

    def __init__(self, ctl, heads, temperature=0.0, tenant="default", rid="r"):
        self.ctl, self.heads, self.temperature, self.tenant, self.rid = ctl, heads, temperature, tenant, rid
        self.pos = 0
        self.verified: list[str] = []  # per step: the verified drafter, or "none"
        self.drafted: list[list[tuple[str, int]]] = []  # per step: (head, k) of each head asked to draft
        ctl.start_request(rid, PROMPT, tenant)

    def step(self):
        before = {h.name: len(h.calls) for h in self.heads}
        ctx = ProposeContext(self.rid, PROMPT + TRUTH[:self.pos], len(PROMPT), tenant=self.tenant,
                             temperature=self.temperature)
        d = self.ctl.propose(ctx, 16)
        ids = d.proposal.token_ids if d.speculator else []
        acc = common_prefix_len(ids, TRUTH[self.pos:])
        self.ctl.observe(self.rid, TRUTH[self.pos:self.pos + acc + 1], acc, len(ids))
        self.ctl.on_verify(len(ids) + 1, FLAT[len(ids) + 1] / 1000)
        self.pos += acc + 1
        self.verified.append(d.speculator or "none")
        self.drafted.append([(h.name, k) for h in self.heads for k in h.calls[before[h.name]:]])
        return d

    def run(self, n):
        for _ in range(n):
            self.step()
        return self

    def share(self, name, last):
        return Counter(self.verified[-last:])[name] / last


def controller(static, learned, **kw):
    kw.setdefault("explore_every", 4)
    return ConfidenceAwareController(static=static, learned=learned, cost_model=frozen_costs(), **kw)


# --------------------------------------------------------------------------- choosing between the heads
def test_learned_chosen_when_better_and_static_otherwise():
    static, learned = Head("draft_head", right=1), Head("learned_head", right=16)
    ctl = controller(static, learned)
    s = Stream(ctl, [static, learned]).run(200)
    assert s.verified[0] == "draft_head"  # equal priors: the static head (the floor) first
    assert s.share("learned_head", 100) > 0.9  # exploration found the better learned head
    # The learned head worsens (e.g. a bad version): it is dropped, the static head carries.
    learned.right, static.right = 0, 16
    s.run(300)
    assert s.share("draft_head", 100) > 0.9 and s.share("learned_head", 100) == 0.0
    # Both estimates are the controller's own, per speculator.
    assert ctl.estimator("learned_head", "default").position_probs(1)[0] < 0.2
    assert ctl.estimator("draft_head", "default").position_probs(4)[3] > 0.8


def test_a_learned_head_never_better_is_never_verified_after_its_first_probes():
    static, learned = Head("draft_head", right=16), Head("learned_head", right=0)
    s = Stream(controller(static, learned), [static, learned]).run(200)
    assert s.share("draft_head", 150) > 0.95
    assert s.verified.count("learned_head") == 0
    assert len(learned.calls) > 10  # still probed: it keeps its chance


@pytest.mark.parametrize("explore_every", [0, 4])
def test_at_most_one_head_drafts_per_step(explore_every):
    static, learned = Head("draft_head", right=3), Head("learned_head", right=5)
    s = Stream(controller(static, learned, explore_every=explore_every), [static, learned]).run(150)
    for drafted, verified in zip(s.drafted, s.verified):
        assert len(drafted) <= (1 if explore_every == 0 else 2)
        if len(drafted) == 2:  # a second head drafts only as an exploration (explore_tokens long)
            assert drafted[0][0] != drafted[1][0] and 4 in [k for _, k in drafted]
        assert verified in {name for name, _ in drafted} or verified == "none"
    if explore_every == 0:
        # Equal priors, no probes: the static head is first and the learned one never drafts.
        assert not learned.calls and len(static.calls) == 150
    else:
        assert sum(len(d) == 2 for d in s.drafted) > 5
        assert s.share("learned_head", 50) > 0.9  # the better one (5 right vs 3) drafts for real


def test_empty_learned_proposal_is_not_a_rejection():
    static, learned = Head("draft_head", right=2), Head("learned_head", right=16, available=False)
    ctl = controller(static, learned, learned_prior=0.9)
    s = Stream(ctl, [static, learned]).run(100)
    # Asked first every step (its prior beats the static head's), it had nothing: static drafted instead.
    assert len(learned.calls) == 100 and s.verified.count("learned_head") == 0
    assert s.share("draft_head", 100) > 0.9
    assert ctl.estimator("learned_head", "default").position_probs(16) == pytest.approx([0.9] * 16)
    # A version arrives: the untouched prior makes it the drafter at once.
    learned.available = True
    s.run(5)
    assert s.verified[-5:] == ["learned_head"] * 5


# --------------------------------------------------------------------------- re-priming on a hot swap
def test_reset_estimate_reprimes_one_speculator_per_tenant():
    static, learned = Head("draft_head", right=3), Head("learned_head", right=0)
    ctl = controller(static, learned, learned_prior=0.4)
    a = Stream(ctl, [static, learned], tenant="a", rid="ra").run(100)
    Stream(ctl, [static, learned], tenant="b", rid="rb").run(100)
    low = ctl.estimator("learned_head", "b").position_probs(2)
    assert low[0] < 0.2
    # tenant a gets a new version whose held-out acceptance is ~0.98, 0.96, then 0.95 onwards
    ctl.reset_estimate("learned_head", "a", [0.98, 0.96, 0.95])
    for mode in ("greedy", "sampled"):
        assert ctl.estimator("learned_head", "a", mode).position_probs(5) == pytest.approx(
            [0.98, 0.96, 0.95, 0.95, 0.95])
    assert ctl.estimator("learned_head", "b").position_probs(2) == low  # tenant b keeps its history
    assert ctl.estimator("draft_head", "a").position_probs(1)[0] > 0.8  # other speculators untouched
    learned.right = 16  # the new version is good: its prior makes it the drafter on the next step
    a.run(20)
    assert a.verified[-20:] == ["learned_head"] * 20
    # None: back to the constructor's prior; every tenant; one mode only
    ctl.reset_estimate("learned_head", None, None, mode="greedy")
    assert ctl.estimator("learned_head", "b").position_probs(3) == pytest.approx([0.4] * 3)
    ctl.reset_estimate("learned_head", "b", 0.75)
    assert ctl.estimator("learned_head", "b", "sampled").position_probs(2) == pytest.approx([0.75] * 2)
    for bad in (1.5, [], [0.5, -0.1]):
        with pytest.raises(ValueError):
            ctl.reset_estimate("learned_head", "a", bad)
    with pytest.raises(ValueError):
        ctl.reset_estimate("learned_head", "a", 0.5, mode="beam")


def test_reset_drops_the_old_versions_pending_draft():
    static, learned = Head("draft_head", right=0), Head("learned_head", right=0)
    ctl = controller(static, learned, learned_prior=0.9, explore_every=0)
    s = Stream(ctl, [static, learned])
    ctx = ProposeContext("r", PROMPT, len(PROMPT))
    assert ctl.propose(ctx, 16).speculator == "learned_head"
    ctl.reset_estimate("learned_head", "default", 0.9)  # published between propose and observe
    ctl.observe("r", TRUTH[:1], 0, 16)  # the old version's rejection is not charged to the new one
    assert ctl.estimator("learned_head", "default").position_probs(1)[0] == pytest.approx(0.9)
    s.run(1)
    assert ctl.estimator("learned_head", "default").position_probs(1)[0] < 0.9


def test_constructor_checks():
    with pytest.raises(ValueError, match="distinct names"):
        ConfidenceAwareController(static=Head("h", 1), learned=Head("h", 1))
    ctl = ConfidenceAwareController(learned=Head("learned_head", 1))  # a learned head alone is allowed
    assert ctl.heads == ctl.speculators == ctl.children == [ctl.learned]


# --------------------------------------------------------------------------- sampled requests
def test_sampled_estimates_recover_through_verified_exploration():
    # A sampled draft (drawn from draft_probs) cannot be judged in the shadow: once its
    # estimate fell, only a verified exploration draft lets it recover.
    def run(explore_every):
        static = Head("draft_head", right=0, sampled=True)
        ctl = ConfidenceAwareController(static=static, cost_model=frozen_costs(), explore_every=explore_every)
        s = Stream(ctl, [static], temperature=1.0).run(100)
        assert s.share("none", 50) > 0.8  # dropped (but for the verified probes)
        static.right = 16
        s.run(200)
        return s, ctl

    s, ctl = run(8)
    assert s.share("draft_head", 100) > 0.8
    assert ctl.estimator("draft_head", "default", "sampled").position_probs(1)[0] > 0.8
    assert ctl.estimator("draft_head", "default", "greedy").position_probs(1)[0] == pytest.approx(0.5)
    s, _ = run(0)
    assert s.share("draft_head", 100) == 0.0  # without exploration it never returns


def test_sampled_learned_head_found_and_sampled_adaptive_recovers():
    static = Head("draft_head", right=1, sampled=True)
    learned = Head("learned_head", right=16, sampled=True)
    s = Stream(controller(static, learned, explore_every=8), [static, learned], temperature=0.8).run(300)
    assert s.share("learned_head", 100) > 0.8
    # The adaptive speculator with sampled drafts: dropped, then probed by verification.
    adaptive = Head("suffix", right=0, sampled=True)
    ctl = ConfidenceAwareController(adaptive=adaptive, cost_model=frozen_costs(), explore_every=8)
    s = Stream(ctl, [adaptive], temperature=1.0).run(100)
    assert s.share("none", 50) > 0.8
    adaptive.right = 16
    s.run(200)
    assert s.share("suffix", 100) > 0.8


# --------------------------------------------------------------------------- end to end (tiny model)
class PlainHead(PlainLookup):
    """A scripted head on the real engine: knows plain outputs by prompt; its first ``num_right`` right."""

    needs_hidden_states = True

    def __init__(self, name, plain_by_prompt, num_right, vocab_size, tenants=None):
        super().__init__(name, plain_by_prompt, num_right, vocab_size)
        self.tenants = tenants  # None: every tenant; else only these have a version

    def propose(self, ctx, k):
        assert ctx.hidden_state is not None  # fed like a draft head
        if self.tenants is not None and ctx.tenant not in self.tenants:
            return DraftProposal(speculator=self.name)
        return super().propose(ctx, k)


@pytest.fixture(scope="module")
def prompts_and_plain(tiny_target):
    tok = tiny_target.tokenizer
    prompts = [tok.encode(f"SELECT c{i} FROM t WHERE x =") for i in range(4)]
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    plain_engine = Engine(tiny_target)
    return prompts, {tuple(p): plain_engine.generate(p, params).token_ids for p in prompts}


@pytest.mark.parametrize("tree", [False, True], ids=["chain", "tree"])
def test_greedy_exact_with_a_learned_candidate(tiny_target, prompts_and_plain, tree):
    from adaspec.speculators.draft_head import DraftHeadSpeculator, new_draft_head, target_embedding_weight

    prompts, plain = prompts_and_plain
    # the static head: a real (untrained) draft head; the learned one: right 6 tokens, then wrong,
    # with a version for tenant "a" only
    static = DraftHeadSpeculator(new_draft_head(tiny_target, list(range(300)), intermediate_size=64, seed=1),
                                 target_embedding_weight(tiny_target))
    learned = PlainHead("learned_head", plain, 6, tiny_target.vocab_size, tenants={"a"})
    ctl = ConfidenceAwareController(static=static, adaptive=SuffixSpeculator(), learned=learned,
                                    cost_model=frozen_costs(), tree=tree, explore_every=4)
    eng = Engine(tiny_target, controller=ctl)
    assert "learned_head" in eng.speculators  # the engine keeps it informed
    steps: Counter = Counter()
    for tenant in ("b", "a"):
        for p in prompts:
            r = eng.generate(p, SamplingParams(max_tokens=40, ignore_eos=True), tenant=tenant)
            assert r.token_ids == plain[tuple(p)], (tenant, tree)
            if not tree:
                steps.update({f"{tenant}:{k}": v for k, v in r.speculation.steps_by_speculator.items()})
            else:
                steps.update({f"{tenant}:{k}": v for k, v in r.speculation.accepted_by_source.items()})
    assert steps["b:learned_head"] == 0  # no version for tenant b: never drafts for it
    assert steps["a:learned_head"] > 0
    assert ctl.estimator("learned_head", "b").position_probs(1)[0] == pytest.approx(0.5)  # unavailable != rejected


def test_speculator_static_is_the_controller_and_declines_when_acceptance_is_low(tiny_target, monkeypatch,
                                                                                 prompts_and_plain):
    from adaspec import config
    from adaspec.speculators import draft_head

    prompts, plain = prompts_and_plain

    class Wrong(Speculator):
        name = "draft_head"
        needs_hidden_states = True

        def propose(self, ctx, k):
            return DraftProposal(token_ids=[7] * k, confidence=[0.9] * k, speculator=self.name)

    monkeypatch.setattr(draft_head, "load_static_speculator", lambda target: Wrong())
    monkeypatch.setattr(config, "calibrated_cost_model", lambda target: frozen_costs())  # as measured, not flat
    cfg = config.EngineConfig(speculator="static")
    ctl = config.build_controller(cfg, tiny_target)
    assert isinstance(ctl, ConfidenceAwareController) and ctl.adaptive is None and ctl.learned is None
    assert ctl.max_lookahead == cfg.effective_lookahead == config.ATLAS_LOOKAHEAD
    eng = Engine(tiny_target, controller=ctl)
    for p in prompts[:3]:
        r = eng.generate(p, SamplingParams(max_tokens=40, ignore_eos=True))
        assert r.token_ids == plain[tuple(p)]
    steps = r.speculation.steps_by_speculator
    assert steps.get("none", 0) > 0.8 * sum(steps.values())  # it stopped drafting (a fixed k=8 never would)

    # A head that is right: the same controller drafts long with it.
    monkeypatch.setattr(draft_head, "load_static_speculator",
                        lambda target: PlainHead("draft_head", plain, 40, tiny_target.vocab_size))
    eng = Engine(tiny_target, controller=config.build_controller(cfg, tiny_target))
    for p in prompts[:2]:
        r = eng.generate(p, SamplingParams(max_tokens=40, ignore_eos=True))
        assert r.token_ids == plain[tuple(p)]
    assert r.speculation.mean_acceptance_length > 4.0


def test_speculator_static_with_a_draft_model_is_the_controller(tiny_target, tiny_model_dir):
    from adaspec import config

    ctl = config.build_controller(config.EngineConfig(speculator="static", draft_model=str(tiny_model_dir),
                                                      calibrate=False), tiny_target)
    assert isinstance(ctl, ConfidenceAwareController) and ctl.static.name == "draft_model"
    # Costs fixed, drafting priced free: whether it drafts depends on its estimates alone (not on timing).
    ctl.costs = frozen_costs()
    ctl.costs.observe_draft = lambda *a: None
    p = tiny_target.tokenizer.encode("hello there")
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    r = Engine(tiny_target, controller=ctl).generate(p, params)
    assert r.token_ids == Engine(tiny_target).generate(p, params).token_ids
    assert r.speculation.proposed > 0 and r.speculation.acceptance_rate == 1.0  # the target drafting for itself
