"""Logits -> probabilities with temperature, top-k and top-p. Pure torch.

The same function processes target and draft logits, so the verification in
:mod:`adaspec.verify` compares distributions built by identical rules
(Leviathan et al. 2023 require the draft and target distributions to be
transformed the same way for rejection sampling to stay exact).
"""

from __future__ import annotations

import torch

# Order follows vLLM and transformers' logits processors: temperature, then
# top-k, then top-p on the tempered distribution.


def process_logits(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Turn raw logits into the sampling distribution.

    Args:
        logits: ``[N, V]`` float32 raw logits (one row per position).
        temperature: > 0.
        top_k: keep the ``top_k`` largest logits per row; 0 disables.
        top_p: keep the smallest set of most likely tokens whose mass reaches
            ``top_p`` (always at least one token); 1.0 disables.

    Returns:
        ``[N, V]`` float32 probabilities; each row sums to 1 and is zero outside
        the kept set.

    Raises:
        ValueError: if ``temperature <= 0`` (greedy is handled by argmax) or
            ``top_p`` is outside (0, 1].
    """
    if temperature <= 0:
        raise ValueError(f"process_logits needs temperature > 0, got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    x = logits.float() / temperature  # [N, V]
    V = x.shape[-1]
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
