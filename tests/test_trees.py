"""Token trees (issue 14): tree type, exact tree verification, the engine's tree step, the controller's sizing.

Greedy output must equal plain decoding for every tree shape (scripted trees
reach every accept/reject case, including the right token only on a second
branch); sampled output must keep the target's distribution (histograms on a
16-token vocabulary, trees of several shapes, with and without draft
probabilities, both rules: coupled for seeded requests, recursive rejection
sampling for unseeded ones).
"""

from __future__ import annotations

import random
from collections import Counter

import pytest
import torch

from adaspec import config
from adaspec.controller import ConfidenceAwareController, CostModel
from adaspec.engine import Engine
from adaspec.estimates import size_tree
from adaspec.sampling import process_logits
from adaspec.speculators import NgramSpeculator, SuffixSpeculator
from adaspec.types import ProposeContext, SamplingParams, TokenTree, TreeClaim
from adaspec.verify import verify_tree_coupled, verify_tree_greedy, verify_tree_stochastic
from conftest import SMALL_VOCAB, tv
from scripted import ScriptedTreeController

PROMPT = [5, 6, 7, 8, 9, 5, 6, 7, 8, 9, 5, 6, 7, 11, 12]


# --------------------------------------------------------------------------- the type
def test_tree_merges_shared_prefixes_and_keeps_claims():
    t = TokenTree()
    a = t.add_path([1, 2, 3], "suffix", confidence=[0.9, 0.8, 0.7])
    b = t.add_path([1, 2, 4], "draft_head")
    c = t.add_path([5], "ngram")
    assert t.tokens == [1, 2, 3, 4, 5] and t.parents == [-1, 0, 1, 1, -1]
    assert a[:2] == b[:2] and c == [4]
    assert [x.source for x in t.claims[0]] == ["suffix", "draft_head"] and t.source(3) == "draft_head"
    assert t.child(1, 4) == 3 and t.children(-1) == [0, 4] and t.max_depth == 3 and t.path(3) == [0, 1, 3]
    sub = t.subtree([0, 1, 3])
    assert sub.tokens == [1, 2, 4] and sub.parents == [-1, 0, 1]
    with pytest.raises(ValueError):
        t.subtree([1])  # without its parent
    with pytest.raises(ValueError):
        t.add(9, 1, TreeClaim("x"))
    other = TokenTree()
    other.add_path([1, 7], "ngram")
    t.merge(other)
    assert t.tokens[-1] == 7 and t.parents[-1] == 0 and t.num_nodes == 6


# --------------------------------------------------------------------------- greedy rule
def one_hot_rows(argmax: list[int], V: int = 10) -> torch.Tensor:
    x = torch.zeros(len(argmax), V)
    for i, a in enumerate(argmax):
        x[i, a] = 5.0
    return x


def test_greedy_tree_rule_every_case():
    t = TokenTree()
    t.add_path([1, 2], "a")        # nodes 0, 1
    t.add_path([3, 4, 5], "b")     # nodes 2, 3, 4
    t.add(0, 6, TreeClaim("a"))    # node 5, a second child of node 0
    # rows: root, node0..node5; the right tokens only on the second branch, to its leaf: bonus
    r = verify_tree_greedy(one_hot_rows([3, 9, 9, 4, 5, 7, 9]), t)
    assert r.token_ids == [3, 4, 5, 7] and r.path == [2, 3, 4]
    # first branch, then the second child of node 0, then the bonus after it
    r = verify_tree_greedy(one_hot_rows([1, 6, 9, 9, 9, 9, 8]), t)
    assert r.token_ids == [1, 6, 8] and r.path == [0, 5]
    # rejected at the root: the target's argmax is the recovered token
    r = verify_tree_greedy(one_hot_rows([7, 1, 1, 1, 1, 1, 1]), t)
    assert r.token_ids == [7] and r.path == [] and r.num_accepted == 0
    # partial: accepted node 2, rejected under it
    r = verify_tree_greedy(one_hot_rows([3, 0, 0, 0, 0, 0, 0]), t)
    assert r.token_ids == [3, 0] and r.path == [2]
    # empty tree: plain decoding
    r = verify_tree_greedy(one_hot_rows([4]), TokenTree())
    assert r.token_ids == [4]
    with pytest.raises(ValueError):
        verify_tree_greedy(one_hot_rows([1, 2]), t)


