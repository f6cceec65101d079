"""The controller: which speculator drafts each step, and how far ahead (k).

A controller is engine-agnostic: it reads a request's :class:`ProposeContext`
and the engine's bound on k, asks a speculator for a draft, and returns a
:class:`Decision` holding it. It follows the request lifecycle as speculators
do (``start_request`` -> (``propose`` -> ``observe``)* -> ``stop_request``,
plus ``on_verify`` with every measured target forward), so the same object
runs inside this engine and, wrapped as one drafter, inside vLLM's
``custom_class`` proposer hook (:mod:`adaspec.integrations.vllm_proposer`).

- :class:`FixedController`: one named speculator, one lookahead (``--speculator
  ngram|suffix|static``).
- :class:`ConfidenceAwareController`: the confidence-aware controller
  (``--speculator atlas``); its math (expected emitted tokens, the cost model,
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

    Learning: the engine shows every committed token to every speculator; the
    controller judges the drafts it asked for. The adaptive draft is
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
            can recover in the next. 0 disables. Default 32 (one short draft
            every 32 steps: a small share of decode time, see BENCHMARKS.md).
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

    Tree mode, per step: the adaptive speculator's speculation tree (its most
    frequent continuations), prompt lookup's matches, and, when its estimates
    say it pays (as in chain mode), the static speculator's dynamic tree
    (EAGLE-2) are merged (a shared prefix is one node). Each node's value is
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
    ) -> None:
        if static is None and adaptive is None:
            raise ValueError("ConfidenceAwareController needs a static or an adaptive speculator")
        self.static, self.adaptive = static, adaptive
        self.children = [s for s in (static, adaptive) if s is not None]
        self.lookup = lookup
        self.speculators = self.children + ([lookup] if lookup is not None else [])
        if tree_width < 1 or max_tree_nodes < 1:
            raise ValueError("tree_width and max_tree_nodes must be >= 1")
        self.tree, self.tree_width, self.max_tree_nodes = tree, tree_width, max_tree_nodes
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
        if speculator.endswith(ALT_SUFFIX):  # a tree's alternatives start doubtful
            prior = 0.1
        return AcceptanceEstimator(prior=prior, decay=self.decay, max_positions=max_positions or self.max_lookahead)

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
        plans: list[tuple[float, DraftProposal]] = []

        if self.adaptive is not None and bound > 0 and not self._futile(ctx, mode, verify_ms, bound, base):
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
                                           a.num_draft_tokens, base_tokens=base)
                if k > 0:
                    plans.append((rate, _truncate(a, k, expected_emitted(probs[:k]))))

        if self.static is not None and bound > 0:
            est = self.estimator(self.static.name, ctx.tenant, mode)
            draft_ms = self.costs.draft_ms_per_token(self.static.name, default=2.0)
            k, rate = choose_lookahead(est.position_probs(bound), draft_ms, verify_ms, bound, base_tokens=base)
            best_other = max((r for r, _ in plans), default=1000.0 * (base + 1.0) / max(verify_ms(1), 1e-6))
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
                    # drafting already paid
                    k2, rate2 = choose_lookahead(probs, 0.0, verify_ms, s.num_draft_tokens, base_tokens=base)
                    if k2 > 0:
                        plans.append((rate2, _truncate(s, k2, expected_emitted(probs[:k2]))))

        if not plans:
            self.choices[NO_SPECULATOR] = self.choices.get(NO_SPECULATOR, 0) + 1
            return DraftProposal(speculator=NO_SPECULATOR)
        _, best = max(plans, key=lambda p: p[0])
        for p in pending:
            p.chosen = p.speculator == best.speculator
        self.choices[best.speculator] = self.choices.get(best.speculator, 0) + 1
        return best

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
        if self.static is not None:
            est = self.estimator(self.static.name, ctx.tenant, mode)
            draft_ms = self.costs.draft_ms_per_token(self.static.name, default=2.0)
            k, rate = choose_lookahead(est.position_probs(depth_cap), draft_ms, verify_ms, depth_cap, base_tokens=base)
            _, rate_now = size_tree(self._tree_values(tree, ctx.tenant, mode), tree.parents, verify_ms, node_bound,
                                    base_tokens=base)
            idle = self._static_idle.get(ctx.tenant, 0)
            pays = k > 0 and rate > rate_now
            explore = not pays and self.explore_every > 0 and idle >= self.explore_every
            self._static_idle[ctx.tenant] = 0 if (pays or explore) else idle + 1
            if pays or explore:
                depth = k if pays else min(self.explore_tokens, depth_cap)
                static = self.static
                if hasattr(static, "propose_tree"):
                    part = self._timed(static.name, lambda t: t.max_depth,
                                       lambda: static.propose_tree(ctx, max_depth=depth, width=self.tree_width))
                else:
                    part = TokenTree.from_chain(self._timed(static.name, lambda d: d.num_draft_tokens,
                                                            lambda: self._draft(static, ctx, depth)))
                tree.merge(part)
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
