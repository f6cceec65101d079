"""Logits -> probabilities with temperature, top-k and top-p. Pure torch.

The same function processes target and draft logits, so the verification in
:mod:`adaspec.verify` compares distributions built by identical rules
(Leviathan et al. 2023 require the draft and target distributions to be
transformed the same way for rejection sampling to stay exact).
"""

from __future__ import annotations

import torch

# Order follows vLLM and transformers' logits processors: temperature, then
# min-p, then top-k, then top-p on the tempered distribution.


def process_logits(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0,
                   min_p: float = 0.0) -> torch.Tensor:
    """Turn raw logits into the sampling distribution.

    Args:
        logits: ``[N, V]`` float32 raw logits (one row per position).
        temperature: > 0.
        top_k: keep the ``top_k`` largest logits per row; 0 disables.
        top_p: keep the smallest set of most likely tokens whose mass reaches
            ``top_p`` (always at least one token); 1.0 disables.
        min_p: min-p sampling (Nguyen et al. 2024, "Turning Up the Heat"):
            drop tokens whose tempered probability is below ``min_p`` times the
            row's largest, before top-k and top-p (vLLM's order); 0 disables.

    Returns:
        ``[N, V]`` float32 probabilities; each row sums to 1 and is zero outside
        the kept set.

    Raises:
        ValueError: if ``temperature <= 0`` (greedy is handled by argmax) or
            ``top_p`` is outside (0, 1], or ``min_p`` outside [0, 1].
    """
    if temperature <= 0:
        raise ValueError(f"process_logits needs temperature > 0, got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if not 0.0 <= min_p <= 1.0:
        raise ValueError(f"min_p must be in [0, 1], got {min_p}")
    x = logits.float() / temperature  # [N, V]
    V = x.shape[-1]
    if min_p > 0.0:
        p0 = torch.softmax(x, dim=-1)
        x = x.masked_fill(p0 < min_p * p0.max(dim=-1, keepdim=True).values, float("-inf"))
    if 0 < top_k < V:
        kth = torch.topk(x, top_k, dim=-1).values[..., -1:]  # [N, 1]
        x = x.masked_fill(x < kth, float("-inf"))
    probs = torch.softmax(x, dim=-1)
    if top_p < 1.0:
        sorted_probs, sorted_idx = torch.sort(probs, dim=-1, descending=True)  # [N, V]
        cum = torch.cumsum(sorted_probs, dim=-1)
        # Drop a token when the mass strictly before it already reaches top_p;
        # the most likely token is always kept.
        drop_sorted = (cum - sorted_probs) >= top_p
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, sorted_idx, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def sample(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    """Draw one token id from ``probs`` (``[V]`` float32) with the request's generator."""
    return int(torch.multinomial(probs, 1, generator=generator).item())


# ---------------------------------------------------------------- seeded (coupled) sampling
_MASK64 = (1 << 64) - 1
_GOLDEN64 = 0x9E3779B97F4A7C15


def position_seed(seed: int, position: int) -> int:
    """A 63-bit generator seed that is a function of ``(seed, position)`` alone.

    splitmix64's finaliser (Steele et al. 2014) over the seed and the position
    mixed with the golden-ratio constant: neighbouring positions and seeds give
    unrelated streams. Any Python int seed is accepted (taken modulo 2**64).
    """
    x = (int(seed) & _MASK64) ^ (((int(position) + 1) * _GOLDEN64) & _MASK64)
    x = (x + _GOLDEN64) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    x ^= x >> 31
    return x >> 1


def position_exponentials(seed: int, position: int, vocab_size: int) -> torch.Tensor:
    """Exponential(1) noise ``[vocab_size]`` float32 for one output position of a seeded request.

    Counter-based: a fresh CPU generator keyed by :func:`position_seed`, so the
    noise at a position never depends on how many random numbers were drawn
    before it (by drafts, rejections, other requests). ``-log`` of this noise is
    Gumbel(0, 1), so :func:`race_argmax` is the Gumbel-max trick. ~0.25 ms for
    49152 tokens on one core.
    """
    g = torch.Generator().manual_seed(position_seed(seed, position))
    u = torch.rand(vocab_size, generator=g)  # [V] in [0, 1)
    # u == 0 gives inf: that token is simply never the argmax.
    return -torch.log(u)


def race_argmax(probs: torch.Tensor, exponentials: torch.Tensor) -> int:
    """The Gumbel-max draw ``argmax(probs / E) = argmax(log probs + Gumbel)`` (``[V]`` each).

    With E i.i.d. Exponential(1) the winner of this exponential race is an exact
    draw from ``probs`` (Gumbel-max with ``Gumbel = -log E``); a zero-probability
    token (outside top-k / top-p) is never chosen.
    """
    return int(torch.argmax(probs / exponentials))


def seeded_sample(probs: torch.Tensor, seed: int, position: int) -> int:
    """The token at output ``position`` of a seeded request, drawn from ``probs`` (``[V]``)."""
    return race_argmax(probs, position_exponentials(seed, position, probs.shape[-1]))