# --------------------------------------------------------------------------- engine, greedy
def _chain(truth, wrong):
    return [(-1, truth[0]), (0, truth[1]), (1, truth[2]), (2, truth[3])]


def _second_branch(truth, wrong):  # the right token only on the second branch of the root
    return [(-1, wrong(truth[0])), (0, truth[1]), (-1, truth[0]), (2, truth[1]), (3, wrong(truth[2]))]


def _deep_second(truth, wrong):  # right, then right only as a second child, then every child wrong
    return [(-1, truth[0]), (0, wrong(truth[1])), (0, truth[1]), (2, wrong(truth[2])), (2, wrong(truth[2], 1))]


def _all_wrong(truth, wrong):
    return [(-1, wrong(truth[0], i)) for i in range(3)] + [(0, truth[1]), (1, truth[1])]


def _empty(truth, wrong):
    return []


def _single_right(truth, wrong):
    return [(-1, truth[0])]


def _single_wrong(truth, wrong):
    return [(-1, wrong(truth[0]))]


def _random_shape(seed):
    def shape(truth, wrong):
        g = random.Random(seed * 7919 + truth[0])
        j = g.randrange(0, 6)  # truth depth embedded
        nodes: list[tuple[int, int]] = []
        parent = -1
        for d in range(j):
            for _ in range(g.randrange(0, 3)):  # wrong siblings before the right one
                nodes.append((parent, wrong(truth[d], g.randrange(5))))
            nodes.append((parent, truth[d]))
            parent = len(nodes) - 1
        for _ in range(g.randrange(0, 8)):  # noise anywhere
            nodes.append((g.randrange(-1, len(nodes)), g.randrange(1000)))
        return nodes
    return shape


SHAPES = {"chain": _chain, "second_branch": _second_branch, "deep_second": _deep_second, "all_wrong": _all_wrong,
          "empty": _empty, "single_right": _single_right, "single_wrong": _single_wrong,
          **{f"random{s}": _random_shape(s) for s in range(4)}}


@pytest.fixture(scope="module")
def plain_out(tiny_target):
    return Engine(tiny_target).generate(PROMPT, SamplingParams(max_tokens=40, ignore_eos=True)).token_ids


@pytest.mark.parametrize("name", list(SHAPES))
def test_greedy_tree_output_equals_plain(tiny_target, plain_out, name):
    t = tiny_target
    ctl = ScriptedTreeController(plain_out, SHAPES[name], t.vocab_size)
    eng = Engine(t, controller=ctl)
    state = eng.start(PROMPT, SamplingParams(max_tokens=40, ignore_eos=True))
    steps = []
    while not state.finished:
        before = len(state.output_ids)
        step = eng.step(state)
        steps.append(step)
        if not state.finished:  # the invariant: every committed token cached but the newest
            assert state.kv.length == len(state.token_ids) - 1
        assert step.tree_size <= max(0, 40 - before - 1)  # the token budget bounds the tree
        assert len(step.accepted_sources) == min(step.num_accepted, step.num_emitted)
    assert state.output_ids == plain_out
    if name == "empty":
        assert all(s.tree_size == 0 and s.speculator == "none" and s.num_emitted == 1 for s in steps)
    if name in ("chain", "second_branch"):
        assert max(s.num_accepted for s in steps) >= 2
    stats = eng.result(state).speculation
    assert stats.tree_steps == sum(1 for s in steps if s.tree_size)
    assert sum(stats.accepted_by_source.values()) == sum(len(s.accepted_sources) for s in steps)
    assert stats.emitted_on_draft_steps + sum(1 for s in steps if not s.tree_size) == len(plain_out)


