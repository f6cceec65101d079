"""The speculator protocol: token ids in, drafts out.

A speculator follows the request lifecycle (after Arctic Inference's suffix
decoding API): ``start_request`` -> (``propose`` -> ``observe``)* ->
``stop_request``. It never imports transformers or the engine, so the same
object can run inside vLLM's ``custom_class`` proposer hook.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np
import torch

from adaspec.sampling import position_exponentials, process_logits, race_argmax
from adaspec.types import DEFAULT_TENANT, DraftProposal, ProposeContext


def request_draft_generator(seed: int) -> torch.Generator:
    """The draft sampler of a seeded request.

    Its stream is a function of the request's seed alone (mixed with a constant
    so it differs from the verifier's generator, which the engine seeds with the
    seed itself): a seeded request then draws the same drafts, hence the same
    output, whatever the speculator served before. Drafts stay fresh draws from
    ``draft_probs`` across seeds, which rejection sampling needs to be exact.
    Unseeded requests use the speculator's own generator.
    """
    return torch.Generator().manual_seed((int(seed) * 0x9E3779B97F4A7C15 + 0x5EED) % (1 << 63))


def draft_sampler(request_state: Any, ctx: ProposeContext, default: torch.Generator) -> torch.Generator:
    """The generator a sampled draft token is drawn with.

    A seeded request gets its own (:func:`request_draft_generator`, made once
    and kept on ``request_state.generator``); an unseeded one the
    speculator's ``default``.
    """
    if ctx.seed is None:
        return default
    if request_state.generator is None:
        request_state.generator = request_draft_generator(ctx.seed)
    return request_state.generator


def draft_token(logits: torch.Tensor, ctx: ProposeContext, generator: Optional[torch.Generator],
                step: int = 0, vocab_size: Optional[int] = None, vocab_ids: Optional[torch.Tensor] = None,
                noise_cache: Optional[dict] = None) -> tuple[int, float, Optional[torch.Tensor]]:
    """Pick one draft token from a model-based speculator's logits (draft head, draft model).

    Greedy requests (``ctx.greedy``) take the argmax; sampled ones draw from the
    logits processed with the request's temperature / top-k / top-p, the same
    processing the target's logits get, so rejection sampling stays exact.

    Args:
        logits: ``[V']`` float32 over the speculator's vocabulary.
        ctx: the request (sampling parameters).
        generator: for sampled requests (see :func:`draft_sampler`); unused when greedy.
        step / vocab_size / vocab_ids: with ``vocab_size`` (the target's V), a
            seeded sampled request drafts with the coupled verifier's noise
            (:func:`coupled_draft`; ``step`` is the token's index in the chain,
            ``vocab_ids`` the target ids of the ``V'`` entries); without it, the
            draft is drawn from ``generator``.
        noise_cache: passed to :func:`coupled_draft`.

    Returns:
        ``(index into V', confidence = its probability, processed row [V'] or None when greedy)``.
    """
    if ctx.greedy:
        j = int(torch.argmax(logits))
        return j, float(torch.softmax(logits, dim=-1)[j]), None
    probs = processed_row(logits, ctx.temperature, ctx.top_k, ctx.top_p)  # [V']
    if ctx.seed is not None and vocab_size is not None:
        j = coupled_draft(probs, ctx, step, vocab_size, vocab_ids, noise_cache)
    else:
        j = draw(probs, generator)
    return j, float(probs[j]), probs


# top-p looks for its nucleus among the tokens with at least this probability (at most 1 / floor of them)
_NUCLEUS_FLOORS = (1e-3, 1e-4)
_NUCLEUS_MARGIN = 1e-6  # > the float32 rounding of a cumulative sum near 1 (~1.2e-7)


def processed_row(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """:func:`adaspec.sampling.process_logits` for one row, without sorting the whole row for top-p.

    When the tokens of probability at least 1e-3 (at most a thousand; else
    at least 1e-4) hold more than ``top_p`` of the mass, the nucleus is
    found among them: they
    are a prefix of the sorted row, so their sorted cumulative sums are those
    of the full sort and the kept set is process_logits' (up to the order of
    tied probabilities, which any sort leaves open); the kept probabilities
    are renormalised with the same operations, so the row equals
    process_logits'. A flatter row goes to process_logits itself.

    Args:
        logits: ``[V']`` float32.
        temperature / top_k / top_p: as :func:`~adaspec.sampling.process_logits` (temperature > 0).

    Returns:
        ``[V']`` float32 probabilities summing to 1, zero outside the kept set.

    Raises:
        ValueError: as :func:`~adaspec.sampling.process_logits`.
    """
    if top_p >= 1.0 or not 0.0 < top_p:
        return process_logits(logits.unsqueeze(0), temperature, top_k, top_p)[0]
    probs = process_logits(logits.unsqueeze(0), temperature, top_k, 1.0)[0]  # [V']: temperature, top-k, softmax
    V = probs.shape[-1]
    idx = None  # the kept candidates, most likely first
    for floor in _NUCLEUS_FLOORS:
        cand = torch.nonzero(probs >= floor).flatten()  # the tokens of a sorted prefix
        if 4 * cand.numel() > V:
            break  # no cheaper than sorting the row
        vals = probs[cand]
        if cand.numel() == 0 or float(vals.sum()) < top_p + _NUCLEUS_MARGIN:
            continue  # too little mass above this floor (checked exactly below)
        top, order = torch.sort(vals, descending=True)
        cum = torch.cumsum(top, dim=-1)
        # Every token below the floor has at least cum[-1] of mass before it, so it is dropped once
        # that reaches top_p; the margin covers process_logits' float32 rounding of (cum - p).
        if float(cum[-1]) >= top_p + _NUCLEUS_MARGIN:
            idx = cand[order]
            break
    if idx is None:  # a flat row: sort it all
        return process_logits(logits.unsqueeze(0), temperature, top_k, top_p)[0]
    drop_sorted = (cum - top) >= top_p  # process_logits' rule: drop once the mass before a token reaches top_p
    drop_sorted[0] = False
    kept = idx[~drop_sorted]
    out = torch.zeros(V)  # process_logits' masked row, built from the kept entries (fewer passes over V')
    out[kept] = probs[kept]
    return out / out.sum(dim=-1, keepdim=True)


def draw(probs: torch.Tensor, generator: Optional[torch.Generator]) -> int:
    """One index drawn from ``probs`` (``[V']`` float32, non-negative, positive sum) with ``generator``.

    Inverse transform sampling in float64: one uniform u, the first index whose
    cumulative sum exceeds ``u * sum``. A zero-probability index is never
    drawn (its cumulative sum equals its predecessor's); float64 keeps each
    index's probability within ~1e-16 of ``probs[i] / sum``.
    """
    cdf = np.cumsum(probs.detach().cpu().numpy(), dtype=np.float64)  # [V']
    v = float(torch.rand(1, dtype=torch.float64, generator=generator)) * float(cdf[-1])
    j = int(np.searchsorted(cdf, v, side="right"))
    if j >= cdf.shape[0]:  # v rounded up to the total: the last index with mass
        j = int(np.flatnonzero(cdf < cdf[-1]).max(initial=-1)) + 1
    return j


def draft_probs_matrix(rows: Sequence[torch.Tensor], vocab_size: int, columns: Any) -> Optional[torch.Tensor]:
    """The ``[n, V]`` ``draft_probs`` of a sampled draft from its ``[V']`` rows, or None when greedy.

    Args:
        rows: one processed distribution per draft token (:func:`draft_token`).
        vocab_size: V, the target's vocabulary.
        columns: where the V' entries go among V (an index tensor or a slice).
    """
    if not rows:
        return None
    out = torch.zeros(len(rows), vocab_size)  # [n, V]: zero mass outside the speculator's vocabulary
    out[:, columns] = torch.stack(rows)
    return out


def coupled_draft(probs: torch.Tensor, ctx: ProposeContext, step: int, vocab_size: int,
                  vocab_ids: Optional[torch.Tensor] = None, noise_cache: Optional[dict] = None) -> int:
    """A seeded request's draft token, coupled with the verifier's noise (Daliri et al. 2024).

    The engine verifies a seeded request with :func:`adaspec.verify.verify_coupled`:
    it accepts a draft iff it equals the Gumbel-max draw from the target's
    distribution with the noise of that output position. Drafting with the same
    noise over the drafter's own distribution makes the two draws agree with
    probability >= (1 - TV) / (1 + TV) instead of ``sum_x draft(x) target(x)``
    for an independent draw. The draft stays a draw from ``probs``.

    Args:
        probs: ``[Vd]`` float32, the drafter's processed distribution over
            ``vocab_ids`` (default: target ids ``0 .. Vd - 1``).
        ctx: the request (its seed must be set, and its tokens committed so far).
        step: index of this draft token in the chain (0 = the next output position).
        vocab_size: the target's vocabulary size V (width of its logits), which
            the noise must have to match the verifier's.
        vocab_ids: ``[Vd]`` int64 target ids of ``probs``' entries, or None.
        noise_cache: output position -> the noise at ``vocab_ids`` (``[Vd]``),
            filled here: a position drafted again (after a rejection) reuses
            it instead of drawing V uniforms again. The caller keeps one per
            request, seed and ``vocab_ids``; None: no cache.

    Returns:
        The index into ``probs`` of the drafted token.
    """
    position = len(ctx.token_ids) - ctx.num_prompt_tokens + step
    noise = noise_cache.get(position) if noise_cache is not None else None
    if noise is None:
        noise = position_exponentials(int(ctx.seed), position, vocab_size)  # [V]
        noise = noise[vocab_ids] if vocab_ids is not None else noise[: probs.shape[-1]]
        if noise_cache is not None:
            noise_cache[position] = noise
    return race_argmax(probs, noise)


class Speculator:
    """Base class for speculators; subclasses override ``propose``.

    Attributes:
        name: short identifier used in stats and the CLI (e.g. "ngram").
        needs_hidden_states: True if ``propose`` reads ``ctx.hidden_state``.
        provides_draft_probs: True if proposals carry ``draft_probs``.
        wants_features: True if the engine should call ``observe_features``
            after every verify step (a speculator that learns from the target's
            features, e.g. :class:`adaspec.online.learned.LearnedHeadSpeculator`).
    """

    name: str = "base"
    needs_hidden_states: bool = False
    provides_draft_probs: bool = False
    wants_features: bool = False

    def start_request(self, request_id: str, prompt_ids: Sequence[int], tenant: str = DEFAULT_TENANT) -> None:
        """A request begins with ``prompt_ids``; default: nothing to do."""

    def propose(self, ctx: ProposeContext, max_draft_tokens: int) -> DraftProposal:
        """Draft up to ``max_draft_tokens`` tokens that follow ``ctx.token_ids``.

        Args:
            ctx: the request's committed tokens (and optionally the target's
                last hidden state).
            max_draft_tokens: lookahead for this step, >= 1.

        Returns:
            A DraftProposal with 0..max_draft_tokens draft tokens.
        """
        raise NotImplementedError

    def observe(self, request_id: str, token_ids: Sequence[int], num_accepted: int, num_draft_tokens: int) -> None:
        """The target verified a step: ``token_ids`` were appended to the request.

        Args:
            request_id: the request.
            token_ids: the tokens committed this step (accepted drafts then the
                recovered or bonus token; may be cut short by a stop condition).
            num_accepted: drafts accepted this step.
            num_draft_tokens: drafts proposed this step.
        """

    def observe_features(self, request_id: str, hidden: torch.Tensor, target_argmax: torch.Tensor) -> None:
        """The target's features at the positions this step committed (only when ``wants_features``).

        Called just before ``observe`` for the same step.

        Args:
            request_id: the request.
            hidden: ``[n, H]`` float32, n = tokens committed this step: row i is
                the feature (last-layer hidden state after the final norm) that
                predicted the i-th committed token.
            target_argmax: ``[n]`` int64, the target's greedy token at each row
                (from its raw logits, before sampling settings or grammar).
        """

    def on_verify(self, tokens_fed: int, verify_s: float) -> None:
        """The target ran one forward over ``tokens_fed`` tokens in ``verify_s`` seconds.

        Lets controllers measure costs instead of assuming them; default: ignore.
        """

    def stop_request(self, request_id: str) -> None:
        """The request finished or was cancelled; release its per-request state."""

    def on_policy_update(self, version: int) -> None:
        """The target's weights changed (an RL policy update; ``version`` counts them from 0 at load).

        What was learned from older versions' outputs predicts the new policy
        less well: a speculator that learns from traffic weights it down.
        Default: nothing to do.
        """

    # Governance of learned state. Defaults suit speculators that learn nothing from
    # request text (n-gram over the request itself, draft heads, draft models); a
    # speculator that keeps text across requests overrides all three.
    def start_request_private(self, request_id: str, prompt_ids: Sequence[int],
                              tenant: str = DEFAULT_TENANT) -> None:
        """Like ``start_request``, for a request whose prompt and output must not enter learned state."""
        self.start_request(request_id, prompt_ids, tenant)

    def forget_tenant(self, tenant: str) -> int:
        """Delete what was learned from ``tenant``; returns how many records went (0: none held)."""
        return 0

    def forget_older_than(self, max_age_s: float, now: Optional[float] = None) -> int:
        """Retention: delete what was learned more than ``max_age_s`` seconds ago; returns how many records went."""
        return 0

    def state_dict(self) -> dict[str, Any]:
        """Learned state to persist (empty for model-free, stateless speculators)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned.

        Raises:
            ValueError: if ``state`` is not from a compatible speculator.
        """
        if state:
            raise ValueError(f"{self.name} speculator holds no learned state, got keys {sorted(state)}")
