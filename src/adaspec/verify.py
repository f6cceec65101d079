"""Verification: accept or reject a block of draft tokens against the target model.

Pure torch; no model imports. Three rules:

- **greedy** (temperature 0): a draft token is accepted while it equals the
  target's argmax at its position; the first mismatch is replaced by the
  target's argmax (the recovered token); if all match, the target's argmax after
  the last draft is the bonus token. Output equals plain greedy decoding.
- **stochastic**: speculative rejection sampling (Leviathan et al. 2023, Alg. 1;
  Chen et al. 2023). Draft token x_i ~ draft_probs_i is accepted with probability
  ``min(1, target_probs_i[x_i] / draft_probs_i[x_i])``; at the first rejection the
  recovered token is sampled from ``norm(max(target_probs_i - draft_probs_i, 0))``;
  if all are accepted the bonus token is sampled from ``target_probs_n``. Each
  emitted token is then distributed exactly as the target's. A speculator without
  draft probabilities (prompt lookup, suffix) is a point mass on its draft token,
  so acceptance is ``target_probs_i[x_i]`` and the residual is the target
  distribution with x_i removed.
- **coupled** (seeded requests): drafter-invariant speculative sampling
  (Daliri et al. 2024, "Coupling without communication and drafter-invariant
  speculative decoding"). The token at each absolute output position is the
  Gumbel-max draw ``argmax(target_probs / E)`` with exponential noise E keyed
  by (seed, position) alone (:func:`adaspec.sampling.position_exponentials`);
  a draft token is accepted iff it equals that draw. The output is therefore a
  function of the seed and the target's distributions only, identical under
  every speculator and lookahead, and still an exact sample of the target.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from adaspec.sampling import position_exponentials, race_argmax
from adaspec.types import VerifyResult


def verify_greedy(target_logits: torch.Tensor, draft_token_ids: Sequence[int]) -> VerifyResult:
    """Greedy verification.

    Args:
        target_logits: ``[n + 1, V]`` target logits; row i predicts the token
            after the i-th fed token (row 0 follows the last committed token).
        draft_token_ids: the n draft tokens.

    Returns:
        VerifyResult with the accepted drafts then the recovered or bonus token.
    """
    n = len(draft_token_ids)
    if target_logits.shape[0] != n + 1:
        raise ValueError(f"target_logits has {target_logits.shape[0]} rows, expected {n + 1}")
    target_ids = torch.argmax(target_logits, dim=-1).tolist()  # [n + 1]
    num_accepted = 0
    while num_accepted < n and draft_token_ids[num_accepted] == target_ids[num_accepted]:
        num_accepted += 1
    tokens = list(draft_token_ids[:num_accepted]) + [target_ids[num_accepted]]
    return VerifyResult(token_ids=tokens, num_accepted=num_accepted, num_draft_tokens=n)


def verify_stochastic(
    target_probs: torch.Tensor,
    draft_token_ids: Sequence[int],
    draft_probs: Optional[torch.Tensor],
    generator: Optional[torch.Generator],
    cut_probs: Optional[torch.Tensor] = None,
) -> VerifyResult:
    """Speculative rejection sampling (Leviathan et al. 2023, Alg. 1).

    Args:
        target_probs: ``[n + 1, V]`` float32 processed target distributions.
        draft_token_ids: the n draft tokens.
        draft_probs: ``[n, V]`` float32 distributions the drafts were sampled
            from, processed with the same sampling parameters; ``None`` for a
            deterministic draft (point mass on each draft token).
        generator: the request's random generator.
        cut_probs: ``[V]`` float32, the draft distribution of draft token n,
            which was cut before verification because the target gives it
            probability 0 (a grammar forbids it). Verifying it would reject it
            for sure and draw the recovered token from
            ``norm(max(target_probs_n - cut_probs, 0))``, so with every draft
            accepted that residual replaces the bonus distribution: the output
            stays exact. ``None``: no such token.

    Returns:
        VerifyResult with the accepted drafts then the recovered or bonus token.

    Raises:
        ValueError: on shape mismatch, or a draft token that its own
            draft_probs give zero probability (it could not have been sampled).
    """
    n = len(draft_token_ids)
    if target_probs.shape[0] != n + 1:
        raise ValueError(f"target_probs has {target_probs.shape[0]} rows, expected {n + 1}")
    if draft_probs is not None and draft_probs.shape[0] != n:
        raise ValueError(f"draft_probs has {draft_probs.shape[0]} rows, expected {n}")
    tokens: list[int] = []
    for i, x in enumerate(draft_token_ids):
        p_x = float(target_probs[i, x])
        q_x = 1.0 if draft_probs is None else float(draft_probs[i, x])
        if q_x <= 0.0:
            raise ValueError(f"draft token {x} at position {i} has zero draft probability")
        r = float(torch.rand((), generator=generator))
        if r * q_x < p_x:  # r < p/q without dividing
            tokens.append(int(x))
            continue
        if draft_probs is None:
            residual = target_probs[i].clone()
            residual[x] = 0.0
        else:
            residual = torch.clamp(target_probs[i] - draft_probs[i], min=0.0)
        total = float(residual.sum())
        # total == 0 only if target == draft up to rounding, where rejection has
        # probability ~0; fall back to the target distribution.
        dist = residual / total if total > 0.0 else target_probs[i]
        tokens.append(int(torch.multinomial(dist, 1, generator=generator).item()))
        return VerifyResult(token_ids=tokens, num_accepted=i, num_draft_tokens=n)
    last = target_probs[n]
    if cut_probs is not None:
        residual = torch.clamp(last - cut_probs.to(last.dtype), min=0.0)
        total = float(residual.sum())
        last = residual / total if total > 0.0 else last
    bonus = int(torch.multinomial(last, 1, generator=generator).item())
    tokens.append(bonus)
    return VerifyResult(token_ids=tokens, num_accepted=n, num_draft_tokens=n)


def verify_coupled(
    target_probs: torch.Tensor,
    draft_token_ids: Sequence[int],
    seed: int,
    start_position: int,
) -> VerifyResult:
    """Drafter-invariant verification for a seeded request (Daliri et al. 2024).

    Row i's token is the Gumbel-max draw from ``target_probs[i]`` with noise
    keyed by ``(seed, start_position + i)``. Draft token i is accepted iff it
    equals the draw at its position; at the first mismatch the draw is the
    recovered token; with every draft accepted the draw at the next position
    is the bonus token. Each emitted token is the one plain seeded sampling
    would emit at that position, so the output never depends on the drafts.
    For a deterministic draft x the acceptance probability is
    ``target_probs[x]``, as in rejection sampling; for a draft sampled from
    draft probabilities it is lower unless the drafter couples its own choice
    with the same noise (``adaspec.sampling.race_argmax``), which accepts with
    probability >= (1 - TV) / (1 + TV).

    Args:
        target_probs: ``[n + 1, V]`` float32 processed target distributions.
        draft_token_ids: the n draft tokens (draft probabilities are not needed).
        seed: the request's seed.
        start_position: absolute output position of row 0 (tokens generated so far).

    Returns:
        VerifyResult with the accepted drafts then the recovered or bonus token.

    Raises:
        ValueError: on shape mismatch or a negative start position.
    """
    n = len(draft_token_ids)
    if target_probs.shape[0] != n + 1:
        raise ValueError(f"target_probs has {target_probs.shape[0]} rows, expected {n + 1}")
    if start_position < 0:
        raise ValueError(f"start_position must be >= 0, got {start_position}")
    V = target_probs.shape[-1]
    tokens: list[int] = []
    # Noise is drawn lazily, row by row: rows after the first mismatch are never needed.
    for i in range(n + 1):
        tok = race_argmax(target_probs[i], position_exponentials(seed, start_position + i, V))
        tokens.append(tok)
        if i == n or int(draft_token_ids[i]) != tok:
            return VerifyResult(token_ids=tokens, num_accepted=i, num_draft_tokens=n)
    raise AssertionError("unreachable")  # pragma: no cover - the loop returns at i == n