def test_single_node_tree_is_a_chain_step(tiny_target, plain_out):
    """One right node: two tokens per step, as a chain of one draft token."""
    t = tiny_target
    eng = Engine(t, controller=ScriptedTreeController(plain_out, _single_right, t.vocab_size))
    r = eng.generate(PROMPT, SamplingParams(max_tokens=21, ignore_eos=True))
    assert r.token_ids == plain_out[:21]
    assert r.speculation.mean_acceptance_length == 2.0 and r.speculation.target_forwards == 11


def test_tree_stops_mid_path_like_a_chain(tiny_target, plain_out):
    """A stop token inside the accepted path ends the output there (FAULT_CASES F3/F4 for trees)."""
    t = tiny_target
    stop = plain_out[4]
    cut = plain_out.index(stop) + 1
    ctl = ScriptedTreeController(plain_out, _second_branch, t.vocab_size)
    for max_tokens in (3, cut, 40):
        r = Engine(t, controller=ctl).generate(PROMPT, SamplingParams(max_tokens=max_tokens, stop_token_ids=[stop],
                                                                      ignore_eos=True))
        n = min(max_tokens, cut)
        assert r.token_ids == plain_out[:n]
        assert r.finish_reason == ("stop" if cut <= max_tokens else "length")
        assert r.usage.completion_tokens == n


def _big_tree(truth, wrong):
    nodes = [(-1, truth[0])]
    for i in range(1, 8):
        nodes.append((i - 1, truth[i]))
    nodes += [(-1, wrong(truth[0], i)) for i in range(30)]
    return nodes


def test_tree_never_passes_the_context_window(tmp_path):
    from conftest import build_tiny_model_dir
    from adaspec.target import load_target

    t = load_target(str(build_tiny_model_dir(tmp_path / "m", max_position_embeddings=128)), max_model_len=128)
    prompt = [(7 * i + 3) % 500 for i in range(100)]
    plain = Engine(t).generate(prompt, SamplingParams(max_tokens=100, ignore_eos=True))
    assert plain.finish_reason == "length" and len(plain.token_ids) == 28
    ctl = ScriptedTreeController(plain.token_ids, _big_tree, t.vocab_size)
    eng = Engine(t, controller=ctl)
    state = eng.start(prompt, SamplingParams(max_tokens=100, ignore_eos=True))
    while not state.finished:
        room = t.max_model_len - len(state.token_ids)
        step = eng.step(state)
        assert step.tree_size <= max(0, room - 1)
    assert state.output_ids == plain.token_ids and state.finish_reason == "length"


def test_transformers_runtime_falls_back_to_chains(tiny_model_dir):
    from adaspec.target import load_target

    t = load_target(str(tiny_model_dir), max_model_len=512, runtime="transformers")
    assert not t.supports_trees
    plain = Engine(t).generate(PROMPT, SamplingParams(max_tokens=24, ignore_eos=True)).token_ids
    with pytest.warns(RuntimeWarning, match="tree mode needs the lean core"):
        ctl = ConfidenceAwareController(adaptive=SuffixSpeculator(), lookup=NgramSpeculator(),
                                        cost_model=CostModel({1: 10.0, 9: 12.0}), tree=True)
        eng = Engine(t, controller=ctl)
    assert ctl.tree is False
    r = eng.generate(PROMPT, SamplingParams(max_tokens=24, ignore_eos=True))
    assert r.token_ids == plain and r.speculation.tree_steps == 0
    # a scripted tree on this runtime: its first branch is verified as a chain
    r = Engine(t, controller=ScriptedTreeController(plain, _chain, t.vocab_size)).generate(
        PROMPT, SamplingParams(max_tokens=24, ignore_eos=True))
    assert r.token_ids == plain and r.speculation.tree_steps == 0 and r.speculation.target_forwards == 5  # 4 drafts + 1 per step


