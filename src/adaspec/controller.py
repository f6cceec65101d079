"""The controller: which speculator drafts each step, and how far ahead (k).

A controller is engine-agnostic: it reads a request's :class:`ProposeContext`
and the engine's bound on k, asks a speculator for a draft, and returns a
:class:`Decision` holding it. It follows the request lifecycle as speculators
do (``start_request`` -> (``propose`` -> ``observe``)* -> ``stop_request``,
plus ``on_verify`` with every measured target forward), so the same object
runs inside this engine and, wrapped as one drafter, inside vLLM's
``custom_class`` proposer hook (:mod:`adaspec.integrations.vllm_proposer`).

- :class:`FixedController`: one named speculator, one lookahead (``--speculator
  ngram|suffix``).
- :class:`ConfidenceAwareController`: the confidence-aware controller
  (``--speculator atlas``; with the static speculator alone, ``--speculator
  static``); its math (expected emitted tokens, the cost model,
  acceptance estimates) lives in :mod:`adaspec.estimates`.

The engine tells every speculator about every request and committed token
(adaptive ones learn even while another drafts); a controller's ``observe``
only judges drafts, it never forwards to the speculators.
"""

from __future__ import annotations

import time as _time
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

from adaspec.estimates import (  # noqa: F401  (re-exported: the controller's math, one import away)
    AcceptanceEstimator,
    CostModel,
    _Beta,
    choose_lookahead,
    expected_emitted,
    size_tree,
)
from adaspec.speculators.base import Speculator
from adaspec.types import DEFAULT_TENANT, DraftProposal, ProposeContext, TokenTree, common_prefix_len, is_greedy

NO_SPECULATOR = "none"  # the name stats use for a step without a draft
ALT_SUFFIX = ":alt"  # tree mode: estimates of a speculator's alternatives (not its first choice) go under name + this
ATLAS_MAX_LOOKAHEAD = 16  # the most draft tokens the confidence-aware controller may choose per step


@dataclass
class Decision:
    """One step's choice.

    Attributes:
        speculator: name of the speculator that drafts, or None to decode plainly.
        lookahead: most draft tokens it may propose (0 = plain decoding).
        proposal: the draft it proposed (empty until drafted, and for plain decoding).
    """

    speculator: Optional[str]
    lookahead: int
    proposal: DraftProposal = field(default_factory=DraftProposal)


def draft_with(spec: Speculator, ctx: ProposeContext, k: int) -> DraftProposal:
    """``spec.propose(ctx, k)`` with the proposal's ``speculator`` field filled in."""
    d = spec.propose(ctx, k)
    d.speculator = d.speculator or spec.name
    return d


class Controller:
    """Protocol: pick the speculator and k for each step, learn from the outcome.

    Simple controllers override :meth:`decide` (a name and k); the base
    :meth:`propose` then drafts with that speculator. A controller that must
    see drafts before it decides overrides :meth:`propose`.

    Attributes:
        name: key of its learned state in snapshots.
        speculators: the speculators it drafts with (the engine adds them to
            the ones it keeps informed).
    """

    name: str = "controller"
    speculators: Sequence[Speculator] = ()

    def decide(self, ctx: ProposeContext, max_lookahead: int) -> Decision:
        """Choose the speculator and k (``0 <= k <= max_lookahead``) for one step.

        Args:
            ctx: the request as speculators see it (read-only).
            max_lookahead: the most draft tokens the token budget and context
                window allow this step.
        """
        raise NotImplementedError

    def propose(self, ctx: ProposeContext, max_lookahead: int,
                speculators: Mapping[str, Speculator]) -> Decision:
        """Decide, then draft with the chosen speculator (from ``speculators`` by name).

        Raises:
            KeyError: :meth:`decide` named a speculator not in ``speculators``.
        """
        decision = self.decide(ctx, max_lookahead)
        if decision.speculator is None or decision.lookahead <= 0:
            return Decision(None, 0)
        decision.proposal = draft_with(speculators[decision.speculator], ctx, decision.lookahead)
        return decision

    def start_request(self, request_id: str, prompt_ids: Sequence[int], tenant: str = DEFAULT_TENANT) -> None:
        """A request begins (default: nothing)."""

    def observe(self, request_id: str, token_ids: Sequence[int], num_accepted: int, num_draft_tokens: int) -> None:
        """The step committed ``token_ids``; ``num_accepted`` of ``num_draft_tokens`` drafts were accepted."""

    def on_verify(self, tokens_fed: int, forward_s: float) -> None:
        """One target forward over ``tokens_fed`` tokens took ``forward_s`` seconds (the forward alone)."""

    def stop_request(self, request_id: str) -> None:
        """The request finished or was cancelled."""

    def on_policy_update(self, version: int) -> None:
        """The target's weights changed (policy ``version``); default: nothing to do."""

    def reset_estimate(self, speculator: str, tenant: Optional[str] = None,
                       prior: float | Sequence[float] | None = None, mode: Optional[str] = None) -> None:
        """A new version of ``speculator`` was published (or rolled back): forget its acceptance history.

        Default: nothing to forget (a controller without estimates). See
        :meth:`ConfidenceAwareController.reset_estimate` for the arguments.
        """

    def state_dict(self) -> dict[str, Any]:
        """Learned state to persist (default: none)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output.

        Raises:
            ValueError: a state this controller cannot hold.
        """
        if state:
            raise ValueError(f"controller {self.name} holds no learned state, got keys {sorted(state)}")


