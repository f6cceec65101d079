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