# --------------------------------------------------------------------------- the controller
def test_size_tree_follows_the_cost_curve():
    values = [0.9, 0.8, 0.5, 0.3, 0.05]
    parents = [-1, 0, -1, 1, 3]
    keep, rate = size_tree(values, parents, lambda n: 10.0, 16)  # flat cost: every valuable node
    assert keep == [0, 1, 2, 3, 4] and rate == pytest.approx(1000 * 3.55 / 10)
    keep, _ = size_tree(values, parents, lambda n: 10.0 + 5.0 * n, 16)  # steep cost: the best few
    assert keep == [0, 1]
    keep, rate = size_tree([0.01], [-1], lambda n: 10.0 + 5.0 * n, 16)  # nothing pays: plain
    assert keep == [] and rate == pytest.approx(1000 / 15.0)
    assert size_tree(values, parents, lambda n: 10.0, 2)[0] == [0, 1]  # the bound


def test_atlas_tree_greedy_exact_and_learns(tiny_target):
    t = tiny_target
    prompt = [4, 5, 6, 7, 8, 9, 10, 11, 12, 13] * 3
    plain = Engine(t).generate(prompt, SamplingParams(max_tokens=40, ignore_eos=True)).token_ids
    ctl = ConfidenceAwareController(adaptive=SuffixSpeculator(), lookup=NgramSpeculator(),
                                    cost_model=CostModel({1: 10.0, 9: 12.0}), tree=True)
    eng = Engine(t, controller=ctl)
    for _ in range(3):
        r = eng.generate(prompt, SamplingParams(max_tokens=40, ignore_eos=True))
        assert r.token_ids == plain
    assert r.speculation.tree_steps > 0 and r.speculation.mean_acceptance_length > 2.0
    assert set(r.speculation.accepted_by_source) <= {"suffix", "ngram"}
    d = r.speculation.to_dict()
    assert d["tree_nodes"] == r.speculation.tree_nodes and d["accepted_by_source"]
    assert ("suffix", "default", "greedy") in ctl._estimators


def test_config_builds_atlas_tree(tiny_target):
    cfg = config.EngineConfig(model="x", speculator="atlas-tree", calibrate=False)
    cfg.validate()
    ctl = config.build_controller(cfg, tiny_target)
    assert ctl.tree and ctl.lookup is not None and cfg.effective_lookahead == config.ATLAS_LOOKAHEAD


def test_suffix_and_ngram_propose_branches():
    s = SuffixSpeculator()
    s.start_request("r0", [1, 2, 3, 4, 1, 2, 3, 5, 1, 2, 3, 4])
    ctx = ProposeContext("r0", [1, 2, 3, 4, 1, 2, 3, 5, 1, 2, 3, 4, 9, 1, 2, 3], 16)
    tree = s.propose_tree(ctx, max_nodes=8, max_depth=4)
    assert tree.child(-1, 4) is not None and tree.child(-1, 5) is not None  # both continuations of "1 2 3"
    assert all(c.source == "suffix" for cl in tree.claims for c in cl) and tree.num_nodes <= 8
    top = tree.child(-1, 4)
    assert tree.claims[top][0].confidence == pytest.approx(2 / 3)
    n = NgramSpeculator().propose_tree(ctx, max_nodes=8, max_depth=3)
    assert {n.tokens[i] for i in n.children(-1)} == {4, 5}


# --------------------------------------------------------------------------- sampling rules
V = SMALL_VOCAB


def _sampled_tree(q_rows, g, shape):
    """A tree whose sampled claims are drawn from their q (the rule's exactness condition)."""
    tree = TokenTree()
    for parent, q in shape:
        if q is None:
            tok = int(torch.randint(0, V, (1,), generator=g))
            tree.add(parent, tok, TreeClaim("det"))
        else:
            tok = int(torch.multinomial(q_rows[q], 1, generator=g))
            tree.add(parent, tok, TreeClaim("sampled", q_rows[q]))
    return tree


