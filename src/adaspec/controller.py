"""Controllers: which speculator drafts each step, and how far ahead (k).

A controller is engine-agnostic: it reads a request's counters and the
engine's bound on k, and returns a :class:`Decision`. This module holds the
protocol and the fixed policy used when the user names one speculator and one
lookahead; the confidence-aware controller builds on the same protocol.
"""

from __future__ import annotations

import statistics
import time as _time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

from adaspec.speculators.base import Speculator
from adaspec.types import DEFAULT_TENANT, GREEDY_TEMPERATURE, DraftProposal, ProposeContext


@dataclass
class Decision:
    """One step's choice.

    Attributes:
        speculator: name of the speculator that drafts, or None to decode plainly.
        lookahead: most draft tokens it may propose (0 = plain decoding).
    """

    speculator: Optional[str]
    lookahead: int


class Controller:
    """Protocol: ``decide`` before the step, ``update`` after it."""

    def decide(self, request: Any, max_lookahead: int) -> Decision:
        """Choose the speculator and k (``0 <= k <= max_lookahead``) for one step.

        Args:
            request: the engine's per-request state (read-only).
            max_lookahead: the most draft tokens the token budget and context
                window allow this step.
        """
        raise NotImplementedError

    def update(self, request: Any, decision: Decision, proposal: Any, result: Any, verify_s: float) -> None:
        """Learn from the step's outcome (default: nothing)."""


class FixedController(Controller):
    """Always the same speculator with the same lookahead, clipped to the bound.

    Args:
        speculator: name of the speculator, or None for plain decoding.
        lookahead: k >= 0.
    """

    def __init__(self, speculator: Optional[str], lookahead: int) -> None:
        if lookahead < 0:
            raise ValueError(f"lookahead must be >= 0, got {lookahead}")
        self.speculator = speculator
        self.lookahead = lookahead

    def decide(self, request: Any, max_lookahead: int) -> Decision:
        k = min(self.lookahead, max_lookahead)
        if self.speculator is None or k <= 0:
            return Decision(None, 0)
        return Decision(self.speculator, k)


# --------------------------------------------------------------------------
# The confidence-aware controller (ATLAS mode)
# --------------------------------------------------------------------------


def expected_emitted(accept_probs: Sequence[float]) -> float:
    """Expected tokens emitted by one verify step for a draft of ``len(accept_probs)`` tokens.

    ``accept_probs[i]`` is the probability that draft token i is accepted given
    that tokens 0..i-1 were. The step always emits one target token (recovered
    or bonus), plus each draft token whose whole prefix was accepted:
    ``1 + sum_i prod_{j<=i} accept_probs[j]``; for a constant rate a and k
    drafts this is ``(1 - a^(k+1)) / (1 - a)`` (Leviathan et al. 2023, eq. 1).
    """
    total, run = 1.0, 1.0
    for a in accept_probs:
        run *= a
        total += run
    return total


def choose_lookahead(
    accept_probs: Sequence[float],
    draft_ms_per_token: float,
    verify_ms: Callable[[int], float],
    max_lookahead: int,
) -> tuple[int, float]:
    """Pick k that maximises expected tokens per second; k = 0 is plain decoding.

    Args:
        accept_probs: per-position conditional acceptance estimates (at least
            ``max_lookahead`` long, or shorter: positions past it count as 0).
        draft_ms_per_token: cost of drafting one token, milliseconds.
        verify_ms: cost of one target forward over n fed tokens, ms (n = k + 1).
        max_lookahead: upper bound on k (token budget, context window, config).

    Returns:
        ``(k, tokens_per_s)`` of the best choice.
    """
    best_k, best_rate = 0, 1000.0 / max(verify_ms(1), 1e-6)
    run, emitted = 1.0, 1.0
    for k in range(1, min(max_lookahead, len(accept_probs)) + 1):
        run *= accept_probs[k - 1]
        emitted += run
        rate = 1000.0 * emitted / max(draft_ms_per_token * k + verify_ms(k + 1), 1e-6)
        if rate > best_rate:
            best_k, best_rate = k, rate
    return best_k, best_rate