class FixedController(Controller):
    """Always the same speculator with the same lookahead, clipped to the bound.

    Args:
        speculator: the speculator, or None for plain decoding.
        lookahead: k >= 0.

    Raises:
        ValueError: a negative lookahead.
    """

    name = "fixed"

    def __init__(self, speculator: Optional[Speculator], lookahead: int) -> None:
        if lookahead < 0:
            raise ValueError(f"lookahead must be >= 0, got {lookahead}")
        self.speculator = speculator
        self.speculators = [speculator] if speculator is not None else []
        self.lookahead = lookahead

    def decide(self, ctx: ProposeContext, max_lookahead: int) -> Decision:
        k = min(self.lookahead, max_lookahead)
        if self.speculator is None or k <= 0:
            return Decision(None, 0)
        return Decision(self.speculator.name, k)

    def propose(self, ctx: ProposeContext, max_lookahead: int,
                speculators: Mapping[str, Speculator]) -> Decision:
        decision = self.decide(ctx, max_lookahead)
        if decision.speculator is None:
            return decision
        decision.proposal = draft_with(self.speculator, ctx, decision.lookahead)
        return decision


# --------------------------------------------------------------------------
# The confidence-aware controller (ATLAS mode)
# --------------------------------------------------------------------------


@dataclass
class _PendingDraft:
    speculator: str
    token_ids: list[int]
    confidence: Optional[list[float]]
    chosen: bool
    mode: str = "greedy"  # "greedy" or "sampled": estimates are kept per mode
    sampled_draft: bool = False  # drawn from draft_probs (judged only when verified)


@dataclass
class _PendingTree:
    tree: TokenTree
    mode: str


