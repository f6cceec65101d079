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

Each rule has a token-tree form (``verify_tree_*``, tree mode): greedy takes the
longest path whose every token is the target's argmax at its parent; coupled
walks the tree along the target's own seeded draw; unseeded sampling runs
recursive rejection sampling over each node's candidates (SpecInfer, Miao et
al. 2023). A one-branch tree gives exactly the chain rule's result.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from adaspec.sampling import position_exponentials, race_argmax
from adaspec.types import TokenTree, TreeVerifyResult, VerifyResult


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


# --------------------------------------------------------------------------- token trees
#
# A tree step feeds ``[last committed token] + tree.tokens`` with the tree mask;
# row 0 of the target's output follows the root (the last committed token) and
# row ``i + 1`` follows node i. Every rule walks down from the root, one
# accepted node per level, and emits the accepted path plus one recovered or
# bonus token, so a one-branch tree is exactly the chain rule above.


def _tree_rows(tree: TokenTree, rows: int) -> None:
    if rows != tree.num_nodes + 1:
        raise ValueError(f"target rows: {rows}, expected {tree.num_nodes + 1} (root + {tree.num_nodes} nodes)")


def verify_tree_greedy(target_logits: torch.Tensor, tree: TokenTree) -> TreeVerifyResult:
    """Greedy verification of a token tree: the longest path whose every token is the target's argmax at its parent.

    Exact: the emitted tokens are plain greedy decoding's (each accepted node is
    the argmax given exactly its ancestors, which the tree mask shows it), then
    the argmax after the path's last node (the recovered or bonus token).
    As in Medusa's / SpecInfer's tree verification (Cai et al. 2024; Miao et al. 2023).

    Args:
        target_logits: ``[N + 1, V]``: row 0 follows the root, row i + 1 node i.
        tree: the N-node tree that was fed.

    Raises:
        ValueError: on a row count that does not match the tree.
    """
    _tree_rows(tree, target_logits.shape[0])
    target_ids = torch.argmax(target_logits, dim=-1).tolist()  # [N + 1]
    path: list[int] = []
    node = -1
    while True:
        tok = target_ids[node + 1]
        nxt = tree.child(node, tok)
        if nxt is None:
            return TreeVerifyResult([tree.tokens[i] for i in path] + [tok], path, tree.num_nodes)
        path.append(nxt)
        node = nxt


def verify_tree_coupled(target_probs: torch.Tensor, tree: TokenTree, seed: int,
                        start_position: int) -> TreeVerifyResult:
    """Drafter-invariant verification of a token tree for a seeded request (Daliri et al. 2024).

    Walks the tree along the target's own sample: at depth d (output position
    ``start_position + d``) the token is the Gumbel-max draw from the current
    node's target distribution with the noise keyed by ``(seed, position)``
    (as :func:`verify_coupled`); if a child holds it, the walk moves there,
    else the draw is the recovered token (or the bonus token at a leaf). The
    output is the one plain seeded sampling would give, whatever the tree.

    Args:
        target_probs: ``[N + 1, V]`` float32 processed target distributions (row 0: the root).
        tree: the N-node tree that was fed.
        seed: the request's seed.
        start_position: absolute output position of the root's row.

    Raises:
        ValueError: on a row count that does not match the tree, or a negative start position.
    """
    _tree_rows(tree, target_probs.shape[0])
    if start_position < 0:
        raise ValueError(f"start_position must be >= 0, got {start_position}")
    V = target_probs.shape[-1]
    path: list[int] = []
    node = -1
    while True:
        tok = race_argmax(target_probs[node + 1], position_exponentials(seed, start_position + len(path), V))
        nxt = tree.child(node, tok)
        if nxt is None:
            return TreeVerifyResult([tree.tokens[i] for i in path] + [tok], path, tree.num_nodes)
        path.append(nxt)
        node = nxt


def verify_tree_stochastic(target_probs: torch.Tensor, tree: TokenTree,
                           generator: Optional[torch.Generator]) -> TreeVerifyResult:
    """Recursive rejection sampling over a token tree (SpecInfer, Miao et al. 2023, Alg. 2 "multi-step speculative sampling"; SpecTr, Sun et al. 2023).

    At each node the candidates are its children's claims in the order they
    were proposed (:meth:`TokenTree.candidates`; a child proposed twice is two
    candidates). With ``p`` the target's
    distribution at the node, candidate x with draft distribution q is accepted
    with probability ``min(1, p(x) / q(x))`` (a deterministic claim is a point
    mass: ``p(x)``); on acceptance the walk moves to x's node, on rejection
    ``p`` becomes ``norm(max(p - q, 0))`` (point mass: p with x removed) and the
    next candidate is tried. When every candidate is rejected, the recovered
    token is sampled from the last ``p``; at a leaf the bonus token from its
    target distribution. Each stage is one exact single-draft rejection step
    against the current ``p`` (Leviathan et al. 2023), so every emitted token
    is distributed exactly as the target's, provided each sampled claim was
    drawn from its q independently of the others and no candidate was kept
    or dropped by looking at the drawn tokens (a tree pruned by value must
    carry point masses: :meth:`TokenTree.subtree` with ``point_masses``; a
    point mass is exact for any token fixed before verification); with deterministic
    candidates the rule samples without replacement, accepting one of them
    with probability ``sum p(x)``.

    Args:
        target_probs: ``[N + 1, V]`` float32 processed target distributions (row 0: the root).
        tree: the N-node tree that was fed; claims carry ``draft_probs`` rows or None.
        generator: the request's random generator.

    Raises:
        ValueError: on a row count that does not match the tree, or a sampled
            claim whose own distribution gives its token zero probability.
    """
    _tree_rows(tree, target_probs.shape[0])
    path: list[int] = []
    node = -1
    while True:
        p = target_probs[node + 1]
        accepted: Optional[int] = None
        for child, claim in tree.candidates(node):
            x = tree.tokens[child]
            q = claim.draft_probs
            q_x = 1.0 if q is None else float(q[x])
            if q_x <= 0.0:
                raise ValueError(f"tree node {child} (token {x}) has zero draft probability under its claim")
            p_x = float(p[x])
            r = float(torch.rand((), generator=generator))
            if r * q_x < p_x:
                accepted = child
                break
            if q is None:
                residual = p.clone()
                residual[x] = 0.0
            else:
                residual = torch.clamp(p - q, min=0.0)
            total = float(residual.sum())
            # total == 0 only when p is (up to rounding) covered by q: rejection had probability ~0.
            p = residual / total if total > 0.0 else p
        if accepted is None:
            tok = int(torch.multinomial(p, 1, generator=generator).item())
            return TreeVerifyResult([tree.tokens[i] for i in path] + [tok], path, tree.num_nodes)
        path.append(accepted)
        node = accepted
