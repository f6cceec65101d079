"""Pure tests of verification and sampling (no model)."""

import pytest
import torch

from adaspec.sampling import process_logits
from adaspec.verify import verify_greedy, verify_stochastic


def logits_with_argmax(argmaxes, V=10):
    # [n+1, V] with a chosen argmax per row (vLLM test habit)
    x = torch.zeros(len(argmaxes), V)
    for i, a in enumerate(argmaxes):
        x[i, a] = 5.0
    return x


@pytest.mark.parametrize("j", range(0, 5))
def test_greedy_prefix_then_wrong(j):
    target = [1, 2, 3, 4, 5]  # argmax at positions 0..4
    draft = target[:j] + [9] * (4 - j)
    r = verify_greedy(logits_with_argmax(target), draft)
    assert r.num_accepted == j
    assert r.token_ids == target[: j + 1]  # accepted + recovered (or bonus when j == 4)
    assert r.num_draft_tokens == 4


def test_greedy_no_draft_is_plain_decode():
    r = verify_greedy(logits_with_argmax([7]), [])
    assert r.token_ids == [7] and r.num_accepted == 0


def test_greedy_shape_mismatch():
    with pytest.raises(ValueError, match="rows"):
        verify_greedy(logits_with_argmax([1, 2]), [1, 2])


def test_stochastic_point_mass_accepts_certain_token():
    probs = torch.zeros(3, 5)
    probs[0, 2] = 1.0
    probs[1, 3] = 1.0
    probs[2, 4] = 1.0
    r = verify_stochastic(probs, [2, 3], None, torch.Generator().manual_seed(0))
    assert r.token_ids == [2, 3, 4] and r.num_accepted == 2


def test_stochastic_rejects_impossible_token_and_recovers_elsewhere():
    probs = torch.zeros(2, 5)
    probs[0, 1] = 0.5
    probs[0, 2] = 0.5
    probs[1, 0] = 1.0
    for seed in range(20):
        r = verify_stochastic(probs, [4], None, torch.Generator().manual_seed(seed))
        assert r.num_accepted == 0 and r.token_ids[0] in (1, 2)


def test_stochastic_zero_draft_prob_is_an_error():
    probs = torch.full((2, 4), 0.25)
    q = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    with pytest.raises(ValueError, match="zero draft probability"):
        verify_stochastic(probs, [3], q, torch.Generator())


@pytest.mark.parametrize("with_draft_probs", [False, True])
def test_rejection_sampling_preserves_distribution(with_draft_probs):
    """First emitted token ~ target_probs[0] whatever the draft (Leviathan Thm 1)."""
    g = torch.Generator().manual_seed(1)
    V, N = 6, 20000
    target = torch.softmax(torch.randn(2, V, generator=g), -1)
    draft_row = torch.softmax(torch.randn(V, generator=g), -1)
    counts = torch.zeros(V)
    for _ in range(N):
        if with_draft_probs:
            x = int(torch.multinomial(draft_row, 1, generator=g))
            r = verify_stochastic(target, [x], draft_row.unsqueeze(0), g)
        else:
            r = verify_stochastic(target, [3], None, g)
        counts[r.token_ids[0]] += 1
    tv = 0.5 * (counts / N - target[0]).abs().sum()
    assert tv < 0.02, f"total variation {tv:.4f}"


def test_process_logits_top_k_top_p():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    p = process_logits(logits, 1.0, top_k=2)
    assert (p[0, 2:] == 0).all() and torch.isclose(p.sum(), torch.tensor(1.0))
    p = process_logits(logits, 1.0, top_p=0.5)
    # softmax mass of token 0 is ~0.64 >= 0.5: only it survives
    assert p[0, 0] == 1.0
    p = process_logits(logits, 1.0, top_p=0.9)
    kept = (p[0] > 0).sum().item()
    assert kept == 3  # 0.64 + 0.24 = 0.88 < 0.9 -> third token needed
    with pytest.raises(ValueError):
        process_logits(logits, 0.0)
    with pytest.raises(ValueError):
        process_logits(logits, 1.0, top_p=0.0)