class ConfidenceAwareController(Controller):
    """The confidence-aware controller (ATLAS mode): which speculator drafts, and how far ahead.

    Each step it decides which child speculator drafts, and how far ahead, to
    maximise expected tokens per second (``choose_lookahead``), and decodes
    plainly (no draft) when nothing pays. Token ids and probabilities in,
    a decision out: it runs unchanged inside the engine or, wrapped as one
    drafter, in vLLM's ``custom_class`` proposer hook.

    Per step:

    1. the **adaptive** speculator (cheap, model-free) drafts up to the bound;
       its per-token confidences are calibrated by this tenant's decayed
       acceptance history into acceptance probabilities;
    2. the model-based **heads**, the **static** speculator and, when given,
       the **learned** one (a draft head fine-tuned online, :mod:`adaspec.online`):
       each one's expected acceptance per position comes from its own decayed
       history and, with its own measured drafting cost, gives its expected
       tokens per second; only the best of them is asked to draft, and only if
       that beats the adaptive draft (ties go to the static head, the floor);
       its own draft probabilities (confidence) then cut the draft where
       extending no longer pays. A head that returns an empty draft (e.g. no
       learned version for this tenant yet) is not available this step: the
       next best head drafts instead, and nothing is judged;
    3. the better plan, by expected tokens per second, is returned; plain
       decoding wins when none beats ``1 / verify_ms(1)``.

    Estimates are kept per speculator, tenant and mode (greedy or sampled
    requests): a deterministic draft token is accepted with the target's p(x),
    a sampled one with min(1, p(x)/q(x)). Under sampling, a draft drawn from
    ``draft_probs`` is judged by its position estimates, since its confidence
    q(x) says nothing about min(1, p/q), and it is not judged in the shadow,
    because matching the target's sample is rarer than acceptance.

    Learning: the engine shows every committed token to every speculator; the
    controller judges the drafts it asked for. The adaptive draft is
    also judged in the shadow when it was not chosen (its tokens compared with
    what the target committed, up to what is known), so its estimate keeps
    rising while the static one carries the load - that is how the controller
    shifts to the adaptive speculator as it learns, and back after a drift.

    Exploration: a head whose estimates were not fed for ``explore_every``
    steps of a tenant drafts ``explore_tokens`` tokens beside the step's plan
    (one head per step, the one idle longest), judged in the shadow, so a head
    that went low in one domain, or a learned head that improved, is found
    again; one that worsens is dropped by the same judging. Under sampling a
    draft drawn from ``draft_probs`` cannot be judged in the shadow, so such an
    exploration draft (a head's, or the adaptive speculator's when its sampled
    drafts stopped paying) is verified instead, as that step's draft: sampled
    estimates recover too. :meth:`reset_estimate` re-primes one speculator's
    estimates when a new version of it is published or rolled back.

    Args:
        static: the static speculator (e.g. the draft head), or None.
        adaptive: the adaptive speculator (e.g. suffix), or None.
        cost_model: measured costs (verify time by tokens fed; draft time).
        static_prior: prior acceptance per position for the static speculator
            (e.g. its held-out acceptance rate). Default 0.5.
        max_lookahead: the most draft tokens in any step. Default 16.
        decay: per-observation decay of the acceptance estimates. Default 0.98.
        explore_every: when a head's estimates (static or learned) were not fed
            for this many steps of a tenant, it drafts ``explore_tokens`` tokens
            in the shadow (judged, not verified; verified under sampling when
            drawn from ``draft_probs``, see Exploration above), so an estimate
            that went low in one domain can recover in the next. 0 disables.
            Default 32 (one short draft every 32 steps: a small share of decode
            time, see BENCHMARKS.md).
        explore_tokens: length of an exploration draft. Default 4.
        tree: tree mode (``--speculator atlas-tree``): every step merges the
            speculators' candidates into one token tree (see
            :meth:`_decide_tree`) instead of choosing one chain. Default False.
        lookup: a prompt-lookup speculator whose matches join the tree (tree
            mode only), or None.
        tree_width: branches per expanded node and frontier width of the
            static speculator's tree. Default 3.
        max_tree_nodes: the most nodes of a tree (besides the engine's bound).
            Default 16.
        learned: a second model-based head beside ``static`` (the learned
            adaptive speculator, e.g. ``"learned_head"``), judged exactly like
            it with its own estimates and drafting cost, or None. It never
            replaces the static head: both stay candidates every step.
        learned_prior: prior acceptance per position for the learned head.
            Default 0.5.

    Raises:
        ValueError: no speculator at all, two with one name, ``explore_every < 0``,
            ``explore_tokens < 1``, ``tree_width < 1`` or ``max_tree_nodes < 1``.

    Tree mode, per step: the adaptive speculator's speculation tree (its most
    frequent continuations), prompt lookup's matches, and, when its estimates
    say it pays (as in chain mode), the best head's dynamic tree (EAGLE-2;
    the static or the learned head, one per step, the other by exploration)
    are merged (a shared prefix is one node). Each node's value is
    the probability that it is accepted: the product along its path of the
    calibrated acceptance estimate of each node (the best of its claims;
    siblings exclude each other, so their estimates are scaled to sum to at
    most 1). :func:`adaspec.estimates.size_tree` then
    keeps the most valuable nodes up to the count that maximises expected
    tokens per second under the measured cost curve by tokens fed; a chain is
    the one-branch case and plain decoding the empty tree. Every candidate
    node whose parent is on the committed path is judged (verified ones by
    their verification, pruned ones in the shadow); a speculator's first
    choice under a parent and its alternatives have separate estimates
    (``name`` and ``name + ":alt"``), since alternatives are right less often.
    """

    name = "atlas"

    def __init__(
        self,
        static: Optional[Speculator] = None,
        adaptive: Optional[Speculator] = None,
        cost_model: Optional[CostModel] = None,
        static_prior: float = 0.5,
        max_lookahead: int = ATLAS_MAX_LOOKAHEAD,
        decay: float = 0.98,
        explore_every: int = 32,
        explore_tokens: int = 4,
        tree: bool = False,
        lookup: Optional[Speculator] = None,
        tree_width: int = 3,
        max_tree_nodes: int = 16,
        learned: Optional[Speculator] = None,
        learned_prior: float = 0.5,
    ) -> None:
        if static is None and adaptive is None and learned is None:
            raise ValueError("ConfidenceAwareController needs a static, an adaptive or a learned speculator")
        named = [s.name for s in (static, adaptive, learned, lookup) if s is not None]
        if len(set(named)) != len(named):
            raise ValueError(f"the controller's speculators need distinct names, got {named}")
        self.static, self.adaptive, self.learned = static, adaptive, learned
        self.children = [s for s in (static, adaptive, learned) if s is not None]
        self.lookup = lookup
        self.speculators = self.children + ([lookup] if lookup is not None else [])
        if tree_width < 1 or max_tree_nodes < 1:
            raise ValueError("tree_width and max_tree_nodes must be >= 1")
        self.tree, self.tree_width, self.max_tree_nodes = tree, tree_width, max_tree_nodes
        self.costs = cost_model or CostModel()
        self.static_prior, self.learned_prior = static_prior, learned_prior
        self.max_lookahead = max_lookahead
        self.decay = decay
        if explore_every < 0 or explore_tokens < 1:
            raise ValueError("explore_every must be >= 0 and explore_tokens >= 1")
        self.explore_every, self.explore_tokens = explore_every, explore_tokens
        # (speculator, tenant) -> steps since its estimates were last fed (verified or judged in the shadow)
        self._idle: dict[tuple[str, str], int] = {}
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

    def _default_prior(self, speculator: str) -> float:
        if speculator.endswith(ALT_SUFFIX):  # a tree's alternatives start doubtful
            return 0.1
        if self.static is not None and speculator == self.static.name:
            return self.static_prior
        if self.learned is not None and speculator == self.learned.name:
            return self.learned_prior
        return 0.3

    def _new_estimator(self, speculator: str, max_positions: Optional[int] = None) -> AcceptanceEstimator:
        return AcceptanceEstimator(prior=self._default_prior(speculator), decay=self.decay,
                                   max_positions=max_positions or self.max_lookahead)

    @property
    def heads(self) -> list[Speculator]:
        """The model-based drafters, static first (the floor), then the learned one; at most one drafts per step."""
        return [s for s in (self.static, self.learned) if s is not None]

    def reset_estimate(self, speculator: str, tenant: Optional[str] = None,
                       prior: float | Sequence[float] | None = None, mode: Optional[str] = None) -> None:
        """Forget ``speculator``'s acceptance history and start again from ``prior``.

        For a learner that publishes a new version of a speculator (or rolls one
        back) under the same name: the old version's history must not stick to
        the new one. Both views are re-primed (per-position acceptance to
        ``prior``, confidence calibration to its fresh prior, each with the
        prior's pseudo-count of 2), tree mode's alternatives estimate
        (``speculator + ":alt"``) too, and the drafts of that speculator still
        waiting to be judged are dropped. The speculator is then due for
        exploration, so its next steps judge the new version even where another
        drafter carries the load.

        Args:
            speculator: the speculator's name (e.g. ``"learned_head"``).
            tenant: whose estimates; None for every tenant that has some (tenants
                without estimates start from the constructor's prior anyway).
            prior: acceptance per draft position, each conditional on the earlier
                positions accepted: one float for every position, or a list
                (position i gets ``prior[i]``, positions past its end its last
                value); each in [0, 1]. None: the constructor's prior for this
                speculator (``static_prior``, ``learned_prior``, else 0.3).
            mode: "greedy" or "sampled"; None for both.

        Raises:
            ValueError: a prior outside [0, 1], an empty prior list, or an unknown mode.
        """
        if mode not in (None, "greedy", "sampled"):
            raise ValueError(f"mode must be 'greedy', 'sampled' or None, got {mode!r}")
        if prior is None:
            priors: list[float] = [self._default_prior(speculator)]
        elif isinstance(prior, (int, float)):
            priors = [float(prior)]
        else:
            priors = [float(p) for p in prior]
        if not priors or not all(0.0 <= p <= 1.0 for p in priors):
            raise ValueError(f"prior must be in [0, 1] (a float or a non-empty list), got {prior!r}")
        modes = ("greedy", "sampled") if mode is None else (mode,)
        tenants = ({te for (sp, te, _) in self._estimators if sp == speculator} | {te for (_, te) in self._idle})
        tenants = tenants if tenant is None else {tenant}
        for te in tenants:
            for mo in modes:
                est = self._new_estimator(speculator)
                for i, b in enumerate(est.position):
                    p = priors[min(i, len(priors) - 1)]
                    b.accepted, b.rejected = p * est.prior_weight, (1.0 - p) * est.prior_weight
                self._estimators[(speculator, te, mo)] = est
                alt = (speculator + ALT_SUFFIX, te, mo)
                if alt in self._estimators:
                    self._estimators[alt] = self._new_estimator(alt[0])
            if self.explore_every > 0:
                self._idle[(speculator, te)] = self.explore_every
        for rid, pend in self._pending.items():
            if tenant is None or self._tenant_of.get(rid, DEFAULT_TENANT) == tenant:
                pend[:] = [p for p in pend if getattr(p, "speculator", None) != speculator]

    # ---------------------------------------------------------------- lifecycle
    def start_request(self, request_id: str, prompt_ids: Sequence[int], tenant: str = DEFAULT_TENANT) -> None:
        self._tenant_of[request_id] = tenant

    def stop_request(self, request_id: str) -> None:
        self._tenant_of.pop(request_id, None)
        self._pending.pop(request_id, None)

    def on_verify(self, tokens_fed: int, forward_s: float) -> None:
        self.costs.observe_verify(tokens_fed, forward_s * 1000.0)

    #: After a policy update every acceptance estimate keeps this share of its evidence
    #: (pseudo-counts scaled, prior included), so the next observations move it faster.
    POLICY_UPDATE_KEEP = 0.25

    def accept_probs(self, draft: DraftProposal, tenant: str, temperature: float) -> list[float]:
        """Per-position acceptance estimates of ``draft`` (each conditional on the earlier positions):
        its speculator's calibrated confidence, or its position estimates where the confidence says
        nothing (no confidence, or a draft sampled from ``draft_probs`` in a sampled request)."""
        mode = "greedy" if is_greedy(temperature) else "sampled"
        est = self.estimator(draft.speculator, tenant, mode)
        if draft.confidence and not (mode == "sampled" and draft.draft_probs is not None):
            return est.calibrated(draft.confidence)
        return est.position_probs(draft.num_draft_tokens)

    def on_policy_update(self, version: int) -> None:
        """The target's weights changed: shrink every acceptance estimate's evidence to
        :attr:`POLICY_UPDATE_KEEP` of itself (its mean stays; the next judged drafts weigh
        ~1/keep times more). The cost model is kept (the weights' shapes did not change)."""
        for est in self._estimators.values():
            est.shrink(self.POLICY_UPDATE_KEEP)

    def decide(self, ctx: ProposeContext, max_lookahead: int) -> Decision:
        """Not used: this controller must see the adaptive draft first (see :meth:`propose`)."""
        raise NotImplementedError("ConfidenceAwareController decides in propose()")

    def propose(self, ctx: ProposeContext, max_lookahead: int,
                speculators: Optional[Mapping[str, Speculator]] = None) -> Decision:
        """Draft with the speculator and k that maximise expected tokens per second.

        Args:
            ctx: the request.
            max_lookahead: the engine's bound (token budget, context window);
                further capped at ``max_lookahead`` given at construction.
            speculators: ignored (this controller drafts with its own).

        Returns:
            The decision, with its draft; ``Decision(None, 0)`` when plain decoding pays most.
        """
        t0 = _time.perf_counter()
        self._child_s = 0.0
        out = self._decide_tree(ctx, max_lookahead) if self.tree else self._decide(ctx, max_lookahead)
        self.decision_time_s += _time.perf_counter() - t0 - self._child_s
        if out.tree is not None:
            return Decision("tree", out.tree.num_nodes, out) if out.tree.num_nodes else Decision(None, 0)
        if not out.num_draft_tokens:
            return Decision(None, 0)
        return Decision(out.speculator, out.num_draft_tokens, out)

    def _decide(self, ctx: ProposeContext, max_draft_tokens: int) -> DraftProposal:
        bound = min(max_draft_tokens, self.max_lookahead)
        # Acceptance differs between greedy and sampled requests (a sampled draft
        # token is accepted with min(1, p/q), a deterministic one with p), so each
        # mode has its own estimates; and a draft sampled from draft_probs has a
        # confidence q(x) that says nothing about min(1, p/q): position estimates
        # then replace the confidence calibration.
        mode = "greedy" if is_greedy(ctx.temperature) else "sampled"
        tenant = ctx.tenant

        def accept_probs(est: AcceptanceEstimator, d: DraftProposal) -> list[float]:
            if d.confidence and not (mode == "sampled" and d.draft_probs is not None):
                return est.calibrated(d.confidence)
            return est.position_probs(d.num_draft_tokens)

        def pend(name: str, d: DraftProposal) -> _PendingDraft:
            return _PendingDraft(name, d.token_ids, d.confidence, chosen=False, mode=mode,
                                 sampled_draft=mode == "sampled" and d.draft_probs is not None)
        pending: list[_PendingDraft] = []
        self._pending[ctx.request_id] = pending
        verify_ms, base = self._batch_cost(ctx)
        plain_rate = 1000.0 * (base + 1.0) / max(verify_ms(1), 1e-6)
        plans: list[tuple[float, DraftProposal]] = []
        # An exploration draft sampled from draft_probs cannot be judged in the
        # shadow (see observe): it is verified instead, as this step's draft.
        forced: Optional[DraftProposal] = None

        if self.adaptive is not None and bound > 0 and not self._futile(ctx, mode, verify_ms, bound, base):
            t0 = _time.perf_counter()
            a = self._draft(self.adaptive, ctx, bound)
            dt = _time.perf_counter() - t0
            self._child_s += dt
            self.costs.observe_draft(self.adaptive.name, max(1, a.num_draft_tokens), dt * 1000)
            pending.append(pend(self.adaptive.name, a))
            if a.num_draft_tokens:
                est = self.estimator(self.adaptive.name, tenant, mode)
                probs = accept_probs(est, a)
                k, rate = choose_lookahead(probs, self.costs.draft_ms_per_token(self.adaptive.name), verify_ms,
                                           a.num_draft_tokens, base_tokens=base)
                if k > 0:
                    plans.append((rate, _truncate(a, k, expected_emitted(probs[:k]))))
                elif pending[-1].sampled_draft and self._due(self.adaptive.name, tenant):
                    forced = _truncate(a, min(self.explore_tokens, a.num_draft_tokens))

        heads = self.heads
        if heads and bound > 0:
            # The model-based heads (static, learned): each one's expected tokens per
            # second from its position estimates and measured drafting cost. At most
            # one drafts for real, the best that beats every other plan; ties go to
            # the static head (the floor). The others keep a chance by exploration.
            best_other = max((r for r, _ in plans), default=plain_rate)
            scored = []
            for rank, h in enumerate(heads):
                est = self.estimator(h.name, tenant, mode)
                k, rate = choose_lookahead(est.position_probs(bound), self._head_draft_ms(h), verify_ms, bound,
                                           base_tokens=base)
                scored.append((rate, -rank, k, h))
            payers = [(k, h) for rate, _, k, h in sorted(scored, key=lambda s: (s[0], s[1]), reverse=True)
                      if k > 0 and rate > best_other]
            first = payers[0][1] if payers else None
            explorer = None
            if self.explore_every > 0:
                due = [h for h in heads if h is not first and self._due(h.name, tenant)]
                if due:  # one exploration per step at most: the head idle longest
                    explorer = max(due, key=lambda h: self._idle.get((h.name, tenant), 0))

            def head_plan(h: Speculator, s: DraftProposal) -> None:
                probs = accept_probs(self.estimator(h.name, tenant, mode), s)
                # drafting already paid
                k2, rate2 = choose_lookahead(probs, 0.0, verify_ms, s.num_draft_tokens, base_tokens=base)
                if k2 > 0:
                    plans.append((rate2, _truncate(s, k2, expected_emitted(probs[:k2]))))

            explored = None
            if explorer is not None:
                e = self._draft_head(explorer, ctx, min(self.explore_tokens, bound))
                if e.num_draft_tokens:  # empty: not available this step
                    explored = explorer
                    pending.append(pend(explorer.name, e))
                    if pending[-1].sampled_draft:
                        forced = e
                    else:  # judged in the shadow; verified only if its draft beats every other plan
                        head_plan(explorer, e)
            if forced is None:
                for k, h in payers:
                    if h is explored:
                        continue
                    s = self._draft_head(h, ctx, k)
                    if not s.num_draft_tokens:
                        continue  # not available this step (e.g. no learned version for this tenant yet)
                    # Not chosen, it is still judged in the shadow (see observe).
                    pending.append(pend(h.name, s))
                    head_plan(h, s)
                    break  # one head drafts for real per step

        best: Optional[DraftProposal] = None
        if forced is not None:
            best = forced
        elif plans:
            best = max(plans, key=lambda p: p[0])[1]
        for p in pending:
            p.chosen = best is not None and p.speculator == best.speculator
        # Steps since each speculator's estimates were last fed (verified, or judged in the shadow).
        fed = {p.speculator for p in pending if p.chosen or (p.token_ids and not p.sampled_draft)}
        for s in ([self.adaptive] if self.adaptive is not None else []) + heads:
            key = (s.name, tenant)
            self._idle[key] = 0 if s.name in fed else self._idle.get(key, 0) + 1
        if best is None:
            self.choices[NO_SPECULATOR] = self.choices.get(NO_SPECULATOR, 0) + 1
            return DraftProposal(speculator=NO_SPECULATOR)
        self.choices[best.speculator] = self.choices.get(best.speculator, 0) + 1
        return best

    def _due(self, name: str, tenant: str) -> bool:
        """Exploration is due: ``name``'s estimates for ``tenant`` were not fed for ``explore_every`` steps."""
        return self.explore_every > 0 and self._idle.get((name, tenant), 0) >= self.explore_every

    def _head_draft_ms(self, head: Speculator) -> float:
        """Measured drafting ms per token of a model-based head. Before its first draft: the static
        head's (the learned head has the same network), else 0 (optimistic, so that a head is measured
        by drafting once rather than priced out by a guess: a draft model can cost a target forward)."""
        default = 0.0
        if self.static is not None and head is not self.static:
            default = self.costs.draft_ms_per_token(self.static.name, default=0.0)
        return self.costs.draft_ms_per_token(head.name, default=default)

    def _draft_head(self, head: Speculator, ctx: ProposeContext, k: int) -> DraftProposal:
        """Draft ``k`` tokens with a head, timed; an empty draft (not available) is not priced."""
        t0 = _time.perf_counter()
        d = self._draft(head, ctx, k)
        dt = _time.perf_counter() - t0
        self._child_s += dt
        if d.num_draft_tokens:
            self.costs.observe_draft(head.name, d.num_draft_tokens, dt * 1000)
        return d

    _draft = staticmethod(draft_with)

    def _futile(self, ctx: ProposeContext, mode: str, verify_ms, bound: int, base: float) -> bool:
        """In a batched step: True when no adaptive draft can pay, even with every token at its best estimate.

        The bound takes the highest acceptance any confidence bucket or position
        of the adaptive speculator's estimates holds; when even drafts that good
        do not raise the batch's tokens per second (a full batch, where a verify
        row costs what a decode row does), the draft is not made at all, so
        drafting time is not spent under load. Alone (``batch_rows == 0``) the
        controller always drafts, as before.
        """
        if ctx.batch_rows <= 0:
            return False
        est = self.estimator(self.adaptive.name, ctx.tenant, mode)
        p_hi = max([b.mean() for b in est.calibration] + [b.mean() for b in est.position])
        k, _ = choose_lookahead([p_hi] * bound, self.costs.draft_ms_per_token(self.adaptive.name), verify_ms, bound,
                                base_tokens=base)
        return k == 0

    def _batch_cost(self, ctx: ProposeContext):
        """``(verify_ms(n), base_tokens)`` for a request feeding n rows beside ``ctx.batch_rows`` others.

        Alone (``batch_rows == 0``) this is the single-request cost; in a batched
        step the price of n rows is the whole batch forward's and the rate
        maximised is the batch's (:func:`adaspec.estimates.choose_lookahead`).
        """
        rows = max(0, int(ctx.batch_rows))
        if rows == 0:
            return self.costs.verify_ms, float(ctx.batch_tokens)
        return (lambda n: self.costs.verify_ms(rows + n)), float(ctx.batch_tokens)

    # ---------------------------------------------------------------- tree mode
    def _timed(self, name: str, levels, fn):
        t0 = _time.perf_counter()
        out = fn()
        dt = _time.perf_counter() - t0
        self._child_s += dt
        self.costs.observe_draft(name, max(1, levels(out)), dt * 1000)
        return out

    def _decide_tree(self, ctx: ProposeContext, max_draft_tokens: int) -> DraftProposal:
        """Tree mode: merge every speculator's candidates into one token tree and size it by cost (see the class doc)."""
        mode = "greedy" if is_greedy(ctx.temperature) else "sampled"
        self._pending.pop(ctx.request_id, None)
        node_bound = min(max_draft_tokens, self.max_tree_nodes)
        depth_cap = min(max_draft_tokens, self.max_lookahead)
        verify_ms, base = self._batch_cost(ctx)
        tree = TokenTree()
        if node_bound <= 0:
            return DraftProposal(speculator="tree", tree=tree)
        for spec in (self.adaptive, self.lookup):
            if spec is None:
                continue
            if hasattr(spec, "propose_tree"):
                part = self._timed(spec.name, len, lambda: spec.propose_tree(ctx, max_nodes=node_bound,
                                                                            max_depth=depth_cap,
                                                                            branching=self.tree_width))
            else:
                part = TokenTree.from_chain(self._timed(spec.name, lambda d: d.num_draft_tokens,
                                                        lambda: self._draft(spec, ctx, depth_cap)))
            tree.merge(part)
        heads = self.heads
        if heads:
            # As in chain mode: at most one head's tree joins for real, the best by its
            # estimates and drafting cost that beats the tree so far (ties: the static
            # head); another head joins by exploration, judged with the whole tree.
            _, rate_now = size_tree(self._tree_values(tree, ctx.tenant, mode), tree.parents, verify_ms, node_bound,
                                    base_tokens=base)
            scored = []
            for rank, h in enumerate(heads):
                est = self.estimator(h.name, ctx.tenant, mode)
                k, rate = choose_lookahead(est.position_probs(depth_cap), self._head_draft_ms(h), verify_ms,
                                           depth_cap, base_tokens=base)
                scored.append((rate, -rank, k, h))
            payers = [(k, h) for rate, _, k, h in sorted(scored, key=lambda s: (s[0], s[1]), reverse=True)
                      if k > 0 and rate > rate_now]
            first = payers[0][1] if payers else None
            due = [h for h in heads if h is not first and self._due(h.name, ctx.tenant)]
            explorer = max(due, key=lambda h: self._idle.get((h.name, ctx.tenant), 0)) if due else None
            merged: set[str] = set()
            if explorer is not None:
                part = self._head_tree(explorer, ctx, min(self.explore_tokens, depth_cap))
                if part.num_nodes:  # empty: not available this step
                    tree.merge(part)
                    merged.add(explorer.name)
            for k, h in payers:
                if h is explorer:
                    continue
                part = self._head_tree(h, ctx, k)
                if part.num_nodes:
                    tree.merge(part)
                    merged.add(h.name)
                    break  # one head drafts for real per step
            for h in heads:
                key = (h.name, ctx.tenant)
                self._idle[key] = 0 if h.name in merged else self._idle.get(key, 0) + 1
        values = self._tree_values(tree, ctx.tenant, mode)
        keep, _ = size_tree(values, tree.parents, verify_ms, node_bound, base_tokens=base)
        if not keep:
            self.choices[NO_SPECULATOR] = self.choices.get(NO_SPECULATOR, 0) + 1
            return DraftProposal(speculator="tree", tree=TokenTree())
        for i in range(tree.num_nodes):
            tree.value[i] = values[i]
        sub = tree.subtree(keep, point_masses=True)  # chosen by value: sampled claims become point masses
        # The whole candidate tree is judged, the pruned nodes in the shadow, so an
        # estimate that priced a speculator's nodes out of the tree can recover.
        self._pending[ctx.request_id] = [_PendingTree(tree, mode)]  # type: ignore[list-item]
        self.choices["tree"] = self.choices.get("tree", 0) + 1
        return DraftProposal(speculator="tree", tree=sub, expected_tokens=1.0 + sum(values[i] for i in keep))

    def _head_tree(self, head: Speculator, ctx: ProposeContext, depth: int) -> TokenTree:
        """A head's candidate tree of ``depth`` levels (its chain where it has no ``propose_tree``), timed;
        an empty one (not available) is not priced."""
        t0 = _time.perf_counter()
        if hasattr(head, "propose_tree"):
            part = head.propose_tree(ctx, max_depth=depth, width=self.tree_width)
            levels = part.max_depth
        else:
            chain = self._draft(head, ctx, depth)
            part, levels = TokenTree.from_chain(chain), chain.num_draft_tokens
        dt = _time.perf_counter() - t0
        self._child_s += dt
        if part.num_nodes:
            self.costs.observe_draft(head.name, max(1, levels), dt * 1000)
        return part

    def _tree_values(self, tree: TokenTree, tenant: str, mode: str) -> list[float]:
        """Per node: the estimated probability that it is accepted (product of per-node estimates along its path)."""
        primary = _primary_children(tree)
        p_node: list[float] = []
        depths: list[int] = []
        for i in range(tree.num_nodes):
            par = tree.parents[i]
            depth = depths[par] + 1 if par >= 0 else 0  # 0 = the root's child
            depths.append(depth)
            best = 0.0
            for c in tree.claims[i]:
                est = self.estimator(c.source if primary[(par, c.source)] == i else c.source + ALT_SUFFIX, tenant, mode)
                p = est.calibrated([c.confidence])[0] if c.confidence is not None else est.position_probs(depth + 1)[depth]
                best = max(best, p)
            p_node.append(best)
        # One token is emitted per position under every rule (argmax, coupled draw,
        # rejection sampling): siblings exclude each other, so their probabilities sum to at most 1.
        for parent in [-1] + list(range(tree.num_nodes)):
            kids = tree.children(parent)
            total = sum(p_node[k] for k in kids)
            if total > 1.0:
                for k in kids:
                    p_node[k] /= total
        values: list[float] = []
        for i, par in enumerate(tree.parents):
            values.append(p_node[i] * (values[par] if par >= 0 else 1.0))
        return values

    def _judge_tree(self, request_id: str, pend: _PendingTree, token_ids: Sequence[int], num_accepted: int) -> None:
        """Judge every candidate node whose parent is on the committed path: right iff it is the committed token.

        ``pend.tree`` is the whole candidate tree (verified and pruned nodes):
        a verified node is thus judged by its verification (accepted iff on the
        accepted path), a pruned one in the shadow, against what the target
        committed (as chain mode judges an unchosen draft).
        """
        tenant = self._tenant_of.get(request_id, DEFAULT_TENANT)
        tree = pend.tree
        known = len(token_ids)  # tokens known at depths 1..known
        depth_of: dict[int, int] = {-1: 0}  # reached nodes -> depth
        node = -1
        for t in token_ids[:known]:
            nxt = tree.child(node, t)
            if nxt is None:
                break
            depth_of[nxt] = depth_of[node] + 1
            node = nxt
        primary = _primary_children(tree)
        for i, par in enumerate(tree.parents):
            d = depth_of.get(par)
            if d is None or d + 1 > known:
                continue
            ok = i in depth_of
            for c in tree.claims[i]:
                first = primary[(par, c.source)] == i
                # A speculator's first choice and its alternatives are estimated apart: an
                # alternative is right less often than a first choice of the same confidence.
                name = c.source if first else c.source + ALT_SUFFIX
                self.estimator(name, tenant, pend.mode).observe_node(d, c.confidence, ok)

    def observe(self, request_id: str, token_ids: Sequence[int], num_accepted: int, num_draft_tokens: int) -> None:
        """Judge this step's drafts: the chosen one by its verification, the others in the shadow."""
        t0 = _time.perf_counter()
        self._judge(request_id, token_ids, num_accepted, num_draft_tokens)
        self.decision_time_s += _time.perf_counter() - t0

    def _judge(self, request_id: str, token_ids: Sequence[int], num_accepted: int, num_draft_tokens: int) -> None:
        tenant = self._tenant_of.get(request_id, DEFAULT_TENANT)
        for p in self._pending.pop(request_id, []):
            if isinstance(p, _PendingTree):
                self._judge_tree(request_id, p, token_ids, num_accepted)
                continue
            est = self.estimator(p.speculator, tenant, p.mode)
            if p.chosen:
                est.observe(num_draft_tokens, num_accepted, p.confidence)
            elif p.token_ids and not p.sampled_draft:
                # (A sampled draft token matches the target's sample less often than
                # rejection sampling would accept it: judging it so would be biased.)
                # Shadow judgement: compare with what the target committed; positions
                # past the committed tokens are unknown and not judged.
                judged = min(len(p.token_ids), len(token_ids))
                est.observe(judged, common_prefix_len(p.token_ids, token_ids), p.confidence)

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


def _primary_children(tree: TokenTree) -> dict[tuple[int, str], int]:
    """``(parent, source) -> node``: each speculator's first choice under each parent (its most confident child)."""
    primary: dict[tuple[int, str], int] = {}
    best: dict[tuple[int, str], float] = {}
    for i, par in enumerate(tree.parents):
        for c in tree.claims[i]:
            key = (par, c.source)
            conf = c.confidence if c.confidence is not None else 0.0
            if key not in primary or conf > best[key]:
                primary[key], best[key] = i, conf
    return primary


def _truncate(d: DraftProposal, k: int, expected_tokens: Optional[float] = None) -> DraftProposal:
    return DraftProposal(
        token_ids=d.token_ids[:k],
        draft_probs=d.draft_probs[:k] if d.draft_probs is not None else None,
        confidence=d.confidence[:k] if d.confidence is not None else None,
        speculator=d.speculator,
        expected_tokens=expected_tokens,
    )