# (parent, q index or None): point masses, i.i.d. siblings from one q (SpecInfer), mixed
RULE_SHAPES = {
    "point_masses": [(-1, None), (-1, None), (-1, None), (0, None), (0, None)],
    "iid_siblings": [(-1, 0), (-1, 0), (-1, 0), (0, 1)],
    "mixed": [(-1, 1), (-1, None), (0, 0), (-1, 0), (-1, 1)],
}


@pytest.mark.parametrize("name", list(RULE_SHAPES))
def test_tree_rejection_sampling_keeps_the_distribution(name):
    g = torch.Generator().manual_seed(3)
    p = torch.softmax(torch.randn(V, generator=g) * 1.5, -1)
    q_rows = [torch.softmax(torch.randn(V, generator=g), -1), torch.softmax(torch.randn(V, generator=g) * 2, -1)]
    child = torch.softmax(torch.randn(V, generator=g), -1)
    runs = 20000
    hist = Counter()
    for _ in range(runs):
        tree = _sampled_tree(q_rows, g, RULE_SHAPES[name])
        rows = torch.stack([p] + [child] * tree.num_nodes)
        hist[verify_tree_stochastic(rows, tree, g).token_ids[0]] += 1
    assert tv(hist, Counter({i: float(p[i]) * runs for i in range(V)})) < 0.02


def test_tree_coupled_walks_the_target_sample():
    """Any tree, one seed: the coupled walk emits what plain seeded sampling emits."""
    g = torch.Generator().manual_seed(0)
    rows = torch.softmax(torch.randn(6, V, generator=g), -1)
    from adaspec.verify import verify_coupled

    plain = verify_coupled(rows[:1], [], seed=9, start_position=4).token_ids[0]
    for shape in RULE_SHAPES.values():
        tree = _sampled_tree([rows[1], rows[2]], g, shape[:5])
        r = verify_tree_coupled(rows[: tree.num_nodes + 1], tree, seed=9, start_position=4)
        assert r.token_ids[0] == plain


def _engine_hist(engine, prompt, params_kw, seeded, runs):
    first, second = Counter(), Counter()
    for seed in range(runs):
        r = engine.generate(prompt, SamplingParams(max_tokens=2, seed=seed if seeded else None, ignore_eos=True,
                                                   **params_kw))
        first[r.token_ids[0]] += 1
        second[tuple(r.token_ids[:2])] += 1
    return first, second


class _SampledTreeController(ScriptedTreeController):
    """Each step: a tree of point masses and claims sampled from a fixed q, several shapes."""

    def __init__(self, shape, q_rows, seed=0):
        super().__init__([], None, V)
        self.rule_shape, self.q_rows = shape, q_rows
        self.g = torch.Generator().manual_seed(seed)

    def propose(self, ctx, max_lookahead, speculators=None):
        from adaspec.controller import Decision
        from adaspec.types import DraftProposal

        tree = _sampled_tree(self.q_rows, self.g, self.rule_shape)
        return Decision("tree", tree.num_nodes, DraftProposal(speculator="tree", tree=tree))


