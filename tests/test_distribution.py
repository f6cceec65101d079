"""F9: speculative sampling keeps the target's distribution (engine level).

A tiny random model with a 16-token vocabulary; ~2000 seeded runs of 2 tokens
each, plain sampling vs speculative sampling with (a) a deterministic drafter
and (b) a drafter that samples from its own distribution and reports
draft_probs. First- and second-token histograms must match plain sampling, and
no token outside the top-p / top-k set may ever appear.
"""

from collections import Counter

import pytest
import torch

from adaspec.engine import Engine
from adaspec.sampling import process_logits
from adaspec.types import SamplingParams
from conftest import SMALL_VOCAB as V
from conftest import tv
from scripted import RandomSpeculator, SampledDraftSpeculator

RUNS = 2000


def histograms(engine, prompt, params_kw):
    first, second = Counter(), Counter()
    for seed in range(RUNS):
        r = engine.generate(prompt, SamplingParams(max_tokens=2, seed=seed, ignore_eos=True, **params_kw))
        first[r.token_ids[0]] += 1
        second[(r.token_ids[0], r.token_ids[1])] += 1
    return first, second


@pytest.mark.parametrize("params_kw,drafter", [(dict(temperature=0.7, top_p=0.5), "sampled"),
                                               (dict(temperature=1.0, top_k=3), "random")],
                         ids=["top_p-draft_probs", "top_k-point_mass"])
def test_sampling_distribution_preserved(small_vocab_target, params_kw, drafter):
    t = small_vocab_target
    prompt = [3, 7, 1, 9]
    # The exact first-token distribution and its support.
    kv = t.new_cache()
    logits = t.forward(kv, prompt).logits[-1:]
    exact = process_logits(logits, params_kw["temperature"], params_kw.get("top_k", 0), params_kw.get("top_p", 1.0))[0]
    support = set(torch.nonzero(exact).flatten().tolist())
    assert len(support) >= 2, "test needs a distribution with more than one token"

    plain_first, plain_second = histograms(Engine(t), prompt, params_kw)
    draft_row = torch.softmax(torch.randn(V, generator=torch.Generator().manual_seed(0)), -1)
    spec = SampledDraftSpeculator(draft_row, seed=2) if drafter == "sampled" else RandomSpeculator(V, seed=1)
    first, second = histograms(Engine(t, [spec], lookahead=4), prompt, params_kw)
    assert set(first) <= support, f"{spec.name}: token outside the top-p/top-k set"
    exact_counts = Counter({i: float(exact[i]) * RUNS for i in range(V)})
    assert tv(first, exact_counts) < 0.05, spec.name
    assert tv(first, plain_first) < 0.06, spec.name
    assert tv(second, plain_second) < 0.1, spec.name


def test_seeded_requests_reproduce(small_vocab_target):
    eng = Engine(small_vocab_target, [RandomSpeculator(V, seed=1)], lookahead=3)
    p = SamplingParams(max_tokens=8, temperature=0.9, seed=42, ignore_eos=True)
    a = eng.generate([3, 7, 1], p).token_ids
    b = Engine(small_vocab_target, [RandomSpeculator(V, seed=1)], lookahead=3).generate([3, 7, 1], p).token_ids
    assert a == b
    c = Engine(small_vocab_target).generate([3, 7, 1], p).token_ids
    d = Engine(small_vocab_target).generate([3, 7, 1], p).token_ids
    assert c == d
