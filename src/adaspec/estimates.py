"""The controller's pure math: expected emitted tokens, the cost model, acceptance estimates.

No engine, no speculators, no torch: numbers in, numbers out, so every rule here
is testable on synthetic traces (tests/test_controller.py). The
confidence-aware controller (:mod:`adaspec.controller`) combines them each step.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Callable, Optional, Sequence


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
    base_tokens: float = 0.0,
) -> tuple[int, float]:
    """Pick k that maximises expected tokens per second; k = 0 is plain decoding.

    Args:
        accept_probs: per-position conditional acceptance estimates (at least
            ``max_lookahead`` long, or shorter: positions past it count as 0).
        draft_ms_per_token: cost of drafting one token, milliseconds.
        verify_ms: cost of one target forward over n fed tokens, ms (n = k + 1).
            In a batched step, the cost of the whole batch's forward when this
            request feeds n rows (the others' rows already counted in).
        max_lookahead: upper bound on k (token budget, context window, config).
        base_tokens: tokens the rest of the batch emits in the same forward
            (0 alone): the rate maximised is the batch's,
            ``(base_tokens + emitted(k)) / (draft + verify_ms(k + 1))``.

    Returns:
        ``(k, tokens_per_s)`` of the best choice.
    """
    best_k, best_rate = 0, 1000.0 * (base_tokens + 1.0) / max(verify_ms(1), 1e-6)
    run, emitted = 1.0, 1.0
    for k in range(1, min(max_lookahead, len(accept_probs)) + 1):
        run *= accept_probs[k - 1]
        emitted += run
        rate = 1000.0 * (base_tokens + emitted) / max(draft_ms_per_token * k + verify_ms(k + 1), 1e-6)
        if rate > best_rate:
            best_k, best_rate = k, rate
    return best_k, best_rate


def size_tree(
    values: Sequence[float],
    parents: Sequence[int],
    verify_ms: Callable[[int], float],
    max_nodes: int,
    base_tokens: float = 0.0,
) -> tuple[list[int], float]:
    """Pick the token-tree nodes that maximise expected tokens per second (EAGLE-2's reranking, sized by cost).

    A node's value is the probability that it is accepted (the product of the
    per-node acceptance estimates along its path), so a tree of nodes S emits
    ``1 + sum_{i in S} value[i]`` tokens in expectation, for one forward over
    ``|S| + 1`` fed tokens. Nodes are taken in decreasing value (a parent's
    value is at least its child's, so every prefix of that order is a tree;
    a node whose parent is not taken is skipped), and the prefix with the best
    ``expected / verify_ms(|S| + 1)`` is kept. The empty tree is plain decoding.

    Args:
        values: per node, in [0, 1]; parents before children.
        parents: per node, its parent index (-1: the root).
        verify_ms: cost of one forward over n fed tokens, ms (the measured curve).
        max_nodes: upper bound on |S| (token budget, context window, config).
        base_tokens: tokens the rest of a batched step emits (see :func:`choose_lookahead`).

    Returns:
        ``(kept node indices in increasing order, tokens_per_s)``; ``([], plain rate)`` when no tree pays.
    """
    order = sorted(range(len(values)), key=lambda i: (-values[i], i))
    best_n, best_rate = 0, 1000.0 * (base_tokens + 1.0) / max(verify_ms(1), 1e-6)
    taken: list[int] = []
    kept: set[int] = {-1}
    emitted = 1.0
    for i in order:
        if len(taken) >= max_nodes:
            break
        if parents[i] not in kept or values[i] <= 0.0:
            continue
        kept.add(i)
        taken.append(i)
        emitted += values[i]
        rate = 1000.0 * (base_tokens + emitted) / max(verify_ms(len(taken) + 1), 1e-6)
        if rate > best_rate:
            best_n, best_rate = len(taken), rate
    return sorted(taken[:best_n]), best_rate


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

    Continuous batching: ``batch_ms_table`` (``{rows fed: ms}`` of one batched
    forward over several requests, :func:`adaspec.step_cost.measure_batch_cost`)
    extends the shape past the seed table: for n beyond its largest entry n0,
    ``shape(n) = a + b * n0 + (interp(n) - interp(n0))`` with ``interp``
    piecewise linear through the batch table (extrapolated along its last
    segment), so a request's lookahead is priced by what it adds to the whole
    batch's forward. The single-request shape below n0 is unchanged.

    Args:
        verify_ms_table: ``{tokens_fed: ms}`` seed values.
        ema: weight of a new observation (0..1]; 0 freezes the model at the
            seed table. Default 0.05.
        batch_ms_table: ``{rows_fed: ms}`` of batched forwards, or None.
    """

    def __init__(self, verify_ms_table: Optional[dict[int, float]] = None, ema: float = 0.05,
                 batch_ms_table: Optional[dict[int, float]] = None) -> None:
        self.ema = ema
        self.verify: dict[int, float] = dict(verify_ms_table or {})  # the seed table, for inspection
        self.a, self.b = _theil_sen(self.verify) if self.verify else (1.0, 0.0)
        self.scale: Optional[float] = 1.0 if self.verify else None  # None: no data yet
        self.draft_ms: dict[str, float] = {}
        self.batch: dict[int, float] = {}
        self._n0 = max(self.verify) if self.verify else 1
        if batch_ms_table:
            self.set_batch_table(batch_ms_table)

    def set_batch_table(self, table: dict[int, float]) -> None:
        """Use ``{rows_fed: ms}`` of batched forwards for n past the seed table (see the class doc).

        Raises:
            ValueError: fewer than two entries, or a row count < 1.
        """
        if len(table) < 2 or min(table) < 1:
            raise ValueError(f"a batch cost table needs >= 2 entries with rows >= 1, got {table}")
        self.batch = {int(n): float(ms) for n, ms in sorted(table.items())}

    def _interp(self, n: int) -> float:
        pts = list(self.batch.items())
        for (n1, y1), (n2, y2) in zip(pts, pts[1:]):
            if n <= n2 or (n2, y2) == pts[-1]:
                return y1 + (y2 - y1) * (n - n1) / (n2 - n1)
        return pts[-1][1]  # pragma: no cover - two entries at least

    def shape(self, tokens_fed: int) -> float:
        """The unscaled cost of a forward over ``tokens_fed`` rows, ms."""
        if not self.batch or tokens_fed <= self._n0:
            return self.a + self.b * tokens_fed
        extra = max(0.0, self._interp(tokens_fed) - self._interp(self._n0))
        return self.a + self.b * self._n0 + extra

    def observe_verify(self, tokens_fed: int, ms: float) -> None:
        if self.ema <= 0:
            return
        ratio = ms / self.shape(tokens_fed)
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
        """Predicted ms of one forward over ``tokens_fed`` rows (one request's, or a whole batch's)."""
        if self.scale is None:
            return 50.0  # flat prior until the first measurement
        return max(self.scale * self.shape(tokens_fed), 1e-3)

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

    def shrink(self, keep: float) -> None:
        """Keep ``keep`` of the evidence (both counts scaled: the mean is unchanged)."""
        self.accepted *= keep
        self.rejected *= keep


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

    def observe_node(self, position: int, confidence: Optional[float], accepted: bool, primary: bool = True) -> None:
        """Record one judged token-tree node at depth ``position`` (0 = the root's child).

        Every judged node updates the calibration of its confidence; only a
        ``primary`` one (the speculator's most confident child of its parent)
        updates the position estimate, which thus stays the acceptance of the
        speculator's first choice, as for a chain.
        """
        if primary:
            self.position[min(position, len(self.position) - 1)].update(accepted, self.decay)
        if confidence is not None:
            self.calibration[self._bucket(confidence)].update(accepted, self.decay)

    def shrink(self, keep: float) -> None:
        """Scale every estimate's evidence by ``keep`` in (0, 1] (means unchanged, later observations
        weigh more): after the target's weights changed.

        Raises:
            ValueError: ``keep`` outside (0, 1].
        """
        if not 0.0 < keep <= 1.0:
            raise ValueError(f"keep must be in (0, 1], got {keep}")
        for b in self.position + self.calibration:
            b.shrink(keep)

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
