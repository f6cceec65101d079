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
- ``mode="batched"`` decodes the group's samples together without speculation,
  one token each per target forward (:meth:`adaspec.model.target.LeanTarget.forward_batch`,
  lean core only): the plain-decoding alternative that shares the weights'
  memory traffic across the group.

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

from adaspec.types import DEFAULT_TENANT, DraftProposal, SamplingParams, SpeculationStats

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
        mode: "sequential" (speculative, one sample after another) or "batched"
            (plain decoding of the group in one forward per token; lean core).

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
    """Plain decoding of ``states`` together: one target forward feeds each live sample's last token."""
    from adaspec.model.decoder import BatchRequest

    proposal = DraftProposal()
    while True:
        live = [st for st in states if not st.finished]
        if not live:
            return
        t0 = time.perf_counter()
        outs = engine.target.forward_batch([BatchRequest(st.kv, [st.token_ids[-1]]) for st in live])
        forward_s = time.perf_counter() - t0
        for st, out in zip(live, outs):
            result = engine._evaluate(st, out.logits, proposal)  # one row: a plain draw
            committed = engine._commit(st, result, out.logits)
            st.hidden_state = out.hidden[-1]
            st.stats.verify_time_s += forward_s / len(live)
            st.stats.record("none", 0, 0, len(committed))
            engine._after_verify(st, 1, forward_s / len(live), committed, 0, 0)