class CostModel:
    """Measured costs: target forward time by tokens fed, draft time per token by speculator.

    Verify time is ``scale * (a + b * n)`` for n tokens fed:

    - the **shape** ``a + b * n`` (b >= 0) is fitted once to the seed table
      (``bench step-cost`` at start-up) with the Theil-Sen estimator (median of
      pairwise slopes), so one stalled measurement cannot bend it; without a
      seed table the shape is flat (as on a GPU);
    - the **scale** follows the machine: an exponential moving average of
      observed / predicted over every verify forward, whatever its n. One
      observation above twice the prediction (a stall of the machine, not the
      model) is clipped to that.

    Pooling every step into one scale is far steadier on a noisy machine than
    a table of per-n averages, where a single slow step prices a lookahead out
    of use until that n happens to be measured again.

    Args:
        verify_ms_table: ``{tokens_fed: ms}`` seed values.
        ema: weight of a new observation (0..1]; 0 freezes the model at the
            seed table. Default 0.05.
    """

    def __init__(self, verify_ms_table: Optional[dict[int, float]] = None, ema: float = 0.05) -> None:
        self.ema = ema
        self.verify: dict[int, float] = dict(verify_ms_table or {})  # the seed table, for inspection
        self.a, self.b = _theil_sen(self.verify) if self.verify else (1.0, 0.0)
        self.scale: Optional[float] = 1.0 if self.verify else None  # None: no data yet
        self.draft_ms: dict[str, float] = {}

    def observe_verify(self, tokens_fed: int, ms: float) -> None:
        if self.ema <= 0:
            return
        ratio = ms / (self.a + self.b * tokens_fed)
        if self.scale is None:
            self.scale = ratio
            return
        self.scale = (1 - self.ema) * self.scale + self.ema * min(ratio, 2.0 * self.scale)

    def observe_draft(self, speculator: str, num_tokens: int, ms: float) -> None:
        if num_tokens <= 0:
            return
        per = ms / num_tokens
        old = self.draft_ms.get(speculator)
        k = self.ema if self.ema > 0 else 0.1
        self.draft_ms[speculator] = per if old is None else (1 - k) * old + k * per

    def line(self) -> tuple[float, float]:
        """``(a, b)`` of the current ``verify_ms(n) = a + b * n``, ms; ``(50, 0)`` before any data."""
        if self.scale is None:
            return 50.0, 0.0  # flat prior until the first measurement
        return self.scale * self.a, self.scale * self.b

    def verify_ms(self, tokens_fed: int) -> float:
        a, b = self.line()
        return max(a + b * tokens_fed, 1e-3)

    def draft_ms_per_token(self, speculator: str, default: float = 0.0) -> float:
        return self.draft_ms.get(speculator, default)


def _theil_sen(table: dict[int, float]) -> tuple[float, float]:
    """Robust line ``(a, b)`` through ``{n: ms}``: b = median pairwise slope (>= 0), a = median of ms - b n."""
    pts = sorted(table.items())
    slopes = [(y2 - y1) / (n2 - n1) for i, (n1, y1) in enumerate(pts) for n2, y2 in pts[i + 1:] if n2 != n1]
    b = max(0.0, statistics.median(slopes)) if slopes else 0.0
    a = statistics.median(y - b * n for n, y in pts)
    if a <= 0:  # never let the line predict a free or negative forward
        a = max(min(y for _, y in pts) * 0.5, 1e-3)
    return a, b


@dataclass
class _Beta:
    """Decayed Beta posterior of an acceptance probability."""

    accepted: float
    rejected: float

    def mean(self) -> float:
        return self.accepted / (self.accepted + self.rejected)

    def update(self, accepted: bool, decay: float) -> None:
        self.accepted = self.accepted * decay + (1.0 if accepted else 0.0)
        self.rejected = self.rejected * decay + (0.0 if accepted else 1.0)