def test_process_logits_keeps_argmax_under_tiny_top_p():
    logits = torch.randn(4, 50)
    p = process_logits(logits, 0.7, top_p=1e-6)
    assert torch.equal(p.argmax(-1), logits.argmax(-1))
    assert ((p > 0).sum(-1) == 1).all()


# ---------------------------------------------------------------- coupled (seeded) verification
from adaspec.sampling import position_seed, seeded_sample  # noqa: E402
from adaspec.verify import verify_coupled  # noqa: E402


def _coupled_reference(target_probs, seed, start):
    """Plain seeded sampling: the draw at each position, one row at a time."""
    return [seeded_sample(target_probs[i], seed, start + i) for i in range(target_probs.shape[0])]


@pytest.mark.parametrize("j", range(0, 5))
def test_coupled_accepts_exactly_the_draws_prefix(j):
    """Draft i is accepted iff it equals the draw at its position; then the draw is emitted."""
    g = torch.Generator().manual_seed(3)
    target = torch.softmax(torch.randn(5, 12, generator=g), -1)  # [n+1, V], n = 4
    draws = _coupled_reference(target, seed=7, start=10)
    drafts = draws[:j] + [(t + 1) % 12 for t in draws[j:4]]
    r = verify_coupled(target, drafts, seed=7, start_position=10)
    assert r.num_accepted == min(j, 4) and r.num_draft_tokens == 4
    assert r.token_ids == draws[: min(j, 4) + 1]  # recovered (or bonus) token = the draw


def test_coupled_output_independent_of_drafts():
    """Whatever the drafts, the emitted tokens are the plain seeded draws at those positions."""
    g = torch.Generator().manual_seed(4)
    target = torch.softmax(torch.randn(4, 8, generator=g) * 0.3, -1)  # flat: rejections are common
    draws = _coupled_reference(target, seed=11, start=0)
    for _ in range(50):
        drafts = torch.randint(0, 8, (3,), generator=g).tolist()
        r = verify_coupled(target, drafts, seed=11, start_position=0)
        assert r.token_ids == draws[: len(r.token_ids)]


def test_coupled_shape_and_position_errors():
    probs = torch.full((2, 4), 0.25)
    with pytest.raises(ValueError, match="rows"):
        verify_coupled(probs, [1, 2], seed=0, start_position=0)
    with pytest.raises(ValueError, match="start_position"):
        verify_coupled(probs, [1], seed=0, start_position=-1)


def test_position_seed_separates_seeds_and_positions():
    seen = {position_seed(s, p) for s in range(50) for p in range(50)}
    assert len(seen) == 2500 and all(0 <= x < 1 << 63 for x in seen)
    assert position_seed(-1, 0) == position_seed((1 << 64) - 1, 0)  # any int seed, modulo 2**64


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (3, 1.0), (0, 0.5)])
def test_coupled_draws_follow_target_distribution(top_k, top_p):
    """Over many seeds, the token at a position ~ target_probs (Gumbel-max), and never outside top-k / top-p."""
    g = torch.Generator().manual_seed(5)
    V, N = 8, 12000
    target = process_logits(torch.randn(2, V, generator=g), 0.8, top_k, top_p)  # [2, V]
    support = set(torch.nonzero(target[0]).flatten().tolist())
    counts = torch.zeros(V)
    for seed in range(N):
        r = verify_coupled(target, [2], seed=seed, start_position=3)
        counts[r.token_ids[0]] += 1
    assert set(torch.nonzero(counts).flatten().tolist()) <= support
    tv = 0.5 * (counts / N - target[0]).abs().sum()
    assert tv < 0.02, f"total variation {tv:.4f}"
    # A deterministic draft is accepted with probability target_probs[x], as in rejection sampling.
    accepted = counts[2] / N
    assert abs(float(accepted) - float(target[0, 2])) < 0.02
