"""The draft head's drafting runtime: the optimized chain is the reference math's chain, one runtime per head.

A random head (every weight non-zero, unlike a fresh head whose ``down`` and
match embeddings start at zero) on the tiny target; the reference is the
plain module forward (float32) or Int8Linear's documented int8 math written
out in torch (int8), chained with the same context successors.
"""

import random
from collections import Counter

import pytest
import torch

from adaspec.sampling import process_logits
from adaspec.speculators.base import draw, processed_row
from adaspec.speculators.draft_head import (
    ContextIndex,
    DraftHeadSpeculator,
    new_draft_head,
    target_embedding_weight,
)
from adaspec.types import ProposeContext


def random_head(target, seed):
    net = new_draft_head(target, list(range(0, 600, 2)), intermediate_size=96, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
    return net.eval()


def int8_reference(weight):
    """Int8Linear's math (per-channel weights, per-row activation scale, round(x / s)) in plain torch."""
    from adaspec.quant import Int8Linear

    lin = Int8Linear(weight)
    w_int, w_scale, q_max = lin._w_int8.double(), lin.w_scale, lin.q_max

    def f(x):
        s = x.abs().amax(dim=-1, keepdim=True).clamp_min(1e-30) / q_max
        acc = (torch.round(x / s).double() @ w_int.t()).float()  # exact integers
        return (acc * w_scale) * s

    return f


def reference_chain(net, embed, prompt, hidden, k, int8):
    """The greedy chain of ``net`` by its modules (``int8``: with :func:`int8_reference` linears)."""
    if int8:
        fc_in, lm_head = int8_reference(net.fc_in.weight), int8_reference(net.lm_head)
        blocks = [(b, int8_reference(b.gate.weight), int8_reference(b.up.weight), int8_reference(b.down.weight))
                  for b in net.blocks]
    else:
        fc_in, lm_head = net.fc_in, net.logits
        blocks = [(b, b.gate, b.up, b.down) for b in net.blocks]
    cfg = net.config
    index = ContextIndex(cfg.context_ngram)
    for p in range(len(prompt) - 1):
        index.add(prompt, p)
    overlay, seq, feature, ids = ContextIndex(cfg.context_ngram), list(prompt), hidden.reshape(1, -1), []
    for _ in range(k):
        t = len(seq) - 1
        succ, n = index.successor(seq, t, overlay)
        succ_emb = embed[succ].unsqueeze(0) if n else torch.zeros(1, cfg.hidden_size)
        x = torch.cat([net.feature_norm(feature), net.token_norm(embed[seq[t]].unsqueeze(0)),
                       net.successor_norm(succ_emb)], dim=-1)
        x = fc_in(x) + net.match_embed(torch.tensor([n]))
        for b, gate, up, down in blocks:
            h = b.norm(x)
            x = x + down(torch.nn.functional.silu(gate(h)) * up(h))
        feature = net.out_norm(x)
        token = int(net.draft_to_target[int(torch.argmax(lm_head(feature)[0]))])
        ids.append(token)
        overlay.add(seq, t)
        seq.append(token)
    return ids


def contexts(target, n, length=40, seed=0):
    """``n`` (prompt, hidden state) pairs: random prompts with repeats (so successors match)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        base = torch.randint(0, 600, (length // 2,), generator=g).tolist()
        prompt = base + base[: length // 4] + torch.randint(0, 600, (length // 4,), generator=g).tolist()
        hidden = target.forward(target.new_cache(), prompt[:-1]).hidden[-1]
        out.append((prompt, hidden))
    return out


@pytest.mark.parametrize("int8", [True, False], ids=["int8", "fp32"])
def test_greedy_chain_is_the_reference_chain(tiny_target, int8):
    net = random_head(tiny_target, seed=3)
    embed = target_embedding_weight(tiny_target)
    spec = DraftHeadSpeculator(net, embed, int8=int8)
    assert spec.int8 == int8
    if int8 and spec.runtime.kernel != "lean":
        pytest.skip("the lean kernel is not built here (fbgemm rounds after adding its zero point)")
    for i, (prompt, hidden) in enumerate(contexts(tiny_target, 12)):
        spec.start_request(f"r{i}", prompt)
        got = spec.propose(ProposeContext(f"r{i}", prompt, len(prompt), hidden_state=hidden), 8)
        assert got.token_ids == reference_chain(net, embed, prompt, hidden, 8, int8)
        assert len(got.confidence) == 8 and all(0.0 < c <= 1.0 for c in got.confidence)


def test_tree_uses_the_runtime_and_matches_the_chain(tiny_target):
    """The tree's first path at width 1 is the greedy chain (batched forward == step forward)."""
    net = random_head(tiny_target, seed=4)
    spec = DraftHeadSpeculator(net, target_embedding_weight(tiny_target))
    for i, (prompt, hidden) in enumerate(contexts(tiny_target, 6, seed=1)):
        ctx = ProposeContext(f"r{i}", prompt, len(prompt), hidden_state=hidden)
        chain = spec.propose(ctx, 6)
        tree = spec.propose_tree(ctx, 6, width=1)
        assert tree.tokens == chain.token_ids
        assert [c[0].confidence for c in tree.claims] == pytest.approx(chain.confidence, rel=1e-5)


def test_runtime_is_a_frozen_copy_and_runtime_for_picks_it(tiny_target):
    embed = target_embedding_weight(tiny_target)
    a, b = random_head(tiny_target, seed=5), random_head(tiny_target, seed=6)
    spec_a, spec_b = DraftHeadSpeculator(a, embed), DraftHeadSpeculator(b, embed)
    prompt, hidden = contexts(tiny_target, 1, seed=2)[0]
    ctx = ProposeContext("r", prompt, len(prompt), hidden_state=hidden)
    before = spec_a.propose(ctx, 8).token_ids
    assert spec_a.net is spec_a.runtime.net and spec_a.net is not a
    assert not any(p.requires_grad for p in spec_a.net.parameters())
    assert all(p.requires_grad for p in a.parameters())  # the caller's head stays trainable
    with torch.no_grad():
        for p in a.parameters():
            p.mul_(-1.0)
    assert spec_a.propose(ctx, 8).token_ids == before  # later edits never reach the runtime

    class Swapped(DraftHeadSpeculator):
        """Drafts request "r" with another head's runtime (what a hot swap does per request)."""

        def _runtime_for(self, ctx):
            return self.other if ctx.request_id == "r" else self.runtime

    swapped = Swapped(a, embed)
    swapped.other = swapped._prepare(b)
    assert swapped.propose(ctx, 8).token_ids == spec_b.propose(ctx, 8).token_ids
    other = ProposeContext("q", prompt, len(prompt), hidden_state=hidden)
    assert swapped.propose(other, 8).token_ids == DraftHeadSpeculator(a, embed).propose(other, 8).token_ids


@pytest.mark.parametrize("params", [dict(temperature=0.9, top_p=0.9), dict(temperature=0.7, top_k=20, top_p=0.8),
                                    dict(temperature=1.2), dict(temperature=0.8, top_p=0.95, seed=11)],
                         ids=["top_p", "top_k_top_p", "temperature", "seeded"])
def test_sampled_draft_probs_are_the_drawn_distribution(tiny_target, params):
    net = random_head(tiny_target, seed=7)
    spec = DraftHeadSpeculator(net, target_embedding_weight(tiny_target))
    outside = torch.ones(tiny_target.vocab_size, dtype=torch.bool)
    outside[net.draft_to_target] = False
    for i, (prompt, hidden) in enumerate(contexts(tiny_target, 4, seed=3)):
        spec.start_request(f"s{i}", prompt)
        d = spec.propose(ProposeContext(f"s{i}", prompt, len(prompt), hidden_state=hidden, **params), 6)
        assert d.draft_probs.shape == (6, tiny_target.vocab_size)
        assert torch.allclose(d.draft_probs.sum(-1), torch.ones(6), atol=1e-5)
        assert float(d.draft_probs[:, outside].sum()) == 0.0
        for row, (tok, c) in enumerate(zip(d.token_ids, d.confidence)):
            assert d.draft_probs[row, tok] > 0
            assert c == pytest.approx(float(d.draft_probs[row, tok]))


def test_processed_row_is_process_logits():
    g = torch.Generator().manual_seed(0)
    rng = random.Random(0)
    for _ in range(600):
        V = rng.choice((8192, 300, 17, 64))
        logits = torch.randn(V, generator=g) * rng.choice((0.3, 2.0, 8.0))
        t, k = rng.choice((0.5, 0.8, 1.0, 1.4)), rng.choice((0, 0, 7, 40))
        p = rng.choice((0.5, 0.8, 0.9, 0.95, 0.99, 1.0))
        want = process_logits(logits.unsqueeze(0), t, k, p)[0]
        assert torch.equal(processed_row(logits, t, k, p), want), (V, t, k, p)
    with pytest.raises(ValueError):
        processed_row(torch.zeros(4), 1.0, 0, 0.0)


def test_draw_follows_the_distribution_and_skips_zeros():
    probs = torch.tensor([0.1, 0.0, 0.45, 0.3, 0.0, 0.15])
    g = torch.Generator().manual_seed(1)
    n = 40000
    counts = Counter(draw(probs, g) for _ in range(n))
    assert set(counts) == {0, 2, 3, 5}
    for j, c in counts.items():
        assert abs(c / n - float(probs[j])) < 0.01, (j, c / n)
    assert draw(torch.tensor([0.0, 0.0, 1.0, 0.0]), g) == 2


def test_seeded_noise_cache_changes_no_draft(tiny_target):
    """A position drafted again reuses its cached noise: the same drafts as a speculator drafting it first."""
    net = random_head(tiny_target, seed=8)
    embed = target_embedding_weight(tiny_target)
    prompt, hidden = contexts(tiny_target, 1, seed=4)[0]
    kw = dict(temperature=0.9, top_p=0.9, seed=21)
    cached = DraftHeadSpeculator(net, embed)
    first = cached.propose(ProposeContext("r", prompt, len(prompt), hidden_state=hidden, **kw), 6)
    longer = prompt + first.token_ids[:2]  # two drafts accepted: positions 2.. are drafted again
    h2 = tiny_target.forward(tiny_target.new_cache(), longer[:-1]).hidden[-1]
    ctx2 = ProposeContext("r", longer, len(prompt), hidden_state=h2, **kw)
    assert set(cached._requests["r"].noise) == set(range(6))
    again = cached.propose(ctx2, 6)
    assert min(cached._requests["r"].noise) == 2  # positions before the next output position dropped
    fresh = DraftHeadSpeculator(net, embed).propose(ctx2, 6)
    assert again.token_ids == fresh.token_ids
    assert torch.equal(again.draft_probs, fresh.draft_probs)