class AcceptanceEstimator:
    """Online, decayed acceptance estimates for one speculator and tenant.

    Two views, both per draft position (conditional on the earlier positions
    being accepted):

    - ``position``: how often position i is accepted, whatever the confidence;
      used before drafting, to decide whether a costly speculator should run;
    - ``calibration``: acceptance by bucket of the speculator's own confidence
      (10 equal-width buckets), so a raw confidence (suffix counts, draft-head
      probabilities) becomes a calibrated acceptance probability.

    Decay (default 0.98 per observation) makes both follow drift: an estimate
    forgets half its weight in ~35 observations.

    Args:
        prior: prior acceptance rate per position. prior_weight: its pseudo-count.
    """

    BUCKETS = 10

    def __init__(self, prior: float = 0.3, prior_weight: float = 2.0, decay: float = 0.98, max_positions: int = 32):
        self.decay = decay
        self.prior, self.prior_weight = prior, prior_weight
        self.position = [_Beta(prior * prior_weight, (1 - prior) * prior_weight) for _ in range(max_positions)]
        self.calibration = [
            _Beta(((b + 0.5) / self.BUCKETS) * prior_weight, (1 - (b + 0.5) / self.BUCKETS) * prior_weight)
            for b in range(self.BUCKETS)
        ]

    def _bucket(self, confidence: float) -> int:
        return min(self.BUCKETS - 1, max(0, int(confidence * self.BUCKETS)))

    def position_probs(self, k: int) -> list[float]:
        return [self.position[min(i, len(self.position) - 1)].mean() for i in range(k)]

    def calibrated(self, confidences: Sequence[float]) -> list[float]:
        return [self.calibration[self._bucket(c)].mean() for c in confidences]

    def observe(self, num_judged: int, num_accepted: int, confidences: Optional[Sequence[float]]) -> None:
        """Record a draft whose first ``num_judged`` positions were judged, ``num_accepted`` accepted.

        Position ``num_accepted`` (if judged) was rejected; later ones were not
        judged (their condition, all earlier accepted, did not hold).
        """
        for i in range(min(num_judged, num_accepted + 1)):
            ok = i < num_accepted
            self.position[min(i, len(self.position) - 1)].update(ok, self.decay)
            if confidences is not None and i < len(confidences):
                self.calibration[self._bucket(confidences[i])].update(ok, self.decay)


@dataclass
class _PendingDraft:
    speculator: str
    token_ids: list[int]
    confidence: Optional[list[float]]
    chosen: bool
    mode: str = "greedy"  # "greedy" or "sampled": estimates are kept per mode
    sampled_draft: bool = False  # drawn from draft_probs (judged only when verified)


