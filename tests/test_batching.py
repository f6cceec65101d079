"""Continuous batching with speculation, and prefix reuse (issue 13).

Engine level: ``Engine.step_batch`` verifies every request's rows in one
batched forward; with scripted speculators that reach every accept / reject
case (all right, none right, j right then wrong, no draft, trees) each
request's greedy output equals plain decoding alone, while requests join,
prefill in bounded chunks, and leave. Server level: through uvicorn, greedy
output of a request alone equals its output beside 1..16 others; a seeded
sampled request reproduces beside unseeded ones; cancellation frees the KV;
prefix hits equal misses; tenants never share cached prefixes; the prefix
cache stays within its bound. The controller drafts less under load.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional, Sequence

import httpx
import pytest

from adaspec.controller import ConfidenceAwareController, Controller, Decision
from adaspec.engine import Engine
from adaspec.estimates import AcceptanceEstimator, CostModel, choose_lookahead
from adaspec.prefix_cache import PrefixCache
from adaspec.server import create_app
from adaspec.server.testing import BackgroundServer
from adaspec.speculators import NgramSpeculator
from adaspec.speculators.base import Speculator
from adaspec.speculators.suffix import SuffixSpeculator
from adaspec.types import DraftProposal, ProposeContext, SamplingParams, TokenTree, TreeClaim

MODEL = "tiny-test"


def prompts(n: int, base_len: int = 9, step: int = 23) -> list[list[int]]:
    """n distinct prompts of growing lengths (token ids of the tiny model's vocabulary)."""
    return [[(13 * i + 7 * j + 3) % 2000 + 10 for i in range(base_len + step * j)] for j in range(n)]


def plain(target, prompt: Sequence[int], max_tokens: int) -> list[int]:
    return Engine(target).generate(list(prompt), SamplingParams(max_tokens=max_tokens, ignore_eos=True)).token_ids


class ScriptedByPrompt(Speculator):
    """Proposes from each request's plain continuation: ``num_right[prompt]`` right tokens, then wrong ones.

    ``num_right`` None: all right; 0: all wrong; -1: no draft at all.
    """

    name = "scripted"

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self.plain: dict[tuple[int, ...], list[int]] = {}
        self.num_right: dict[tuple[int, ...], Optional[int]] = {}

    def add(self, prompt: Sequence[int], plain_out: Sequence[int], num_right: Optional[int]) -> None:
        self.plain[tuple(prompt)] = list(plain_out)
        self.num_right[tuple(prompt)] = num_right

    def propose(self, ctx: ProposeContext, k: int) -> DraftProposal:
        key = tuple(ctx.token_ids[:ctx.num_prompt_tokens])
        right = self.num_right[key]
        if right == -1:
            return DraftProposal(speculator=self.name)
        pos = len(ctx.token_ids) - ctx.num_prompt_tokens
        truth = self.plain[key][pos:pos + k]
        r = len(truth) if right is None else min(right, len(truth))
        wrong = [(t + 1 + i) % self.vocab_size for i, t in enumerate(truth[r:])]
        pad = [(7 + i) % self.vocab_size for i in range(k - len(truth))]
        return DraftProposal(token_ids=truth[:r] + wrong + pad, speculator=self.name)


class TreeByPrompt(Controller):
    """Proposes a token tree from each request's plain continuation: the truth with wrong siblings."""

    name = "scripted-tree"

    def __init__(self, spec: ScriptedByPrompt) -> None:
        self.spec = spec

    def propose(self, ctx, max_lookahead, speculators=None):
        key = tuple(ctx.token_ids[:ctx.num_prompt_tokens])
        pos = len(ctx.token_ids) - ctx.num_prompt_tokens
        truth = (self.spec.plain[key][pos:pos + 4] + [5, 6, 7, 8])[:4]
        tree = TokenTree()
        parent = -1
        for d, tok in enumerate(truth[:3]):
            tree.add(parent, (tok + 1) % self.spec.vocab_size, TreeClaim("a", None, 0.5))  # a wrong sibling first
            parent = tree.add(parent, tok if d < 2 else (tok + 2) % self.spec.vocab_size, TreeClaim("b", None, 0.5))
        return Decision("tree", tree.num_nodes, DraftProposal(speculator="tree", tree=tree))


def run_batched(engine: Engine, ps: Sequence[Sequence[int]], max_tokens: int, join_every: int = 0,
                max_prefill_tokens: int = 40) -> list[list[int]]:
    """Start requests (one more every ``join_every`` steps; 0: all at once) and step them all in batches."""
    waiting = [list(p) for p in ps]
    states = []
    steps = 0
    while waiting or any(not s.finished for s in states):
        if waiting and (join_every == 0 or steps % join_every == 0):
            for p in (waiting if join_every == 0 else waiting[:1]):
                states.append(engine.start(p, SamplingParams(max_tokens=max_tokens, ignore_eos=True), prefill=False))
            waiting = [] if join_every == 0 else waiting[1:]
        live = [s for s in states if not s.finished]
        before = {id(s): s.prefill_pos for s in live}
        engine.step_batch(live, max_prefill_tokens=max_prefill_tokens)
        # bounded prefill: at most max_prefill_tokens prompt tokens per batched step
        assert sum(max(0, s.prefill_pos - before[id(s)]) for s in live) <= max_prefill_tokens
        for s in live:
            if not s.finished and not s.prefilling:
                assert s.kv.length == len(s.token_ids) - 1  # the step invariant, in a batch
        steps += 1
    return [list(s.output_ids) for s in states]


@pytest.fixture(scope="module")
def cases(tiny_target):
    ps = prompts(6)
    return ps, [plain(tiny_target, p, 24) for p in ps]


@pytest.mark.parametrize("join_every", [0, 3])
def test_batched_greedy_equals_plain_every_accept_reject_case(tiny_target, cases, join_every):
    ps, plains = cases
    spec = ScriptedByPrompt(tiny_target.vocab_size)
    for p, out, right in zip(ps, plains, [None, 0, 2, -1, 1, None]):
        spec.add(p, out, right)
    engine = Engine(tiny_target, [spec], lookahead=5)
    free0 = tiny_target.decoder.pool.free_blocks
    assert run_batched(engine, ps, 24, join_every=join_every) == plains
    assert tiny_target.decoder.pool.free_blocks == free0  # every finished request gave its KV back


def test_batched_tree_steps_equal_plain(tiny_target, cases):
    ps, plains = cases
    spec = ScriptedByPrompt(tiny_target.vocab_size)
    for p, out in zip(ps, plains):
        spec.add(p, out, None)
    engine = Engine(tiny_target, controller=TreeByPrompt(spec))
    assert run_batched(engine, ps, 24) == plains


def test_batched_atlas_matches_alone(tiny_target, cases):
    """The confidence-aware controller picks each request's lookahead in the batch (0 allowed): output unchanged."""
    ps, plains = cases
    engine = Engine(tiny_target, controller=ConfidenceAwareController(adaptive=SuffixSpeculator(),
                                                                      cost_model=CostModel({1: 5.0, 9: 9.0})))
    assert run_batched(engine, ps + ps, 24, join_every=2) == plains + plains


def test_preempted_request_resumes_with_the_same_output(tiny_target, cases):
    ps, plains = cases
    engine = Engine(tiny_target, [NgramSpeculator()], lookahead=4)
    states = [engine.start(p, SamplingParams(max_tokens=24, ignore_eos=True), prefill=False) for p in ps[:3]]
    n = 0
    while not all(s.finished for s in states):
        engine.step_batch(states)
        n += 1
        if n in (4, 9):  # memory ran short: free two requests' KV mid-stream
            engine.preempt(states[0])
            engine.preempt(states[2])
            assert states[0].kv.length == 0 and states[0].prefilling
    assert [s.output_ids for s in states] == plains[:3]


def test_step_without_batch_finishes_a_deferred_prefill(tiny_target, cases):
    ps, plains = cases
    engine = Engine(tiny_target)
    s = engine.start(ps[2], SamplingParams(max_tokens=24, ignore_eos=True), prefill=False)
    assert s.prefilling and s.kv.length == 0
    while not s.finished:
        engine.step(s)
    assert s.output_ids == plains[2]


def test_step_batch_rejects_a_zero_prefill_budget(tiny_target):
    with pytest.raises(ValueError, match="max_prefill_tokens"):
        Engine(tiny_target).step_batch([], max_prefill_tokens=0)


# ---------------------------------------------------------------- the controller under a batch budget
def test_lookahead_shrinks_as_the_batch_grows():
    """Verify cost by rows fed: flat for one request, steep for a full batch -> far ahead alone, less under load."""
    costs = CostModel({1: 10.0, 2: 10.2, 3: 10.4, 5: 10.8, 9: 11.6, 17: 13.2},
                      batch_ms_table={17: 13.2, 32: 16.0, 64: 24.0, 128: 44.0})
    probs = [0.7] * 16
    alone, _ = choose_lookahead(probs, 0.0, costs.verify_ms, 16)
    ks = []
    for others in (0, 8, 32, 96):
        k, _ = choose_lookahead(probs, 0.0, lambda n: costs.verify_ms(others + n), 16, base_tokens=float(others))
        ks.append(k)
    assert ks[0] == alone >= 8
    assert ks == sorted(ks, reverse=True) and ks[-1] < ks[0] and ks[-1] <= 2
    # high acceptance still pays under load where low acceptance does not
    hi, _ = choose_lookahead([0.98] * 16, 0.0, lambda n: costs.verify_ms(96 + n), 16, base_tokens=96.0)
    lo, _ = choose_lookahead([0.3] * 16, 0.0, lambda n: costs.verify_ms(96 + n), 16, base_tokens=96.0)
    assert hi > lo == 0


def test_cost_model_batch_shape_extends_the_seed_line():
    costs = CostModel({1: 10.0, 9: 11.6, 17: 13.2}, batch_ms_table={17: 13.2, 64: 44.0})
    assert costs.verify_ms(5) == pytest.approx(10.0 + 0.2 * 4)  # below the seed table's end: the line
    assert costs.verify_ms(64) == pytest.approx(44.0)
    assert costs.verify_ms(111) == pytest.approx(44.0 + (44.0 - 13.2) / 47 * 47)  # last segment extrapolated
    costs.observe_verify(64, 88.0)  # the machine is twice as slow: the scale follows, whatever the rows
    assert costs.verify_ms(64) > 44.0
    with pytest.raises(ValueError):
        CostModel({1: 1.0}, batch_ms_table={4: 1.0})


def test_controller_sees_the_batch_and_drafts_less():
    class Always(Speculator):
        name = "suffix"

        def propose(self, ctx, k):
            return DraftProposal(token_ids=[1] * k, confidence=[0.9] * k, speculator=self.name)

    costs = CostModel({1: 10.0, 2: 10.2, 3: 10.4, 5: 10.8, 9: 11.6, 17: 13.2},
                      batch_ms_table={17: 13.2, 32: 16.0, 64: 24.0, 128: 44.0})
    ctl = ConfidenceAwareController(adaptive=Always(), cost_model=costs, explore_every=0)
    est = ctl.estimator("suffix", "default")
    for _ in range(50):
        est.observe(8, 6, [0.9] * 8)
    ctx = dict(request_id="r", token_ids=[1, 2, 3], num_prompt_tokens=3)
    alone = ctl.propose(ProposeContext(**ctx), 16)
    loaded = ctl.propose(ProposeContext(**ctx, batch_rows=100, batch_tokens=60.0), 16)
    assert alone.lookahead > loaded.lookahead
    assert alone.proposal.expected_tokens is not None and alone.proposal.expected_tokens > 1.0
    assert isinstance(est, AcceptanceEstimator)


# ---------------------------------------------------------------- prefix cache (unit)
def test_prefix_hit_output_equals_miss_and_tenants_are_separate(tiny_target, cases):
    ps, plains = cases
    long = ps[5]
    engine = Engine(tiny_target, [NgramSpeculator()], lookahead=4)
    cache = engine.prefix_cache = PrefixCache(tiny_target, max_tokens=2048)
    miss = engine.generate(long, SamplingParams(max_tokens=24, ignore_eos=True), tenant="a")
    assert cache.stats.hits == 0 and cache.num_entries == 1
    variant = long[:90] + [42, 43, 44]
    want = plain(tiny_target, variant, 24)
    hit = engine.generate(variant, SamplingParams(max_tokens=24, ignore_eos=True), tenant="a")
    assert cache.stats.hits == 1 and cache.stats.tokens_saved == 90
    assert hit.token_ids == want and miss.token_ids == plains[5]
    # tenant b sent nothing: it never gets a's prefix
    other = engine.generate(variant, SamplingParams(max_tokens=24, ignore_eos=True), tenant="b")
    assert cache.stats.hits == 1 and other.token_ids == want
    assert cache.longest_prefix("c", long) == 0 and cache.longest_prefix("a", long) == len(long)
    assert cache.longest_prefix("b", long) == 90  # its own variant only
    # opt-in shared cache: any tenant reuses
    shared = PrefixCache(tiny_target, max_tokens=2048, shared=True)
    engine.prefix_cache = shared
    engine.generate(long, SamplingParams(max_tokens=4, ignore_eos=True), tenant="a")
    assert engine.generate(variant, SamplingParams(max_tokens=24, ignore_eos=True), tenant="b").token_ids == want
    assert shared.stats.hits == 1
    for c in (cache, shared):
        c.evict_all()
        assert c.tokens_held == 0


def test_prefix_cache_radix_tree_longest_match_and_dedup(tiny_target):
    cache = PrefixCache(tiny_target, max_tokens=4096, min_tokens=4)
    kv = tiny_target.new_cache()
    seq = list(range(100, 180))
    tiny_target.forward(kv, seq, last_only=True)
    assert cache.insert("t", seq[:40], kv)
    assert not cache.insert("t", seq[:30], kv)  # covered by the entry of 40
    assert cache.insert("t", seq[:60], kv) and cache.num_entries == 1  # extends it: replaces
    branch_kv = tiny_target.new_cache()
    branch = seq[:20] + [7, 8, 9, 10, 11, 12]
    tiny_target.forward(branch_kv, branch, last_only=True)
    assert cache.insert("t", branch, branch_kv) and cache.num_entries == 2
    assert cache.longest_prefix("t", seq) == 60
    assert cache.longest_prefix("t", seq[:20] + [7, 8, 9, 99]) == 23
    assert cache.longest_prefix("t", [5] + seq) == 0
    dst = tiny_target.new_cache()
    assert cache.restore("t", seq[:50] + [3], dst) == 51 - 1  # max_tokens defaults to the whole id list
    # the copied KV equals the prefilled one: the next forward's logits are bitwise the same
    ref = tiny_target.new_cache()
    tiny_target.forward(ref, seq[:50], last_only=True)
    a = tiny_target.forward(dst, seq[50:55]).logits
    b = tiny_target.forward(ref, seq[50:55]).logits
    assert (a == b).all()
    for c in (kv, branch_kv, dst, ref):
        c.release()
    cache.evict_all()


def test_prefix_cache_memory_stays_within_its_bound(tiny_target):
    pool = tiny_target.decoder.pool
    free0 = pool.free_blocks
    bound = 4 * pool.block_size
    engine = Engine(tiny_target)
    cache = engine.prefix_cache = PrefixCache(tiny_target, max_tokens=bound)
    for j in range(40):  # a long stream of distinct prompts
        p = [(31 * i + 17 * j) % 1500 + 20 for i in range(30 + (j * 7) % 90)]
        engine.generate(p, SamplingParams(max_tokens=3, ignore_eos=True), tenant=f"t{j % 3}")
        assert cache.tokens_held <= bound
    assert cache.stats.evictions > 0
    assert pool.free_blocks == free0 - cache.tokens_held // pool.block_size  # nothing else is held
    cache.evict_all()
    assert pool.free_blocks == free0


# ---------------------------------------------------------------- through the server
def body(prompt: Sequence[int], max_tokens: int = 16, **kw: Any) -> dict[str, Any]:
    return {"model": MODEL, "prompt": list(prompt), "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, **kw}


def _complete(base_url: str, b: dict, key: Optional[str] = None) -> dict:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    r = httpx.post(base_url + "/v1/completions", json=b, timeout=120, headers=headers)
    assert r.status_code == 200, r.text
    return r.json()


def _stream_tokens(base_url: str, b: dict) -> str:
    text = []
    import json

    with httpx.stream("POST", base_url + "/v1/completions", json={**b, "stream": True}, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {"):
                text.append(json.loads(line[6:])["choices"][0]["text"])
    return "".join(text)


@pytest.fixture(scope="module")
def server(tiny_target):
    engine = Engine(tiny_target, [NgramSpeculator()], lookahead=4)
    app = create_app(engine, MODEL, max_active=20, max_queue=64, prefix_cache_tokens=0, prefill_chunk=64)
    with BackgroundServer(app) as s:
        s.engine = engine
        s.scheduler = app.state.adaspec.scheduler
        yield s


@pytest.mark.parametrize("others", [1, 4, 16])
def test_server_greedy_alone_equals_beside_others(server, others):
    ps = prompts(others + 1, base_len=7, step=11)
    alone = _complete(server.base_url, body(ps[0], 20))["choices"][0]["text"]
    with ThreadPoolExecutor(others + 1) as pool:
        futs = [pool.submit(_stream_tokens if j % 2 else _complete, server.base_url, body(p, 20 + j % 5))
                for j, p in enumerate(ps)]
        outs = [f.result() for f in futs]
    texts = [o if isinstance(o, str) else o["choices"][0]["text"] for o in outs]
    assert texts[0] == alone
    for j, p in enumerate(ps[1:], 1):  # each equals its own run alone
        assert texts[j] == _complete(server.base_url, body(p, 20 + j % 5))["choices"][0]["text"]
    metrics = httpx.get(server.base_url + "/metrics").text
    assert "adaspec_batch_size_bucket" in metrics and "adaspec_batch_rows_fed_sum" in metrics


def test_server_batches_concurrent_requests(server):
    ps = prompts(8, base_len=7, step=5)
    before = server.app.state.adaspec.metrics.batch_stats()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda p: _complete(server.base_url, body(p, 40)), ps))
    after = server.app.state.adaspec.metrics.batch_stats()
    n = after["forwards"] - before["forwards"]
    reqs = after["mean_batch_size"] * after["forwards"] - (before["mean_batch_size"] or 0) * before["forwards"]
    assert reqs / n > 2.0  # requests really shared forwards (8 clients, 40 tokens each)


def test_server_seeded_sample_reproduces_beside_unseeded(server):
    p = prompts(1, base_len=12)[0]
    seeded = body(p, 24, temperature=0.9, seed=1234)
    alone = _complete(server.base_url, seeded)["choices"][0]["text"]
    with ThreadPoolExecutor(6) as pool:
        futs = [pool.submit(_complete, server.base_url, body(q, 24, temperature=1.0)) for q in prompts(5, 9, 7)]
        mine = pool.submit(_complete, server.base_url, seeded)
        [f.result() for f in futs]
        assert mine.result()["choices"][0]["text"] == alone


def test_server_cancelled_request_frees_its_kv(server, tiny_target):
    pool = tiny_target.decoder.pool
    sched = server.scheduler
    deadline = time.monotonic() + 30
    while sched.active_count and time.monotonic() < deadline:
        time.sleep(0.01)
    free0 = pool.free_blocks
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", server.base_url + "/v1/completions", json=body(prompts(1, 150)[0], 400, stream=True)) as r:
            lines = r.iter_lines()
            assert next(line for line in lines if line.startswith("data:"))
            assert pool.free_blocks < free0  # it holds KV blocks now
    deadline = time.monotonic() + 30
    while (sched.active_count or pool.free_blocks != free0) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sched.active_count == 0 and pool.free_blocks == free0


def test_server_prefix_reuse_exact_and_per_tenant(tiny_target):
    engine = Engine(tiny_target, [NgramSpeculator()], lookahead=4)
    keys = {"ka": "tenant-a", "kb": "tenant-b"}
    app = create_app(engine, MODEL, api_keys=keys, prefix_cache_tokens=4096)
    system = prompts(1, base_len=120)[0]
    qs = [system + [50 + j, 60 + j, 70 + j] for j in range(4)]
    with BackgroundServer(app) as s:
        cache = engine.prefix_cache
        assert cache is not None and not cache.shared
        first = _complete(s.base_url, body(qs[0], 16), "ka")
        assert cache.stats.hits == 0
        texts = [_complete(s.base_url, body(q, 16), "ka")["choices"][0]["text"] for q in qs[1:]]
        assert cache.stats.hits == 3 and cache.stats.tokens_saved >= 3 * 120
        hits_a = cache.stats.hits
        b_texts = [_complete(s.base_url, body(q, 16), "kb")["choices"][0]["text"] for q in qs[1:]]
        assert cache.stats.hits == hits_a + 2  # b's first request misses (a's prefix is not b's); then b's own hits
        metrics = httpx.get(s.base_url + "/metrics").text
        assert "adaspec_prefix_cache_hits_total 5.0" in metrics and "adaspec_prefix_cache_tokens_saved_total" in metrics
    engine.prefix_cache = None
    want = [plain(tiny_target, q, 16) for q in qs]
    assert first["choices"][0]["text"] == engine.decode(want[0])
    assert texts == b_texts == [engine.decode(w) for w in want[1:]]


@pytest.mark.real_model
def test_real_model_greedy_alone_equals_batched(real_target):
    from adaspec.config import EngineConfig, build_engine

    engine = build_engine(EngineConfig(speculator="atlas", dtype="float32", calibrate=False), target=real_target)
    texts = ["The capital of France is", "def fibonacci(n):", "SELECT name FROM users WHERE",
             "Once upon a time, in a small village,"]
    ps = [engine.encode_prompt(t) for t in texts]
    alone = [plain(real_target, p, 24) for p in ps]
    assert run_batched(engine, ps, 24, join_every=1) == alone


def test_server_preempts_when_the_kv_pool_runs_short_and_never_fails(tiny_model_dir):
    """A pool too small for every request at once: the newest waits (preempted, its KV recomputed later)."""
    from adaspec.model.target import lean_target
    from adaspec.target import load_target

    small = lean_target(load_target(str(tiny_model_dir), max_model_len=512, runtime="transformers"),
                        pool_tokens=10 * 64)
    engine = Engine(small, [NgramSpeculator()], lookahead=3)
    ps = prompts(6, base_len=120, step=9)
    want = [engine.decode(plain(small, p, 90)) for p in ps]
    app = create_app(engine, MODEL, max_active=6, prefix_cache_tokens=0)
    with BackgroundServer(app) as s:
        with ThreadPoolExecutor(6) as pool:
            outs = list(pool.map(lambda p: _stream_tokens(s.base_url, body(p, 90)), ps))
        sched = app.state.adaspec.scheduler
        assert sched.preemptions > 0  # 6 x 4 blocks do not fit 10 blocks: requests waited
    assert outs == want
    assert small.decoder.pool.free_blocks == small.decoder.pool.num_blocks


def test_batched_sampling_keeps_the_distribution(small_vocab_target, monkeypatch):
    """Unseeded requests verified in batches of 8 (rejection sampling, sampled drafts): the target's distribution."""
    import itertools
    from collections import Counter

    import torch

    from adaspec.sampling import process_logits
    from conftest import SMALL_VOCAB as V
    from conftest import tv
    from scripted import SampledDraftSpeculator

    counter = itertools.count(1)
    monkeypatch.setattr("adaspec.engine.os.urandom", lambda n: next(counter).to_bytes(n, "little"))
    t = small_vocab_target
    prompt = [3, 7, 1, 9]
    kw = dict(temperature=0.7, top_p=0.5)
    draft_row = torch.softmax(torch.randn(V, generator=torch.Generator().manual_seed(0)), -1)
    engine = Engine(t, [SampledDraftSpeculator(draft_row, seed=2)], lookahead=4)
    runs, first, second = 1600, Counter(), Counter()
    for _ in range(runs // 8):  # the 16-token model's pool holds 8 blocks
        states = [engine.start(prompt, SamplingParams(max_tokens=2, ignore_eos=True, **kw), prefill=False)
                  for _ in range(8)]
        while not all(s.finished for s in states):
            engine.step_batch(states)
        for s in states:
            first[s.output_ids[0]] += 1
            second[tuple(s.output_ids[:2])] += 1
    exact = process_logits(t.forward(t.new_cache(), prompt).logits[-1:], 0.7, 0, 0.5)[0]
    assert set(first) <= set(torch.nonzero(exact).flatten().tolist())
    assert tv(first, Counter({i: float(exact[i]) * runs for i in range(V)})) < 0.05
    joint = Counter()
    for a in torch.nonzero(exact).flatten().tolist():
        nxt = process_logits(t.forward(t.new_cache(), prompt + [a]).logits[-1:], 0.7, 0, 0.5)[0]
        for b in range(V):
            joint[(a, b)] = float(exact[a] * nxt[b]) * runs
    assert tv(second, joint) < 0.1
    # seeded: coupled sampling, the same tokens in a batch as alone
    p = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=7, ignore_eos=True)
    alone = Engine(t).generate([5, 2, 8], p).token_ids
    states = [engine.start([5, 2, 8], p, prefill=False)] + [
        engine.start([5, 2, 8], SamplingParams(max_tokens=12, temperature=1.0, ignore_eos=True), prefill=False)
        for _ in range(5)]
    while not all(s.finished for s in states):
        engine.step_batch(states)
    assert states[0].output_ids == alone


def test_batching_metrics_and_lookahead_by_batch_size():
    from adaspec.server.metrics import ServerMetrics

    m = ServerMetrics()
    m.record_batch(4, 12)
    m.record_batch(16, 40)
    m.record_batch_lookahead(1, 8)
    m.record_batch_lookahead(16, 1)
    m.record_batch_lookahead(40, 0)
    text = m.render().decode()
    assert 'adaspec_lookahead_by_batch_size_sum{batch_size="1"} 8.0' in text
    assert 'adaspec_lookahead_by_batch_size_sum{batch_size="9-16"} 1.0' in text
    assert 'adaspec_lookahead_by_batch_size_count{batch_size="17+"} 1.0' in text
    assert "adaspec_batch_size_sum 20.0" in text and "adaspec_batch_rows_fed_sum 52.0" in text
    b = m.snapshot()["batching"]
    assert b["forwards"] == 2 and b["mean_batch_size"] == 10.0 and b["mean_rows_fed"] == 26.0
    assert b["prefix_cache"] is None and "adaspec_prefix_cache" not in text  # off: no series


def test_controller_does_not_draft_when_no_draft_can_pay_in_the_batch():
    class Counting(Speculator):
        name = "suffix"
        calls = 0

        def propose(self, ctx, k):
            Counting.calls += 1
            return DraftProposal(token_ids=[1] * k, confidence=[0.9] * k, speculator=self.name)

    # a full batch: every extra row costs what an average token does -> nothing can pay
    costs = CostModel({1: 6.5, 2: 13.0, 3: 19.5, 5: 32.5, 9: 58.5, 17: 110.5},
                      batch_ms_table={17: 110.5, 32: 208.0, 64: 416.0, 128: 832.0})
    ctl = ConfidenceAwareController(adaptive=Counting(), cost_model=costs, explore_every=0)
    ctx = dict(request_id="r", token_ids=[1, 2, 3], num_prompt_tokens=3)
    d = ctl.propose(ProposeContext(**ctx, batch_rows=15, batch_tokens=15.0), 16)
    assert d.lookahead == 0 and Counting.calls == 0  # no drafting time spent under load
    ctl.propose(ProposeContext(**ctx), 16)  # alone it always drafts (and decides from the draft)
    assert Counting.calls == 1


def test_batch_speculation_gate_keeps_the_faster_mode_per_batch_size():
    from adaspec.engine import BatchSpeculationGate

    gate = BatchSpeculationGate(alpha=0.5, warmup=2, explore_every=4)
    assert all(gate.choose(1) for _ in range(10))  # a lone request always speculates
    assert [gate.bucket(n) for n in (1, 2, 3, 4, 7, 8, 16, 64)] == [0, 1, 1, 2, 2, 3, 4, 4]
    # 16 requests: drafting measures slower (100 vs 150 tok/s), 4 requests: faster
    for batch, on_rate, off_rate in ((16, 100.0, 150.0), (4, 90.0, 60.0)):
        modes = []
        for _ in range(4):  # warm-up alternates until each mode has 2 steps
            on = gate.choose(batch)
            modes.append(on)
            gate.observe(batch, on, int(on_rate if on else off_rate), 1.0)
        assert sorted(modes) == [False, False, True, True]
        later = [gate.choose(batch) for _ in range(16)]
        best = on_rate > off_rate
        assert later.count(best) == 12 and later.count(not best) == 4  # one step in 4 explores the other
    st = gate.stats()
    assert st["16"]["off_tok_s"] == 150.0 and st["4"]["on_tok_s"] == 90.0
    with pytest.raises(ValueError, match="alpha must be"):
        BatchSpeculationGate(alpha=0)
