"""Suffix speculator: learning, drafting rules, bounds, tenants, persistence (no model)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adaspec.speculators.suffix import SuffixSpeculator, SuffixTrie
from adaspec.types import DEFAULT_TENANT, ProposeContext

SPIDER = Path(__file__).resolve().parents[2] / "shared" / "data" / "prompts" / "spider" / "dev.json"


def ctx(request_id: str, token_ids, tenant: str = DEFAULT_TENANT) -> ProposeContext:
    return ProposeContext(request_id=request_id, token_ids=token_ids, num_prompt_tokens=0, tenant=tenant)


def run_request(spec, rid, prompt, output, tenant=DEFAULT_TENANT, shareable=False):
    """Index one finished request (prompt, then its output as one observed step)."""
    spec.start_request(rid, prompt, tenant, shareable=shareable)
    spec.observe(rid, output, 0, 0)
    spec.stop_request(rid)


def simulate(spec, requests, k=8):
    """Greedy verification against the true output; returns per-request counters.

    Each step: propose up to k draft tokens, accept the prefix that matches the
    true continuation, emit it plus one true token (the recovered or bonus
    token), observe. Returns a list of (steps, emitted, draft_steps,
    emitted_on_draft_steps) per request.
    """
    out = []
    for r, (prompt, truth) in enumerate(requests):
        rid = f"req{r}"
        spec.start_request(rid, prompt)
        context = list(prompt)
        pos = steps = emitted = draft_steps = draft_emitted = 0
        while pos < len(truth):
            draft = spec.propose(ctx(rid, context), k).token_ids
            accepted = 0
            while accepted < len(draft) and pos + accepted < len(truth) and draft[accepted] == truth[pos + accepted]:
                accepted += 1
            new = truth[pos : pos + accepted + 1]
            spec.observe(rid, new, accepted, len(draft))
            context += new
            pos += len(new)
            steps += 1
            emitted += len(new)
            if draft:
                draft_steps += 1
                draft_emitted += len(new)
        spec.stop_request(rid)
        out.append((steps, emitted, draft_steps, draft_emitted))
    return out


def mean_acceptance_length(counters) -> float:
    """emitted_on_draft_steps / draft_steps (accepted + the recovered or bonus token)."""
    return sum(c[3] for c in counters) / max(1, sum(c[2] for c in counters))


def tokens_per_forward(counters) -> float:
    return sum(c[1] for c in counters) / sum(c[0] for c in counters)


# -- drafting ---------------------------------------------------------------


def test_defaults_are_documented_values():
    s = SuffixSpeculator()
    assert s.name == "suffix"
    assert (s.max_depth, s.max_match_len, s.spec_factor, s.min_confidence) == (32, 24, 2.0, 0.1)
    assert (s.max_tokens_per_tenant, s.max_nodes_per_tenant) == (200_000, 1_000_000)
    assert (s.max_prompt_tokens, s.max_sequence_tokens, s.max_request_nodes, s.max_tenants) == (4096, 16384, 131072, 64)
    assert s.enable_shared is True
    assert not s.needs_hidden_states and not s.provides_draft_probs


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_depth": 1},
        {"max_match_len": 32},
        {"max_match_len": 0},
        {"spec_factor": 0},
        {"min_confidence": 1.5},
        {"max_tokens_per_tenant": 0},
        {"max_tenants": 0},
    ],
)
def test_rejects_bad_settings(kwargs):
    with pytest.raises(ValueError):
        SuffixSpeculator(**kwargs)


def test_empty_state_proposes_nothing():
    s = SuffixSpeculator()
    assert s.propose(ctx("nobody", [1, 2, 3]), 8).token_ids == []
    s.start_request("r", [1, 2, 3])
    p = s.propose(ctx("r", [1, 2, 3]), 8)
    assert p.token_ids == [] and p.num_draft_tokens == 0 and p.speculator == "suffix"


def test_learns_a_continuation_from_one_earlier_request():
    s = SuffixSpeculator()
    run_request(s, "a", [7, 8], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10])
    s.start_request("b", [50, 1, 2, 3])
    p = s.propose(ctx("b", [50, 1, 2, 3]), 4)
    assert p.token_ids == [4, 5, 6, 7]
    assert p.confidence is not None and len(p.confidence) == 4
    assert all(0.0 <= c <= 1.0 for c in p.confidence)
    assert p.draft_probs is None
    # A request the speculator never saw start still drafts from the tenant structure.
    assert s.propose(ctx("unknown", [1, 2, 3]), 2).token_ids == [4, 5]


def test_lookahead_is_respected():
    s = SuffixSpeculator()
    seq = list(range(100, 160))
    run_request(s, "a", [1], seq)
    context = seq[:24]
    assert s.propose(ctx("x", context), 0).token_ids == []
    assert s.propose(ctx("x", context), -3).token_ids == []
    for k in range(1, 17):
        p = s.propose(ctx("x", context), k)
        assert p.token_ids == seq[24 : 24 + k]
        assert len(p.confidence) == k


def test_draft_length_adapts_to_match_length():
    # MAX_SPEC = spec_factor * match length (default spec_factor 2.0).
    s = SuffixSpeculator()
    seq = list(range(100, 160))
    run_request(s, "a", [1], seq)
    assert s.propose(ctx("x", [100]), 16).token_ids == [101, 102]
    assert s.propose(ctx("x", [100, 101]), 16).token_ids == list(range(102, 106))
    s1 = SuffixSpeculator(spec_factor=1.0)
    run_request(s1, "a", [1], seq)
    assert s1.propose(ctx("x", [100, 101]), 16).token_ids == [102, 103]


def test_walk_continues_past_the_depth_limit():
    # Matched 24 tokens at depth 32 leaves 8 in the trie; re-matching continues.
    s = SuffixSpeculator()
    seq = list(range(100, 160))
    run_request(s, "a", [1], seq)
    assert s.propose(ctx("x", seq[:30]), 16).token_ids == seq[30:46]


def test_most_frequent_continuation_and_per_token_confidence():
    s = SuffixSpeculator()
    for i in range(3):
        run_request(s, f"a{i}", [1], [5, 6, 7, 8, 9])
    run_request(s, "b", [1], [5, 6, 7, 20, 21])
    p = s.propose(ctx("x", [5, 6, 7]), 3)
    assert p.token_ids == [8, 9]  # 8 followed 3 of 4 times, then 9 every time; then the sequences end
    assert p.confidence == pytest.approx([0.75, 1.0])


def test_min_confidence_cuts_drafts():
    # Default min_confidence 0.1: 10 equally likely continuations (0.1) still
    # draft one token, 11 (1/11 < 0.1) draft none.
    for n, expect in ((10, 1), (11, 0)):
        s = SuffixSpeculator()
        for t in range(n):
            run_request(s, f"a{t}", [1], [100, 101, 102, 200 + t])
        p = s.propose(ctx("x", [100, 101, 102]), 8)
        assert len(p.token_ids) == expect
        if expect:
            assert p.confidence == pytest.approx([0.1])
    s = SuffixSpeculator(min_confidence=0.0)
    for t in range(11):
        run_request(s, f"a{t}", [1], [100, 101, 102, 200 + t])
    assert len(s.propose(ctx("x", [100, 101, 102]), 8).token_ids) == 1


def test_cumulative_confidence_stops_the_walk():
    # Each step splits evenly in two: cumulative 0.5, 0.25, 0.125 >= 0.1 > 0.0625.
    s = SuffixSpeculator(spec_factor=8.0)
    for i in range(64):
        bits = [(i >> b) & 1 for b in range(6)]
        run_request(s, f"a{i}", [0], [9, 9, 9] + [10 + 2 * b for b in bits])
    p = s.propose(ctx("x", [9, 9, 9]), 8)
    assert p.token_ids == [10, 10, 10]  # ties go to the smallest token id
    assert p.confidence == pytest.approx([0.5, 0.5, 0.5])


def test_request_structure_copies_from_its_own_prompt():
    s = SuffixSpeculator()
    prompt = [1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 1, 2, 3]
    s.start_request("r", prompt)
    assert s.propose(ctx("r", prompt), 4).token_ids == [4, 5, 6, 7]
    s.observe("r", [4, 5], 2, 4)
    assert s.propose(ctx("r", prompt + [4, 5]), 3).token_ids == [6, 7, 8]


def test_picks_structure_with_higher_expected_accepted_tokens():
    s = SuffixSpeculator()
    for i in range(5):
        run_request(s, f"a{i}", [0], [1, 2, 3, 4, 5, 6])
    # In the request's own prompt 1 2 3 went on to 9 once and to 8 once (0.5 each);
    # in the tenant's traffic it went on to 4 5 6 five times in seven (5/7).
    prompt = [1, 2, 3, 9, 5, 1, 2, 3, 8, 6, 1, 2, 3]
    s.start_request("r", prompt)
    p = s.propose(ctx("r", prompt), 3)
    assert p.token_ids == [4, 5, 6]
    assert p.confidence == pytest.approx([5 / 7, 1.0, 1.0])
    # Alone, the request structure would have drafted its own 0.5 guess.
    fresh = SuffixSpeculator()
    fresh.start_request("r", prompt)
    assert fresh.propose(ctx("r", prompt), 3).token_ids[0] == 8


def test_accepts_tensors_and_is_robust_to_odd_calls():
    s = SuffixSpeculator()
    run_request(s, "a", torch.tensor([1, 2]), torch.tensor([3, 4, 5, 6]))
    assert s.propose(ctx("r", torch.tensor([3, 4])), 2).token_ids == [5, 6]
    s.observe("never-started", [1, 2], 0, 0)
    s.stop_request("never-started")
    s.start_request("dup", [1])
    s.start_request("dup", [2])  # restarts the request
    s.stop_request("dup")
    assert s.propose(ctx("r", [-5, 3, 4]), 2).token_ids == [5, 6]  # invalid ids are cut from the pattern
    with pytest.raises(ValueError):
        s.observe("a", [-1], 0, 0)
    with pytest.raises(ValueError):
        s.start_request("bad", [1, -2])


# -- learning on a real workload -------------------------------------------


def _spider_requests(n: int):
    data = json.loads(SPIDER.read_text())[:n]
    vocab: dict[str, int] = {}

    def ids(toks):
        return [vocab.setdefault(t, len(vocab)) for t in toks]

    return [(ids(d["question_toks"]), ids(d["query_toks"])) for d in data]


@pytest.mark.skipif(not SPIDER.exists(), reason="Spider prompts not present")
def test_acceptance_rises_as_the_workload_repeats():
    requests = _spider_requests(60)
    counters = simulate(SuffixSpeculator(), requests)
    first, second = counters[:30], counters[30:]
    assert mean_acceptance_length(second) > 1.1 * mean_acceptance_length(first)
    assert tokens_per_forward(second) > 1.1 * tokens_per_forward(first)
    # The gain is learned: the same second-half requests on a fresh speculator do worse.
    cold = simulate(SuffixSpeculator(), requests[30:])
    assert tokens_per_forward(second) > 1.05 * tokens_per_forward(cold)
    assert mean_acceptance_length(second) > mean_acceptance_length(cold)


# -- bounds ------------------------------------------------------------------


def test_eviction_keeps_memory_within_bounds():
    s = SuffixSpeculator(max_tokens_per_tenant=1500, max_nodes_per_tenant=2500, max_depth=16, max_match_len=8)
    rng = random.Random(1)
    phrases = [[rng.randrange(300) for _ in range(12)] for _ in range(20)]
    for r in range(250):
        out = []
        for _ in range(rng.randint(2, 8)):
            out += rng.choice(phrases) if rng.random() < 0.6 else [rng.randrange(300) for _ in range(6)]
        s.start_request(f"r{r}", [rng.randrange(300) for _ in range(rng.randint(1, 20))])
        for i in range(0, len(out), 3):
            s.propose(ctx(f"r{r}", out[:i]), 4)
            s.observe(f"r{r}", out[i : i + 3], 0, 0)
        s.stop_request(f"r{r}")
        m = s.memory_stats()["tenants"][DEFAULT_TENANT]
        assert m["tokens"] <= 1500 and m["nodes"] <= 2500
    s.check_integrity()
    # The oldest traffic is gone, the newest is kept.
    m = s.memory_stats()["tenants"][DEFAULT_TENANT]
    assert m["sequences"] < 250
    kept = s.state_dict()["tenants"][DEFAULT_TENANT]["sequences"]
    assert sum(map(len, kept)) == m["tokens"]


def test_evicted_pattern_is_forgotten():
    s = SuffixSpeculator(max_tokens_per_tenant=100)
    run_request(s, "old", [1], [500, 501, 502, 503])
    assert s.propose(ctx("x", [500, 501]), 2).token_ids == [502, 503]
    for r in range(30):
        run_request(s, f"r{r}", [1], [r, r + 1, r + 2, r + 3])
    assert s.propose(ctx("x", [500, 501]), 2).token_ids == []
    assert s.memory_stats()["tenants"][DEFAULT_TENANT]["tokens"] <= 100


def test_tenant_count_is_bounded():
    s = SuffixSpeculator(max_tenants=3)
    for t in range(6):
        run_request(s, "r", [1], [t, 100, 101], tenant=f"t{t}")
    assert sorted(s.memory_stats()["tenants"]) == ["t3", "t4", "t5"]


@pytest.mark.parametrize("kind", ["repetitive", "random", "repeated-block"])
def test_hostile_prompts_stay_bounded(kind):
    rng = random.Random(2)
    if kind == "repetitive":
        prompt = [i % 5 for i in range(50_000)]
    elif kind == "random":
        prompt = [rng.randrange(1 << 20) for _ in range(50_000)]
    else:  # a long random period: every window repeats, the worst case for node count
        block = [rng.randrange(1 << 20) for _ in range(1024)]
        prompt = block * 49
    s = SuffixSpeculator(max_prompt_tokens=2048, max_request_nodes=20_000, max_nodes_per_tenant=30_000)
    s.start_request("h", prompt)
    context = list(prompt)
    for i in range(300):
        d = s.propose(ctx("h", context), 8).token_ids
        tok = d[0] if d and i % 2 else rng.randrange(1 << 20)
        s.observe("h", [tok], 0, len(d))
        context.append(tok)
    m = s.memory_stats()
    tenant = m["tenants"][DEFAULT_TENANT]
    assert tenant["tokens"] <= 2048 + 300
    assert tenant["nodes"] <= 30_000
    assert m["request_nodes"] <= 20_000 + s.max_depth
    if kind == "random":  # tail compression: about one record per token
        assert tenant["nodes"] <= 2 * tenant["tokens"]
    s.stop_request("h")


def test_long_outputs_stop_being_indexed():
    s = SuffixSpeculator(max_sequence_tokens=100)
    s.start_request("r", list(range(60)))
    s.observe("r", list(range(1000, 1100)), 0, 0)
    assert s.memory_stats()["tenants"][DEFAULT_TENANT]["tokens"] == 100


# -- tenants -----------------------------------------------------------------


def test_tenant_isolation():
    s = SuffixSpeculator()
    secret = [900, 901, 902, 903, 904, 905]
    for i in range(5):
        run_request(s, f"a{i}", [1, 2], secret, tenant="A")
    assert s.propose(ctx("x", [900, 901], tenant="A"), 4).token_ids == [902, 903, 904, 905]
    # Tenant B, same context: nothing from A, in a live request or not.
    assert s.propose(ctx("x", [900, 901], tenant="B"), 4).token_ids == []
    s.start_request("b", [900, 901], tenant="B")
    assert s.propose(ctx("b", [900, 901], tenant="B"), 4).token_ids == []
    s.stop_request("b")
    run_request(s, "b2", [3], [900, 901, 1, 2], tenant="B")
    assert s.propose(ctx("x", [900, 901], tenant="B"), 4).token_ids == [1, 2]
    assert s.propose(ctx("x", [900, 901], tenant="A"), 4).token_ids == [902, 903, 904, 905]


def test_tenant_mismatch_between_start_and_propose_uses_no_tenant_state():
    s = SuffixSpeculator()
    for name in ("A", "B"):
        run_request(s, f"{name}0", [1], [900, 901, 902, 903], tenant=name)
    s.start_request("r", [900, 901], tenant="A")
    assert s.propose(ctx("r", [900, 901], tenant="A"), 2).token_ids == [902, 903]
    assert s.propose(ctx("r", [900, 901], tenant="B"), 2).token_ids == []


def test_shared_layer_only_from_shareable_requests():
    s = SuffixSpeculator()
    run_request(s, "a", [1], [700, 701, 702, 703], tenant="A", shareable=True)
    run_request(s, "a2", [1], [800, 801, 802, 803], tenant="A", shareable=False)
    assert s.propose(ctx("x", [700, 701], tenant="B"), 2).token_ids == [702, 703]
    assert s.propose(ctx("x", [800, 801], tenant="B"), 2).token_ids == []
    off = SuffixSpeculator(enable_shared=False)
    run_request(off, "a", [1], [700, 701, 702, 703], tenant="A", shareable=True)
    assert off.propose(ctx("x", [700, 701], tenant="B"), 2).token_ids == []


_tokens = st.lists(st.integers(0, 5), min_size=0, max_size=12)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    requests=st.lists(st.tuples(st.sampled_from(["A", "B"]), _tokens, _tokens, st.booleans()), max_size=8),
    probes=st.lists(st.tuples(st.sampled_from(["A", "B"]), _tokens, st.integers(1, 6)), min_size=1, max_size=6),
)
def test_proposals_only_continue_what_the_tenant_observed(requests, probes):
    # Tenant A speaks tokens 0..5, tenant B the same ids shifted by 3 (overlap 3..5).
    s = SuffixSpeculator(max_depth=6, max_match_len=4)
    seen = {"A": set(), "B": set()}
    shared: set = set()

    def bigrams(seq):
        return set(zip(seq, seq[1:]))

    for i, (tenant, prompt, output, shareable) in enumerate(requests):
        shift = 0 if tenant == "A" else 3
        prompt = [t + shift for t in prompt]
        output = [t + shift for t in output]
        run_request(s, f"r{i}", prompt, output, tenant=tenant, shareable=shareable)
        seen[tenant] |= bigrams(prompt + output)
        if shareable:
            shared |= bigrams(prompt + output)
    for j, (tenant, context, k) in enumerate(probes):
        shift = 0 if tenant == "A" else 3
        context = [t + shift for t in context]
        s.start_request(f"p{j}", context, tenant=tenant)
        p = s.propose(ctx(f"p{j}", context, tenant=tenant), k)
        assert len(p.token_ids) <= k
        assert all(0.0 <= c <= 1.0 for c in p.confidence)
        allowed = seen[tenant] | shared | bigrams(context)
        full = context + p.token_ids
        for i in range(len(context), len(full)):
            assert i > 0 and (full[i - 1], full[i]) in allowed
        s.stop_request(f"p{j}")
        seen[tenant] |= bigrams(context)  # probes are traffic too
    s.check_integrity()


# -- the trie itself -----------------------------------------------------------


@settings(max_examples=80, deadline=None)
@given(
    depth=st.integers(2, 6),
    ops=st.lists(
        st.tuples(st.sampled_from(["add", "add_live", "append", "close", "remove"]), _tokens, st.integers(0, 50)),
        max_size=25,
    ),
)
def test_trie_counts_match_a_recount(depth, ops):
    trie = SuffixTrie(depth)
    stored, live = [], []
    for op, toks, pick in ops:
        if op in ("add", "add_live"):
            seq = trie.add([t % 3 for t in toks], live=op == "add_live")
            stored.append(seq)
            if op == "add_live":
                live.append(seq)
        elif op == "append" and live:
            trie.append(live[pick % len(live)], pick % 3)
        elif op == "close" and live:
            trie.close(live.pop(pick % len(live)))
        elif op == "remove" and stored:
            seq = stored.pop(pick % len(stored))
            trie.remove(seq)
            if seq in live:
                live.remove(seq)
        trie.check_integrity(stored)
        # For a live sequence, the O(depth) match equals the walk from the root.
        for seq in live:
            toks = seq.tokens.tolist()
            for n in range(1, depth):
                usable, fast = trie.live_match(seq, toks[-n:], n)
                slow = trie.longest_match(toks[-n:], n)
                assert usable
                assert (fast is None) == (slow is None)
                if fast is not None:
                    assert fast.length == slow.length
                    assert [trie.next_token(fast) for _ in range(depth)] == [
                        trie.next_token(slow) for _ in range(depth)
                    ]


# -- persistence ---------------------------------------------------------------


def _trained() -> SuffixSpeculator:
    s = SuffixSpeculator()
    rng = random.Random(3)
    for r in range(40):
        tenant = rng.choice(["A", "B"])
        out = [rng.randrange(30) for _ in range(rng.randint(5, 30))]
        run_request(s, f"r{r}", [rng.randrange(30) for _ in range(5)], out, tenant=tenant, shareable=r % 7 == 0)
    return s


def _probe_all(s):
    rng = random.Random(4)
    out = []
    for _ in range(200):
        tenant = rng.choice(["A", "B", "C"])
        context = [rng.randrange(30) for _ in range(rng.randint(1, 6))]
        p = s.propose(ctx("probe", context, tenant=tenant), 8)
        out.append((p.token_ids, p.confidence))
    return out


def test_state_dict_round_trip_gives_identical_proposals():
    s = _trained()
    state = json.loads(json.dumps(s.state_dict()))  # plain JSON types
    assert sorted(state["tenants"]) == ["A", "B"]
    s2 = SuffixSpeculator()
    s2.load_state_dict(state)
    s2.check_integrity()
    assert _probe_all(s2) == _probe_all(s)
    assert s2.state_dict() == s.state_dict()
    s2.load_state_dict({})
    assert s2.memory_stats()["tenants"] == {}


@pytest.mark.parametrize(
    "state",
    [
        [],
        {"format": "other", "version": 1, "tenants": {}},
        {"format": "adaspec.suffix", "version": 99, "tenants": {}},
        {"format": "adaspec.suffix", "version": 1},
        {"format": "adaspec.suffix", "version": 1, "tenants": []},
        {"format": "adaspec.suffix", "version": 1, "tenants": {"A": [[1, 2]]}},
        {"format": "adaspec.suffix", "version": 1, "tenants": {"A": {"sequences": [[1, -2]]}}},
        {"format": "adaspec.suffix", "version": 1, "tenants": {"A": {"sequences": [[1, "2"]]}}},
        {"format": "adaspec.suffix", "version": 1, "tenants": {"A": {"sequences": [[1, True]]}}},
        {"format": "adaspec.suffix", "version": 1, "tenants": {"A": {"sequences": [[1.5]]}}},
        {"format": "adaspec.suffix", "version": 1, "tenants": {"A": {"sequences": [7]}}},
        {"format": "adaspec.suffix", "version": 1, "tenants": {"": {"sequences": []}}},
        {"format": "adaspec.suffix", "version": 1, "tenants": {}, "shared": {"sequences": [[2**63]]}},
    ],
)
def test_malformed_state_raises_and_changes_nothing(state):
    s = _trained()
    before = s.state_dict()
    with pytest.raises(ValueError):
        s.load_state_dict(state)
    assert s.state_dict() == before


def test_live_requests_survive_a_load():
    s = _trained()
    s.start_request("live", [1, 2, 3], tenant="A")
    s.load_state_dict(_trained().state_dict())
    s.observe("live", [4, 5], 0, 0)
    s.propose(ctx("live", [1, 2, 3, 4, 5], tenant="A"), 4)
    s.stop_request("live")
    s.check_integrity()