class AtlasSpeculator(Speculator):
    """The confidence-aware controller, packaged as one composite speculator.

    Each step it decides which child speculator drafts, and how far ahead, to
    maximise expected tokens per second (``choose_lookahead``), and decodes
    plainly (an empty draft) when nothing pays. Because it is itself a
    speculator (token ids in, drafts out), it runs unchanged inside the engine
    or any proposer hook (vLLM ``custom_class``).

    Per step:

    1. the **adaptive** speculator (cheap, model-free) drafts up to the bound;
       its per-token confidences are calibrated by this tenant's decayed
       acceptance history into acceptance probabilities;
    2. the **static** speculator's expected acceptance per position comes from
       its decayed history; it is asked to draft only if that beats the
       adaptive draft after its measured drafting cost; its own draft
       probabilities (confidence) then cut the draft where extending no longer
       pays;
    3. the better plan, by expected tokens per second, is returned; plain
       decoding wins when neither beats ``1 / verify_ms(1)``.

    Estimates are kept per speculator, tenant and mode (greedy or sampled
    requests): a deterministic draft token is accepted with the target's p(x),
    a sampled one with min(1, p(x)/q(x)). Under sampling, a draft drawn from
    ``draft_probs`` is judged by its position estimates, since its confidence
    q(x) says nothing about min(1, p/q), and it is not judged in the shadow,
    because matching the target's sample is rarer than acceptance.

    Learning: every child observes every committed token. The adaptive draft is
    also judged in the shadow when it was not chosen (its tokens compared with
    what the target committed, up to what is known), so its estimate keeps
    rising while the static one carries the load - that is how the controller
    shifts to the adaptive speculator as it learns, and back after a drift.

    Args:
        static: the static speculator (e.g. the draft head), or None.
        adaptive: the adaptive speculator (e.g. suffix), or None.
        cost_model: measured costs (verify time by tokens fed; draft time).
        static_prior: prior acceptance per position for the static speculator
            (e.g. its held-out acceptance rate). Default 0.5.
        max_lookahead: the most draft tokens in any step. Default 16.
        decay: per-observation decay of the acceptance estimates. Default 0.98.
        explore_every: when the static speculator has not drafted for this many
            steps of a tenant, it drafts ``explore_tokens`` tokens in the shadow
            (judged, not verified), so an estimate that went low in one domain
            can recover in the next. 0 disables. Default 32 (at ~1.5 ms per draft
            token against a ~40 ms step this costs under 0.5%).
        explore_tokens: length of an exploration draft. Default 4.
    """

    name = "atlas"

    def __init__(
        self,
        static: Optional[Speculator] = None,
        adaptive: Optional[Speculator] = None,
        cost_model: Optional[CostModel] = None,
        static_prior: float = 0.5,
        max_lookahead: int = 16,
        decay: float = 0.98,
        explore_every: int = 32,
        explore_tokens: int = 4,
    ) -> None:
        if static is None and adaptive is None:
            raise ValueError("AtlasSpeculator needs at least one child speculator")
        self.static, self.adaptive = static, adaptive
        self.children = [s for s in (static, adaptive) if s is not None]
        self.needs_hidden_states = any(s.needs_hidden_states for s in self.children)
        self.provides_draft_probs = any(s.provides_draft_probs for s in self.children)
        self.costs = cost_model or CostModel()
        self.static_prior = static_prior
        self.max_lookahead = max_lookahead
        self.decay = decay
        if explore_every < 0 or explore_tokens < 1:
            raise ValueError("explore_every must be >= 0 and explore_tokens >= 1")
        self.explore_every, self.explore_tokens = explore_every, explore_tokens
        self._static_idle: dict[str, int] = {}  # tenant -> steps since the static speculator last drafted
        self._estimators: dict[tuple[str, str, str], AcceptanceEstimator] = {}  # (speculator, tenant, mode)
        self._tenant_of: dict[str, str] = {}
        self._pending: dict[str, list[_PendingDraft]] = {}
        self.choices: dict[str, int] = {}
        # The controller's own time (decisions, estimates, shadow judging), children's
        # drafting and learning excluded; seconds, cumulative over all requests.
        self.decision_time_s = 0.0
        self._child_s = 0.0  # children's drafting time within the current propose

    # ---------------------------------------------------------------- estimates
    def estimator(self, speculator: str, tenant: str, mode: str = "greedy") -> AcceptanceEstimator:
        """The acceptance estimates of ``speculator`` for ``tenant`` under ``mode`` ("greedy" or "sampled")."""
        key = (speculator, tenant, mode)
        est = self._estimators.get(key)
        if est is None:
            est = self._estimators[key] = self._new_estimator(speculator)
        return est

    def _new_estimator(self, speculator: str, max_positions: Optional[int] = None) -> AcceptanceEstimator:
        prior = self.static_prior if self.static is not None and speculator == self.static.name else 0.3
        return AcceptanceEstimator(prior=prior, decay=self.decay, max_positions=max_positions or self.max_lookahead)

    # ---------------------------------------------------------------- lifecycle
    def start_request(self, request_id: str, prompt_ids: Sequence[int], tenant: str = DEFAULT_TENANT) -> None:
        self._tenant_of[request_id] = tenant
        for s in self.children:
            s.start_request(request_id, prompt_ids, tenant)

    def stop_request(self, request_id: str) -> None:
        self._tenant_of.pop(request_id, None)
        self._pending.pop(request_id, None)
        for s in self.children:
            s.stop_request(request_id)

    def on_verify(self, tokens_fed: int, verify_s: float) -> None:
        self.costs.observe_verify(tokens_fed, verify_s * 1000.0)

    def propose(self, ctx: ProposeContext, max_draft_tokens: int) -> DraftProposal:
        t0 = _time.perf_counter()
        self._child_s = 0.0
        out = self._decide(ctx, max_draft_tokens)
        self.decision_time_s += _time.perf_counter() - t0 - self._child_s
        return out

    def _decide(self, ctx: ProposeContext, max_draft_tokens: int) -> DraftProposal:
        bound = min(max_draft_tokens, self.max_lookahead)
        # Acceptance differs between greedy and sampled requests (a sampled draft
        # token is accepted with min(1, p/q), a deterministic one with p), so each
        # mode has its own estimates; and a draft sampled from draft_probs has a
        # confidence q(x) that says nothing about min(1, p/q): position estimates
        # then replace the confidence calibration.
        mode = "greedy" if ctx.temperature < GREEDY_TEMPERATURE else "sampled"

        def accept_probs(est: AcceptanceEstimator, d: DraftProposal) -> list[float]:
            if d.confidence and not (mode == "sampled" and d.draft_probs is not None):
                return est.calibrated(d.confidence)
            return est.position_probs(d.num_draft_tokens)

        def pend(name: str, d: DraftProposal) -> _PendingDraft:
            return _PendingDraft(name, d.token_ids, d.confidence, chosen=False, mode=mode,
                                 sampled_draft=mode == "sampled" and d.draft_probs is not None)
        pending: list[_PendingDraft] = []
        self._pending[ctx.request_id] = pending
        verify_ms = self.costs.verify_ms
        plans: list[tuple[float, DraftProposal]] = []

        if self.adaptive is not None and bound > 0:
            t0 = _time.perf_counter()
            a = self._draft(self.adaptive, ctx, bound)
            dt = _time.perf_counter() - t0
            self._child_s += dt
            self.costs.observe_draft(self.adaptive.name, max(1, a.num_draft_tokens), dt * 1000)
            pending.append(pend(self.adaptive.name, a))
            if a.num_draft_tokens:
                est = self.estimator(self.adaptive.name, ctx.tenant, mode)
                probs = accept_probs(est, a)
                k, rate = choose_lookahead(probs, self.costs.draft_ms_per_token(self.adaptive.name), verify_ms,
                                           a.num_draft_tokens)
                if k > 0:
                    plans.append((rate, _truncate(a, k)))

        if self.static is not None and bound > 0:
            est = self.estimator(self.static.name, ctx.tenant, mode)
            draft_ms = self.costs.draft_ms_per_token(self.static.name, default=2.0)
            k, rate = choose_lookahead(est.position_probs(bound), draft_ms, verify_ms, bound)
            best_other = max((r for r, _ in plans), default=1000.0 / max(verify_ms(1), 1e-6))
            idle = self._static_idle.get(ctx.tenant, 0)
            pays = k > 0 and rate > best_other
            explore = not pays and self.explore_every > 0 and idle >= self.explore_every
            self._static_idle[ctx.tenant] = 0 if (pays or explore) else idle + 1
            if explore:
                k = min(self.explore_tokens, bound)
            if pays or explore:
                t0 = _time.perf_counter()
                s = self._draft(self.static, ctx, k)
                dt = _time.perf_counter() - t0
                self._child_s += dt
                self.costs.observe_draft(self.static.name, max(1, s.num_draft_tokens), dt * 1000)
                # Not chosen, it is still judged in the shadow (see observe).
                pending.append(pend(self.static.name, s))
                if s.num_draft_tokens:
                    probs = accept_probs(est, s)
                    k2, rate2 = choose_lookahead(probs, 0.0, verify_ms, s.num_draft_tokens)  # drafting already paid
                    if k2 > 0:
                        plans.append((rate2, _truncate(s, k2)))

        if not plans:
            self.choices["none"] = self.choices.get("none", 0) + 1
            return DraftProposal(speculator="none")
        _, best = max(plans, key=lambda p: p[0])
        for p in pending:
            p.chosen = p.speculator == best.speculator
        self.choices[best.speculator] = self.choices.get(best.speculator, 0) + 1
        return best

    @staticmethod
    def _draft(spec: Speculator, ctx: ProposeContext, k: int) -> DraftProposal:
        d = spec.propose(ctx, k)
        d.speculator = d.speculator or spec.name
        return d

    def observe(self, request_id: str, token_ids: Sequence[int], num_accepted: int, num_draft_tokens: int) -> None:
        t0 = _time.perf_counter()
        self._judge(request_id, token_ids, num_accepted, num_draft_tokens)
        self.decision_time_s += _time.perf_counter() - t0
        for s in self.children:
            s.observe(request_id, token_ids, num_accepted, num_draft_tokens)

    def _judge(self, request_id: str, token_ids: Sequence[int], num_accepted: int, num_draft_tokens: int) -> None:
        tenant = self._tenant_of.get(request_id, DEFAULT_TENANT)
        for p in self._pending.pop(request_id, []):
            est = self.estimator(p.speculator, tenant, p.mode)
            if p.chosen:
                est.observe(num_draft_tokens, num_accepted, p.confidence)
            elif p.token_ids and not p.sampled_draft:
                # (A sampled draft token matches the target's sample less often than
                # rejection sampling would accept it: judging it so would be biased.)
                # Shadow judgement: compare with what the target committed; positions
                # past the committed tokens are unknown and not judged.
                judged = min(len(p.token_ids), len(token_ids))
                acc = 0
                while acc < judged and p.token_ids[acc] == token_ids[acc]:
                    acc += 1
                est.observe(judged, acc, p.confidence)

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict:
        """Learned state: each child's, and the controller's acceptance estimates (JSON-safe).

        The cost model is not saved: it is measured on the machine at start-up.
        """
        out: dict = {}
        children = {}
        for s in self.children:
            st = s.state_dict()
            if st:
                children[s.name] = st
        if children:
            out["children"] = children
        if self._estimators:
            out["estimates"] = [
                {"speculator": sp, "tenant": te, "mode": mo,
                 "position": [[b.accepted, b.rejected] for b in est.position],
                 "calibration": [[b.accepted, b.rejected] for b in est.calibration]}
                for (sp, te, mo), est in sorted(self._estimators.items())]
        return out

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`'s output.

        Raises:
            ValueError: a malformed state, or one naming a child speculator this
                controller does not have.
        """
        if not state:
            return
        if not isinstance(state, dict) or not set(state) <= {"children", "estimates"}:
            raise ValueError("atlas state must be {'children': {name: state}, 'estimates': [...]}")
        children = state.get("children", {})
        if not isinstance(children, dict):
            raise ValueError("atlas state must be {'children': {name: state}}")
        by_name = {s.name: s for s in self.children}
        for name in children:
            if name not in by_name:
                raise ValueError(f"atlas state holds unknown child speculator {name!r}")
        restored = {}
        for e in state.get("estimates", []):
            try:
                key = (str(e["speculator"]), str(e["tenant"]), str(e["mode"]))
                pos = [_Beta(float(a), float(r)) for a, r in e["position"]]
                cal = [_Beta(float(a), float(r)) for a, r in e["calibration"]]
            except (KeyError, TypeError, ValueError) as err:
                raise ValueError(f"atlas state: malformed estimate entry ({err})") from None
            if key[2] not in ("greedy", "sampled") or len(cal) != AcceptanceEstimator.BUCKETS or not pos or any(
                    not (b.accepted >= 0 and b.rejected >= 0 and b.accepted + b.rejected > 0) for b in pos + cal):
                raise ValueError(f"atlas state: invalid estimate for {key}")
            fresh = self._new_estimator(key[0], max_positions=len(pos))
            fresh.position, fresh.calibration = pos, cal
            restored[key] = fresh
        for name, st in children.items():
            by_name[name].load_state_dict(st)
        self._estimators.update(restored)


def _truncate(d: DraftProposal, k: int) -> DraftProposal:
    return DraftProposal(
        token_ids=d.token_ids[:k],
        draft_probs=d.draft_probs[:k] if d.draft_probs is not None else None,
        confidence=d.confidence[:k] if d.confidence is not None else None,
        speculator=d.speculator,
    )