@pytest.mark.parametrize("rule", ["coupled", "rejection"])
@pytest.mark.parametrize("name", ["point_masses", "mixed"])
def test_engine_tree_sampling_matches_exact_distribution(small_vocab_target, rule, name, monkeypatch):
    import itertools

    counter = itertools.count(1)
    monkeypatch.setattr("adaspec.engine.os.urandom", lambda n: next(counter).to_bytes(n, "little"))
    t = small_vocab_target
    prompt = [3, 7, 1, 9]
    kw = dict(temperature=0.9, top_k=6)
    runs = 1500
    first_exact = process_logits(t.forward(t.new_cache(), prompt).logits[-1:], 0.9, 6, 1.0)[0]
    joint = Counter()
    for a in torch.nonzero(first_exact).flatten().tolist():
        nxt = process_logits(t.forward(t.new_cache(), prompt + [a]).logits[-1:], 0.9, 6, 1.0)[0]
        for b in range(V):
            joint[(a, b)] = float(first_exact[a] * nxt[b]) * runs
    q_rows = [torch.softmax(torch.randn(V, generator=torch.Generator().manual_seed(s)), -1) for s in (1, 2)]
    ctl = _SampledTreeController(RULE_SHAPES[name], q_rows, seed=4)
    first, second = _engine_hist(Engine(t, controller=ctl), prompt, kw, rule == "coupled", runs)
    assert set(first) <= set(torch.nonzero(first_exact).flatten().tolist())  # never outside top-k
    assert tv(first, Counter({i: float(first_exact[i]) * runs for i in range(V)})) < 0.05
    assert tv(second, joint) < 0.12
    if rule == "coupled":  # drafter-invariant: the same tokens as plain seeded sampling
        plain_first, plain_second = _engine_hist(Engine(t), prompt, kw, True, 300)
        tree_first, tree_second = _engine_hist(Engine(t, controller=ctl), prompt, kw, True, 300)
        assert plain_second == tree_second


# --------------------------------------------------------------------------- the real model
@pytest.mark.real_model
def test_real_model_greedy_tree_equals_plain(real_target):
    from adaspec.model.target import lean_target

    t = real_target if getattr(real_target, "supports_trees", False) else lean_target(real_target)
    cfg = config.EngineConfig(speculator="atlas-tree", calibrate=False)
    eng = Engine(t, controller=config.build_controller(cfg, t))
    plain = Engine(t)
    prompts = ["def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
               "List the planets of the solar system, one per line:",
               "SELECT name, age FROM users WHERE age > 30 ORDER BY"]
    trees = 0
    for text in prompts * 2:
        ids = eng.encode_prompt(text, chat=True)
        p = SamplingParams(max_tokens=48)
        a, b = eng.generate(ids, p), plain.generate(ids, p)
        assert a.token_ids == b.token_ids, text
        trees += a.speculation.tree_steps
    assert trees > 0


def test_equal_draws_keep_their_proposal_order():
    """Two i.i.d. draws of one token are two candidates at their own places, not regrouped."""
    q = torch.full((V,), 1.0 / V)
    t = TokenTree()
    t.add(-1, 3, TreeClaim("s", q))
    t.add(-1, 5, TreeClaim("s", q))
    t.add(-1, 3, TreeClaim("s", q))
    assert [(n, t.tokens[n]) for n, _ in t.candidates(-1)] == [(0, 3), (1, 5), (0, 3)]
    sub = t.subtree([0, 1], point_masses=True)
    assert [sub.tokens[n] for n, _ in sub.candidates(-1)] == [3, 5, 3]
    assert all(c.draft_probs is None for _, c in sub.candidates(-1))
    merged = TokenTree()
    merged.merge(t)
    assert [merged.tokens[n] for n, _ in merged.candidates(-1)] == [3, 5, 3]


def test_tree_mode_with_logit_bias_and_penalties_equals_constrained_plain(tiny_target):
    """Logits processors run on chain rows: with bias or penalties a tree step verifies its first branch."""
    t = tiny_target
    kw = dict(max_tokens=30, ignore_eos=True, presence_penalty=1.5, frequency_penalty=1.0, logit_bias={13: 3.0})
    want = Engine(t).generate(PROMPT, SamplingParams(**kw)).token_ids
    for shape in ("chain", "second_branch", "random3"):
        if shape not in SHAPES:
            continue
        eng = Engine(t, controller=ScriptedTreeController(want, SHAPES[shape], t.vocab_size))
        got = eng.generate(PROMPT, SamplingParams(**kw))
        assert got.token_ids == want, shape
        assert got.speculation.tree_steps == 0  # no tree forward ran
