"""Group rollouts for RL training (GRPO and its relatives): G samples of each prompt.

:func:`rollout` samples every prompt ``n`` times and returns what a trainer
needs: the prompt's token ids, each sample's completion token ids and the
target's logprob of each sampled token.

How a group runs:

- one prefill per prompt; the other ``n - 1`` samples start from a copy of its
  KV cache (:meth:`adaspec.engine.Engine.fork`), so a group of G costs one
  prefill, not G;
- ``mode="sequential"`` (default) decodes the samples one after another with
  the engine's speculation: the adaptive (suffix) speculator indexes every
  committed token of the tenant at once, so each sample drafts from the
  group's earlier samples and from earlier rounds' samples of the same prompt
  (its tenant structure, weighted toward recent policy versions, see
  :meth:`adaspec.speculators.suffix.SuffixSpeculator.on_policy_update`);
- ``mode="batched"`` decodes the group's samples together: every step feeds
  each live sample's last token and its drafts in one target forward
  (:meth:`adaspec.model.target.LeanTarget.forward_batch`, lean core only), so
  the weights' memory traffic is shared across the group; on an engine
  without speculators this is plain batched decoding, with them the samples
  also draft from each other's output so far.

Exactness: every sample is a draw from the target's distribution under
``params`` (rejection sampling keeps it whatever the drafts); each sample has
its own generator (``params.seed + i`` for sample i when a seed is given).

Logprobs: ``log_softmax`` of the target's raw logits at each sampled token
(the engine's logprobs; temperature 1, no top-k / top-p), which is the
sampling distribution's own at temperature 1 without truncation, the usual
GRPO setting. The values come from the served weights (int8 or fp32; see
``bench rl`` for the int8-vs-fp32 mismatch).
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from dataclasses import dataclass, field
from typing import Optional, Sequence

from adaspec.controller import NO_SPECULATOR
from adaspec.types import DEFAULT_TENANT, SamplingParams, SpeculationStats

ROLLOUT_MODES = ("sequential", "batched")


@dataclass
class RolloutSample:
    """One sampled completion.

    Attributes:
        completion_ids: the sampled token ids (stop token included when it ended the sample).
        logprobs: the target's logprob of each of them (natural log), same length.
        finish_reason: "stop" or "length".
        policy_version: the target weights version that produced every token.
        stats: the sample's speculation statistics.
    """

    completion_ids: list[int]
    logprobs: list[float]
    finish_reason: str
    policy_version: int
    stats: SpeculationStats = field(default_factory=SpeculationStats)


@dataclass
class RolloutGroup:
    """The ``n`` samples of one prompt.

    Attributes:
        prompt_ids: the prompt's token ids (after the chat template with ``chat``).
        samples: ``n`` :class:`RolloutSample`.
        elapsed_s: wall time of the group (prefill included).
    """

    prompt_ids: list[int]
    samples: list[RolloutSample]
    elapsed_s: float = 0.0

    @property
    def num_completion_tokens(self) -> int:
        return sum(len(s.completion_ids) for s in self.samples)


def rollout(engine, prompts: Sequence[str | Sequence[int]], n: int, params: Optional[SamplingParams] = None, *,
            chat: bool = False, tenant: str = DEFAULT_TENANT, mode: str = "sequential") -> list[RolloutGroup]:
    """Sample each prompt ``n`` times on ``engine``; one group per prompt, in order.

    Args:
        engine: an :class:`adaspec.engine.Engine`.
        prompts: texts (tokenized; with ``chat`` each is one user message in the
            chat template) or token id lists.
        n: samples per prompt (G), 1..:data:`adaspec.types.MAX_N`.
        params: sampling settings (default: temperature 1, 64 tokens); ``logprobs``
            is forced on (0 alternatives).
        tenant: whose learned state the samples feed and draft from.
        mode: "sequential" (one sample after another) or "batched" (the group's
            samples step together, one forward per step; lean core).

    Returns:
        one :class:`RolloutGroup` per prompt.

    Raises:
        ValueError: ``n`` out of range, an unknown mode, invalid params or prompt,
            "batched" on a runtime without batched forwards or with a grammar.
    """
    from adaspec.types import MAX_N

    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_N:
        raise ValueError(f"n must be an integer in [1, {MAX_N}], got {n!r}")
    if mode not in ROLLOUT_MODES:
        raise ValueError(f"mode must be one of {ROLLOUT_MODES}, got {mode!r}")
    params = dataclasses.replace(params or SamplingParams(temperature=1.0, max_tokens=64),
                                 logprobs=0 if (params is None or params.logprobs is None) else params.logprobs)
    params.validate()
    if mode == "batched" and (not hasattr(engine.target, "forward_batch") or params.constrained):
        raise ValueError("batched rollouts need the lean core and no grammar, logit bias or penalties")
    groups = []
    for prompt in prompts:
        ids = engine.encode_prompt(prompt, chat=chat)
        t0 = time.perf_counter()
        states = _start_group(engine, ids, n, params, tenant)
        try:
            if mode == "batched":
                _decode_batched(engine, states)
            else:
                for st in states:
                    while not st.finished:
                        engine.step(st)
        except BaseException:
            for st in states:
                engine.abort(st)
            raise
        samples = [RolloutSample(completion_ids=list(st.output_ids), logprobs=[lp.logprob for lp in st.logprobs],
                                 finish_reason=st.finish_reason or "abort", policy_version=st.policy_version,
                                 stats=st.stats) for st in states]
        groups.append(RolloutGroup(prompt_ids=list(states[0].prompt_ids), samples=samples,
                                   elapsed_s=time.perf_counter() - t0))
    return groups


def _start_group(engine, ids: list[int], n: int, params: SamplingParams, tenant: str) -> list:
    """Start sample 0 (the prefill) and fork the others from it, each with its own seed."""
    def seeded(i: int) -> SamplingParams:
        return params if params.seed is None else dataclasses.replace(params, seed=params.seed + i)

    group = uuid.uuid4().hex[:12]
    first = engine.start(ids, seeded(0), tenant=tenant, request_id=f"rollout-{group}-0")
    states = [first]
    try:
        for i in range(1, n):
            states.append(engine.fork(first, request_id=f"rollout-{group}-{i}",
                                      seed=None if params.seed is None else params.seed + i))
    except BaseException:
        for st in states:
            engine.abort(st)
        raise
    return states


def _decode_batched(engine, states: list) -> None:
    """Decode ``states`` together: each step, every live sample's ``[last] + drafts`` in one target forward.

    The engine's controller drafts for each sample as in :meth:`adaspec.engine.Engine.step`
    (chains: a token tree is cut to its first branch); verification, commit and
    the KV truncate are the chain step's, per sample. The controller's cost model
    sees the batch's forward (all tokens fed, its time), so it learns what a
    batched verify costs, and :func:`budget_batch` keeps only the draft tokens
    that pay in the batch. Without speculators this is plain batched decoding.
    """
    from adaspec.engine import _first_branch
    from adaspec.model.decoder import BatchRequest

    target = engine.target
    while True:
        live = [st for st in states if not st.finished]
        if not live:
            return
        proposals = []
        for st in live:  # 1. propose, per sample
            t0 = time.perf_counter()
            _, prop = engine._propose(st)
            if prop.tree is not None:
                prop = _first_branch(prop.tree)
            proposals.append((prop, time.perf_counter() - t0))
        proposals = budget_batch(engine, live, proposals)
        reqs = [BatchRequest(st.kv, [st.token_ids[-1]] + prop.token_ids) for st, (prop, _) in zip(live, proposals)]
        t1 = time.perf_counter()
        outs = target.forward_batch(reqs)  # 2. one verify forward for the group
        forward_s = time.perf_counter() - t1
        fed = sum(len(r.token_ids) for r in reqs)
        engine.controller.on_verify(fed, forward_s)
        for spec in engine.speculators.values():
            spec.on_verify(fed, forward_s)
        for st, (prop, draft_s), out in zip(live, proposals, outs):
            result = engine._evaluate(st, out.logits, prop)  # 3. accept / reject
            committed = engine._commit(st, result, out.logits)  # 4. update
            if not st.finished:
                target.truncate(st.kv, len(st.token_ids) - 1)
                st.hidden_state = out.hidden[len(committed) - 1]
            name = prop.speculator if prop.num_draft_tokens else NO_SPECULATOR
            st.stats.draft_time_s += draft_s
            st.stats.verify_time_s += forward_s / len(live)
            st.stats.record(name, prop.num_draft_tokens, min(result.num_accepted, len(committed)), len(committed))
            engine.controller.observe(st.request_id, committed, result.num_accepted, prop.num_draft_tokens)
            for spec in engine.speculators.values():
                spec.observe(st.request_id, committed, result.num_accepted, prop.num_draft_tokens)
            if st.finished:
                engine._release(st)


def budget_batch(engine, live: list, proposals: list) -> list:
    """Cut the group's drafts to those that pay in one batched verify forward.

    Each sample emits one token for sure; draft position j of sample i adds its
    reach probability ``prod_{l <= j} a_il`` (``a``: the controller's calibrated
    per-position acceptance estimates, :meth:`ConfidenceAwareController.accept_probs`).
    Positions are added in order of reach probability (a sample's prefix
    first, as probabilities fall along a draft) while the expected tokens per
    millisecond ``E / verify_ms(tokens fed)`` of the whole forward still rises,
    under the controller's measured cost curve. On this CPU a batch of 8 rows
    already amortises the weights' memory traffic, so a draft token must be
    likely to be accepted to be worth its row. Controllers without estimates
    and a cost model keep their drafts as they are. Only drafts are dropped:
    exactness is untouched.

    Returns:
        ``proposals`` with each ``(DraftProposal, draft_s)`` cut.
    """
    from adaspec.engine import _sanitize

    ctrl = engine.controller
    costs = getattr(ctrl, "costs", None)
    if costs is None or not hasattr(ctrl, "accept_probs") or not any(p.num_draft_tokens for p, _ in proposals):
        return proposals
    cands = []  # (reach probability, sample, position)
    for i, (st, (prop, _)) in enumerate(zip(live, proposals)):
        reach = 1.0
        for j, a in enumerate(ctrl.accept_probs(prop, st.tenant, st.params.temperature)):
            reach *= a
            cands.append((reach, i, j))
    cands.sort(key=lambda c: (-c[0], c[1], c[2]))
    fed = len(live)
    expected = float(len(live))
    keep = [0] * len(live)
    for reach, i, j in cands:
        if j != keep[i]:  # a later position of a sample whose prefix was not kept
            continue
        if (expected + reach) / costs.verify_ms(fed + 1) <= expected / costs.verify_ms(fed):
            break
        expected += reach
        fed += 1
        keep[i] += 1
    vocab = engine.target.vocab_size
    return [(prop if keep[i] == prop.num_draft_tokens else _sanitize(prop, keep[i], vocab), draft_s)
            for i, (prop, draft_s) in enumerate(proposals)]
