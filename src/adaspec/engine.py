"""The engine: request lifecycle and the speculative decode step loop.

The only module that knows every part. One step (Medusa's loop shape):

1. propose  - the controller picks a speculator and lookahead k; it drafts.
2. verify   - one target forward over [last committed token, drafts...].
3. evaluate - greedy match, coupled sampling (seeded requests) or rejection
              sampling (unseeded) decides what is emitted.
4. update   - commit tokens (stop conditions checked token by token), truncate
              the KV cache to the committed length, tell the controller and
              every speculator.

Each step returns a :class:`~adaspec.types.StepResult` (who drafted, k,
accepted, committed tokens, the forward's own time).

Invariant after every step: the KV cache holds every committed token (prompt +
output) except the newest, which the next step feeds first.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence

import torch

from adaspec.constraints import RequestConstraint
from adaspec.controller import NO_SPECULATOR, Controller, FixedController
from adaspec.sampling import process_logits
from adaspec.speculators.base import Speculator
from adaspec.target import KVCache, TargetModel
from adaspec.types import (
    DEFAULT_TENANT,
    DraftProposal,
    GenerationResult,
    ProposeContext,
    SamplingParams,
    SpeculationStats,
    StepResult,
    StreamDelta,
    TokenLogprob,
    TokenTree,
    TreeVerifyResult,
    Usage,
    VerifyResult,
)
from adaspec.verify import (
    verify_coupled,
    verify_greedy,
    verify_stochastic,
    verify_tree_coupled,
    verify_tree_greedy,
    verify_tree_stochastic,
)

_request_counter = itertools.count()

# Name a step's drafts go by when only the grammar drafted (its forced tokens).
GRAMMAR_DRAFTER = "grammar"
# Most grammar-forced tokens proposed in one step (before and after the speculator's draft,
# each): keeps one verify forward bounded when a grammar forces a long constant.
MAX_FORCED_DRAFT = 32
# Continuous batching: most prompt tokens prefilled in one batched step (over all new requests),
# so the others' decode steps, and time to first token under load, stay bounded.
BATCH_PREFILL_TOKENS = 256


@dataclass
class RequestState:
    """Everything the engine keeps for one live request."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    tenant: str
    kv: KVCache
    generator: torch.Generator
    token_ids: list[int]  # committed: prompt then output
    output_ids: list[int] = field(default_factory=list)
    logprobs: Optional[list[TokenLogprob]] = None
    hidden_state: Optional[torch.Tensor] = None  # [H], predicted token_ids[-1]
    stats: SpeculationStats = field(default_factory=SpeculationStats)
    finish_reason: Optional[str] = None
    text: str = ""  # final text (stop string excluded)
    stop_text_cut: Optional[int] = None  # char index where a stop string begins
    streamed_text_len: int = 0
    streamed_tokens: int = 0
    started_s: float = field(default_factory=time.perf_counter)
    first_token_s: Optional[float] = None
    # Grammar / logit bias / penalties (adaspec.constraints); None when the request has none.
    constraint: Optional[RequestConstraint] = None
    # Tokens whose KV is cached (prefilled or reused from the prefix cache); the prefill is
    # done at prefill_len: len(prompt_ids) - 1 (the last prompt token is fed by the first
    # step), or len(token_ids) - 1 for a preempted request recomputing its KV.
    prefill_pos: int = 0
    prefill_len: int = 0
    prefix_tokens_reused: int = 0  # of them, from the prefix cache
    prefix_looked_up: bool = False
    policy_version: int = 0  # the target weights version the request runs on (its KV cache's), start to end

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def prefilling(self) -> bool:
        """KV is still to be prefilled (started with ``prefill=False``, or preempted)."""
        return self.prefill_pos < self.prefill_len

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)


class BatchSpeculationGate:
    """Whether a continuous-batching step drafts at all, from the batch tokens per second measured both ways.

    The controller prices each request's draft against the cost curve of a batched
    forward, but not the Python-side work a draft adds per request (drafting,
    verifying, committing), which grows with the batch; under load that can make
    speculation slower than none. So per batch-size bucket (2-3, 4-7, 8-15, 16+
    decoding requests; a lone request always speculates) this keeps the mean
    tokens emitted per second of pure decode steps with drafting on and off, each
    an exponential moving average over about ``1 / alpha`` steps. Until both modes
    have ``warmup`` steps in a bucket they alternate; then the faster one runs,
    and the other is tried every ``explore_every``-th step, so a shift (a workload
    whose drafts start to pay, or stop) is seen. Off means plain decoding for that
    step: outputs do not change (speculation is lossless either way).

    Args:
        alpha: weight of the newest step in each average.
        warmup: steps of each mode per bucket before choosing.
        explore_every: one step in this many runs the slower mode.
    """

    def __init__(self, alpha: float = 0.1, warmup: int = 4, explore_every: int = 16):
        if not 0 < alpha <= 1 or warmup < 1 or explore_every < 2:
            raise ValueError(f"alpha must be in (0, 1], warmup >= 1, explore_every >= 2; got {alpha}, {warmup}, "
                             f"{explore_every}")
        self.alpha, self.warmup, self.explore_every = alpha, warmup, explore_every
        self._rate: dict[tuple[int, bool], float] = {}
        self._count: dict[tuple[int, bool], int] = {}
        self._steps: dict[int, int] = {}

    @staticmethod
    def bucket(batch: int) -> int:
        """0 for a lone request, else floor(log2(batch)) capped at 4 (16+)."""
        return 0 if batch <= 1 else min(4, batch.bit_length() - 1)

    def choose(self, batch: int) -> bool:
        """True: this step drafts (``batch`` decoding requests)."""
        b = self.bucket(batch)
        if b == 0:
            return True
        n = self._steps.get(b, 0)
        self._steps[b] = n + 1
        on, off = self._count.get((b, True), 0), self._count.get((b, False), 0)
        if on < self.warmup or off < self.warmup:
            return on <= off
        best = self._rate[(b, True)] >= self._rate[(b, False)]
        return (not best) if n % self.explore_every == 0 else best

    def observe(self, batch: int, speculated: bool, emitted: int, seconds: float) -> None:
        """A pure decode step's outcome: ``emitted`` tokens committed over all requests in ``seconds``."""
        b = self.bucket(batch)
        if b == 0 or seconds <= 0:
            return
        key = (b, bool(speculated))
        rate = emitted / seconds
        self._rate[key] = rate if key not in self._rate else (1 - self.alpha) * self._rate[key] + self.alpha * rate
        self._count[key] = self._count.get(key, 0) + 1

    def stats(self) -> dict[str, dict[str, float]]:
        """Per bucket (its smallest batch size): measured tok/s with drafting on and off, and steps of each."""
        out: dict[str, dict[str, float]] = {}
        for (b, on), rate in sorted(self._rate.items()):
            d = out.setdefault(str(1 << b), {})
            d["on_tok_s" if on else "off_tok_s"] = rate
            d["on_steps" if on else "off_steps"] = self._count[(b, on)]
        return out


class Engine:
    """Runs requests on a target model with speculative decoding.

    Args:
        target: the loaded target model.
        speculators: speculators to keep informed; together with the
            controller's own, all of them observe every request (so adaptive
            ones learn even when not drafting).
        controller: picks speculator and lookahead per step and drafts; default:
            a :class:`~adaspec.controller.FixedController` over the first
            speculator with ``lookahead`` (plain decoding when there is none).
        lookahead: k for that default controller. Default 8.

    Raises:
        ValueError: a negative lookahead, or two speculators with one name.
    """

    def __init__(
        self,
        target: TargetModel,
        speculators: Optional[Sequence[Speculator]] = None,
        controller: Optional[Controller] = None,
        lookahead: int = 8,
    ) -> None:
        if lookahead < 0:
            raise ValueError(f"lookahead must be >= 0, got {lookahead}")
        self.target = target
        given = list(speculators or [])
        self.controller = controller or FixedController(given[0] if given else None, lookahead if given else 0)
        self.speculators: dict[str, Speculator] = {}
        for s in given + [s for s in self.controller.speculators if s not in given]:
            if self.speculators.setdefault(s.name, s) is not s:
                raise ValueError(f"two speculators are named {s.name!r}")
        # Speculators that learn from the target's features at committed positions.
        self._feature_observers = [s for s in self.speculators.values() if getattr(s, "wants_features", False)]
        self.eos_token_ids = target.eos_token_ids
        self.tokenizer = target.tokenizer
        if getattr(self.controller, "tree", False) and not getattr(target, "supports_trees", False):
            # Token trees need a tree attention mask (the lean core's); elsewhere, chains.
            warnings.warn(f"tree mode needs the lean core; the {getattr(target, 'runtime', 'transformers')} "
                          "runtime verifies chains (the controller falls back to chain mode)", RuntimeWarning,
                          stacklevel=2)
            self.controller.tree = False
        # Grammar-forced tokens are proposed as drafts whenever the engine speculates
        # (plain decoding, with no speculator, stays one token per forward).
        self.grammar_drafts = bool(self.speculators)
        # Committed prompt prefixes -> cached KV (adaspec.prefix_cache.PrefixCache); None: off.
        self.prefix_cache = None
        self.last_batch = (0, 0)  # (requests, rows fed) of the last step_batch forward
        self.batch_gate = BatchSpeculationGate()  # step_batch: drafting on or off, by measured batch tok/s
        self._live: set[str] = set()  # request ids started and not yet released
        # Shared prefills of request groups (``start(share_prefill=...)``): key -> _SharedPrefill.
        self._shared_prefills: dict[str, _SharedPrefill] = {}

    # ----------------------------------------------------------- lifecycle
    def encode_prompt(self, prompt: str | Sequence[int], chat: bool = False) -> list[int]:
        """Tokenize a prompt (text, chat text, or ids).

        Raises:
            ValueError: on token ids outside the vocabulary.
        """
        if isinstance(prompt, str):
            if chat:
                return self.apply_chat_template([{"role": "user", "content": prompt}])
            return list(self.tokenizer.encode(prompt, add_special_tokens=True))
        ids = [int(t) for t in prompt]
        bad = [t for t in ids if not 0 <= t < self.target.vocab_size]
        if bad:
            raise ValueError(f"prompt token ids outside the vocabulary (0..{self.target.vocab_size - 1}): {bad[:5]}")
        return ids

    def apply_chat_template(self, messages: list[dict]) -> list[int]:
        """Token ids of ``messages`` rendered with the model's chat template.

        Raises:
            ValueError: if ``messages`` is empty or the tokenizer has no template.
        """
        if not messages:
            raise ValueError("messages must not be empty")
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(f"model {self.target.name} has no chat template")
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def start(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        tenant: str = DEFAULT_TENANT,
        request_id: Optional[str] = None,
        prefill: bool = True,
        share_prefill: Optional[tuple[str, int]] = None,
    ) -> RequestState:
        """Validate, prefill, and register a request.

        With a :attr:`prefix_cache`, the longest cached prefix of the prompt
        (this tenant's) is copied into the request's KV first and only the rest
        is prefilled (exact: prefill is chunk invariant).

        Args:
            prefill: prefill the prompt now; False leaves it to :meth:`step_batch`
                (chunked, batched with other requests' steps) or the first :meth:`step`;
                the prefix cache is then looked up when the prefill begins, so a
                request queued behind another with the same prefix reuses it.
            share_prefill: ``(group key, group size)`` for the members of a group
                that sample one prompt several times (OpenAI's ``n``, RL groups):
                the first member's prefill is kept and the others copy its KV
                cache instead of running the prompt again (bitwise the same
                entries: same tokens, same weights). The kept copy is dropped
                once ``group size`` members started (or the weights changed).
                Implies ``prefill``.

        Raises:
            ValueError: invalid params, an empty prompt on a model without BOS,
                or a prompt that does not fit the context window.
        """
        params.validate()
        ids = list(prompt_ids)
        if not ids:
            if self.target.bos_token_id is None:
                raise ValueError("prompt is empty and the model has no BOS token to start from")
            ids = [self.target.bos_token_id]
        if len(ids) >= self.target.max_model_len:
            raise ValueError(
                f"prompt has {len(ids)} tokens; the context window is {self.target.max_model_len} "
                "(at least one token must fit after the prompt)"
            )
        constraint = None
        if params.constrained:
            constraint = RequestConstraint(params.grammar, self.tokenizer, self.target.vocab_size,
                                           sorted(self.eos_token_ids), params.logit_bias,
                                           params.presence_penalty, params.frequency_penalty)
        request_id = request_id or f"req-{os.getpid()}-{next(_request_counter)}"
        seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
        state = RequestState(
            request_id=request_id,
            prompt_ids=ids,
            params=params,
            tenant=tenant,
            kv=self.target.new_cache(),
            generator=torch.Generator().manual_seed(seed),
            token_ids=list(ids),
            logprobs=[] if params.logprobs is not None else None,
            constraint=constraint,
            prefill_len=len(ids) - 1,
        )
        if (prefill or share_prefill is not None) and state.prefilling:
            self._prefill(state, share_prefill)
        state.policy_version = getattr(state.kv, "weights_version", self.policy_version)
        self._live.add(request_id)
        for spec in self.speculators.values():
            if params.learn:
                spec.start_request(request_id, ids, tenant)
            else:  # opted out: no trace in learned state
                spec.start_request_private(request_id, ids, tenant)
        self.controller.start_request(request_id, ids, tenant)
        return state

    def close(self) -> None:
        """Stop what the speculators run in the background (e.g. the online trainer process); idempotent.

        What they learned stays where they keep it (a learned head's published versions).
        """
        for spec in self.speculators.values():
            close = getattr(spec, "close", None)
            if callable(close):
                close()

    def abort(self, state: RequestState, reason: str = "abort") -> None:
        """Cancel a request and free its state (KV cache, speculator state)."""
        if not state.finished:
            state.finish_reason = reason
        self._release(state)

    def _reuse_prefix(self, state: RequestState) -> None:
        """Before the first prefill chunk: copy the longest cached prefix into the (empty) KV."""
        if state.prefix_looked_up:
            return
        state.prefix_looked_up = True
        ids = state.prompt_ids
        if (self.prefix_cache is not None and state.params.learn and len(ids) > 2 and state.prefill_pos == 0
                and state.kv.length == 0):
            # at least one prompt token is prefilled: its hidden state is the draft head's input
            state.prefill_pos = state.prefix_tokens_reused = self.prefix_cache.restore(
                state.tenant, ids, state.kv, max_tokens=min(len(ids) - 2, state.prefill_len - 1))

    def _prefilled(self, state: RequestState, hidden: torch.Tensor) -> None:
        """The KV is complete: keep the hidden state, offer the prefix to the prefix cache."""
        state.prefill_pos = state.prefill_len
        state.hidden_state = hidden
        if self.prefix_cache is not None and state.params.learn and self._on_current_weights(state):
            self.prefix_cache.insert(state.tenant, state.token_ids[:state.prefill_len], state.kv)

    def _on_current_weights(self, state: RequestState) -> bool:
        """Whether the request's KV was computed with the weights served now (prefix-cache entries must be)."""
        return getattr(state.kv, "weights_version", 0) == self.policy_version

    def preempt(self, state: RequestState) -> None:
        """Free a live request's KV cache (memory ran short); it is not failed.

        The request resumes in a later :meth:`step` / :meth:`step_batch` by
        recomputing its KV (a prefill of prompt + output so far, bitwise the same
        by chunk invariance), then decodes on: its output is unchanged.
        """
        if state.finished:
            return
        kv = state.kv
        if hasattr(kv, "release"):
            kv.release()
        state.kv = self.target.new_cache()
        if hasattr(kv, "weights"):  # recomputed with the weights the request started on, never newer ones
            state.kv.weights, state.kv.weights_version = kv.weights, kv.weights_version
        state.prefill_pos, state.prefill_len = 0, len(state.token_ids) - 1
    def _prefill(self, state: RequestState, share_prefill: Optional[tuple[str, int]]) -> None:
        """Feed the prompt but its last token (after any cached prefix); with ``share_prefill``, copy a group member's instead."""
        key, size = share_prefill if share_prefill is not None else (None, 1)
        shared = self._shared_prefills.get(key) if key is not None else None
        if shared is not None and (shared.prompt_ids != state.prompt_ids
                                   or shared.version != self.policy_version):
            del self._shared_prefills[key]  # another prompt under the key, or stale weights
            shared = None
        if shared is not None:
            state.kv = _copy_cache(shared.kv)
            state.hidden_state = shared.hidden_state
            state.prefill_pos = state.prefill_len
            state.prefix_looked_up = True
            shared.remaining -= 1
            if shared.remaining <= 0:
                del self._shared_prefills[key]
            return
        self._reuse_prefix(state)
        out = self.target.forward(state.kv, state.prompt_ids[state.prefill_pos:-1], last_only=True)
        self._prefilled(state, out.hidden[-1])
        if key is not None and size > 1:
            while len(self._shared_prefills) >= MAX_SHARED_PREFILLS:  # members that never came: oldest first
                del self._shared_prefills[next(iter(self._shared_prefills))]
            self._shared_prefills[key] = _SharedPrefill(list(state.prompt_ids), _copy_cache(state.kv),
                                                        state.hidden_state, size - 1, self.policy_version)

    def fork(self, state: RequestState, request_id: Optional[str] = None, seed: Optional[int] = None) -> RequestState:
        """A new request that continues ``state``'s prompt from a copy of its KV cache (no prefill).

        For a group of samples of one prompt (RL rollouts): ``state`` must not
        have stepped yet. The fork has its own generator (``seed``, default
        fresh entropy), runs on ``state``'s weights, and is registered with the
        controller and every speculator like a started request.

        Raises:
            ValueError: ``state`` has already produced output or finished.
        """
        if state.output_ids or state.finished:
            raise ValueError("fork a request before its first step")
        request_id = request_id or f"req-{os.getpid()}-{next(_request_counter)}"
        params = state.params if seed is None else dataclasses.replace(state.params, seed=seed)
        seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
        constraint = None
        if params.constrained:
            constraint = RequestConstraint(params.grammar, self.tokenizer, self.target.vocab_size,
                                           sorted(self.eos_token_ids), params.logit_bias,
                                           params.presence_penalty, params.frequency_penalty)
        child = RequestState(request_id=request_id, prompt_ids=list(state.prompt_ids), params=params,
                             tenant=state.tenant, kv=_copy_cache(state.kv),
                             generator=torch.Generator().manual_seed(seed), token_ids=list(state.token_ids),
                             logprobs=[] if params.logprobs is not None else None, constraint=constraint,
                             hidden_state=state.hidden_state, policy_version=state.policy_version)
        for spec in self.speculators.values():
            if params.learn:
                spec.start_request(request_id, child.prompt_ids, child.tenant)
            else:
                spec.start_request_private(request_id, child.prompt_ids, child.tenant)
        self.controller.start_request(request_id, child.prompt_ids, child.tenant)
        self._live.add(request_id)
        return child

    # ----------------------------------------------------------- policy weights
    @property
    def policy_version(self) -> int:
        """The target's weights version: 0 as loaded, +1 per :meth:`update_weights`."""
        from adaspec.weights import policy_version

        return policy_version(self.target)

    @property
    def num_live_requests(self) -> int:
        return len(self._live)

    def update_weights(self, source, calibration: str = "initial") -> int:
        """Load new policy weights into the running target (RL); returns the new version.

        :func:`adaspec.weights.prepare_weights` then :meth:`apply_weights`.
        Requests started before keep the weights they started on (lean core).

        Args:
            source: a safetensors file or folder, or a state dict (transformers names).
            calibration: int8: "initial" (the initial policy's activation statistics) or "recalibrate".

        Raises:
            ValueError: bad source or tensors (nothing changes then).
            RuntimeError: transformers runtime with live requests.
        """
        from adaspec.weights import prepare_weights

        return self.apply_weights(prepare_weights(self.target, source, calibration))

    def apply_weights(self, prepared) -> int:
        """Serve :func:`adaspec.weights.prepare_weights`' result and tell the controller and
        every speculator (``on_policy_update``); call between steps. Returns the new version."""
        from adaspec.weights import apply_weights

        version = apply_weights(self.target, prepared, live_requests=len(self._live))
        self.notify_policy_update(version)
        return version

    def notify_policy_update(self, version: int) -> None:
        """Tell the controller and every speculator that the target's weights changed
        (:meth:`apply_weights` does; call it on other engines sharing the target)."""
        self._shared_prefills.clear()
        if self.prefix_cache is not None:  # cached prefixes hold the old weights' KV
            self.prefix_cache.evict_all()
        self.controller.on_policy_update(version)
        for spec in self.speculators.values():  # the controller's own included
            spec.on_policy_update(version)

    def _release(self, state: RequestState) -> None:
        self._live.discard(state.request_id)
        for spec in self.speculators.values():
            spec.stop_request(state.request_id)
        self.controller.stop_request(state.request_id)
        kv = state.kv
        state.kv = KVCache(cache=None, length=0)
        if (self.prefix_cache is not None and state.params.learn and state.finish_reason in ("stop", "length")
                and not state.prefilling and getattr(kv, "length", 0) > 0):
            # the finished request's KV (prompt + output but the newest token) becomes a cached
            # prefix: a multi-turn chat's next turn resends it
            self.prefix_cache.donate(state.tenant, state.token_ids[:kv.length], kv)
        elif hasattr(kv, "release"):
            kv.release()  # its blocks go back to the pool now, not when collected

    # ----------------------------------------------------------- learned state
    def learned_state(self) -> dict[str, dict]:
        """Every part's non-empty learned state, by snapshot name.

        The controller's state holds its own speculators' (it is saved as one
        piece under its name); other speculators are saved under theirs.
        """
        owned = {s.name for s in self.controller.speculators}
        parts: dict[str, dict] = {}
        state = self.controller.state_dict()
        if state:
            parts[self.controller.name] = state
        for name, spec in self.speculators.items():
            if name not in owned or not state:
                own = spec.state_dict()
                if own and name not in parts:
                    parts[name] = own
        return parts

    def load_learned_state(self, parts: dict[str, dict], log=None) -> list[str]:
        """Restore :meth:`learned_state` output (missing parts start empty).

        A part that does not fit (``ValueError`` from its ``load_state_dict``)
        is skipped and reported through ``log(message)``.

        Returns:
            the names restored.
        """
        holders = {self.controller.name: self.controller, **self.speculators}
        restored = []
        for name, state in parts.items():
            holder = holders.get(name)
            if holder is None or not state:
                continue
            try:
                holder.load_state_dict(state)
                restored.append(name)
            except ValueError as e:
                if log is not None:
                    log(f"learned state {name!r} not loaded ({e}); it starts empty")
        return restored

    # ----------------------------------------------------------- the step
    def step(self, state: RequestState) -> StepResult:
        """Run one speculative step on a live request.

        Returns:
            what the step did; ``token_ids`` empty if the request had finished.
        """
        if state.finished:
            return StepResult(finish_reason=state.finish_reason)
        self._poll_threads()
        if state.prefilling:  # started with prefill=False, or preempted: the rest of the KV first
            self._reuse_prefix(state)
            out = self.target.forward(state.kv, state.token_ids[state.prefill_pos:state.prefill_len], last_only=True)
            self._prefilled(state, out.hidden[-1])
        t0 = time.perf_counter()
        lookahead, proposal = self._propose(state)  # 1. propose
        draft_s = time.perf_counter() - t0
        if proposal.tree is not None:  # tree mode: one tree-masked forward (see _step_tree)
            return self._step_tree(state, proposal.tree, lookahead, draft_s)
        fed = [state.token_ids[-1]] + proposal.token_ids
        t1 = time.perf_counter()
        out = self.target.forward(state.kv, fed)  # 2. verify forward: logits [n+1, V]
        forward_s = time.perf_counter() - t1
        return self._finish_chain(state, proposal, lookahead, fed, out, forward_s, draft_s)

    def _finish_chain(self, state: RequestState, proposal: DraftProposal, lookahead: int, fed: list[int], out,
                      forward_s: float, draft_s: float, report_cost: bool = True) -> StepResult:
        """Steps 3-4 of a chain step after its verify forward ``out`` (alone or in a batch)."""
        logits = out.logits
        if state.constraint is not None:  # grammar mask, bias, penalties at every verified row
            logits = state.constraint.adjust_logits(out.logits, proposal.token_ids)
        result = self._evaluate(state, logits, proposal)  # 3. accept / reject
        committed = self._commit(state, result, out.logits)  # 4. update
        if state.constraint is not None:
            state.constraint.commit(committed)
        # Cache had len(token_ids_before) - 1 + len(fed); keep all committed but the newest.
        self.target.truncate(state.kv, min(len(state.token_ids) - 1, state.kv.length))
        if not state.finished:
            state.hidden_state = out.hidden[len(committed) - 1]
        step = StepResult(speculator=proposal.speculator if proposal.num_draft_tokens else NO_SPECULATOR,
                          lookahead=lookahead, num_draft_tokens=proposal.num_draft_tokens,
                          num_accepted=result.num_accepted, token_ids=committed, forward_s=forward_s,
                          draft_s=draft_s, finish_reason=state.finish_reason)
        state.stats.draft_time_s += draft_s
        state.stats.verify_time_s += forward_s
        # Count what was committed: a stop condition may cut the step's tokens.
        state.stats.record(step.speculator, step.num_draft_tokens, min(step.num_accepted, step.num_emitted),
                           step.num_emitted)
        self._capture_features(state, out, list(range(len(committed))))
        self._after_verify(state, len(fed) if report_cost else 0, forward_s, committed, result.num_accepted,
                           proposal.num_draft_tokens,
                           self._controller_view(state, committed, result.num_accepted, proposal.num_draft_tokens))
        return step

    def step_batch(self, states: Sequence[RequestState],
                   max_prefill_tokens: int = BATCH_PREFILL_TOKENS) -> list[Optional[StepResult]]:
        """One continuous-batching step over several live requests: ONE batched target forward.

        1. every decoding request proposes its draft (chain or tree; the controller
           sees the rows and expected tokens of the batch so far, ``ProposeContext.batch_rows``
           / ``batch_tokens``, and may choose lookahead 0);
        2. requests still prefilling (started with ``prefill=False``) add their next
           prompt chunk, ``max_prefill_tokens`` over all of them (first come first),
           so a long prompt delays the others' decode steps by a bounded amount;
        3. all rows go into one ``target.forward_batch``; each request then verifies
           and commits its own rows exactly as :meth:`step` does (the lean core is
           batch invariant, so each request's output is bitwise what it is alone).

        On a runtime without ``forward_batch`` the requests are stepped one by one.

        Args:
            states: the requests to advance (finished ones are skipped).
            max_prefill_tokens: prompt tokens prefilled in this forward, >= 1.

        Returns:
            per state, its :class:`~adaspec.types.StepResult`, or None when it only
            prefilled (or had finished).

        Raises:
            ValueError: ``max_prefill_tokens < 1``, or two states sharing a cache.
            adaspec.model.kv.PoolExhausted: the KV pool is full (nothing committed then).
        """
        if max_prefill_tokens < 1:
            raise ValueError(f"max_prefill_tokens must be >= 1, got {max_prefill_tokens}")
        self._poll_threads()
        if not hasattr(self.target, "forward_batch"):
            return [self.step(s) if not s.finished else None for s in states]
        from adaspec.model.decoder import BatchRequest

        live = [s for s in states if not s.finished]
        decoding = [s for s in live if not s.prefilling]
        chunks: list[tuple[RequestState, list[int]]] = []
        budget = max_prefill_tokens
        for s in live:
            if s.prefilling and budget > 0:
                self._reuse_prefix(s)
                part = s.token_ids[s.prefill_pos:s.prefill_len][:budget]
                chunks.append((s, part))
                budget -= len(part)
        rows = sum(len(p) for _, p in chunks) + len(decoding)  # every decoding request feeds >= 1 row
        tokens = float(len(decoding))
        plans = []
        t_step = time.perf_counter()
        speculate = self.batch_gate.choose(len(decoding))
        for s in decoding:  # 1. propose, each priced beside the batch so far
            t0 = time.perf_counter()
            if speculate:
                lookahead, proposal = self._propose(s, batch=(rows - 1, tokens - 1.0))
            else:
                lookahead, proposal = 0, DraftProposal()
            draft_s = time.perf_counter() - t0
            if proposal.tree is not None:
                fed = [s.token_ids[-1]] + proposal.tree.tokens
                req = BatchRequest(s.kv, fed, parents=[-1] + [p + 1 for p in proposal.tree.parents])
            else:
                fed = [s.token_ids[-1]] + proposal.token_ids
                req = BatchRequest(s.kv, fed)
            rows += len(fed) - 1
            expected = proposal.expected_tokens
            tokens += (expected if expected is not None else 1.0 + 0.5 * (len(fed) - 1)) - 1.0
            plans.append((s, lookahead, proposal, fed, req, draft_s))
        requests = [p[4] for p in plans] + [BatchRequest(s.kv, part, last_only=True) for s, part in chunks]
        if not requests:
            return [None for _ in states]
        t1 = time.perf_counter()
        outs = self.target.forward_batch(requests)  # 2. one verify (and prefill) forward for all
        forward_s = time.perf_counter() - t1
        self.last_batch = (len(requests), sum(len(r.token_ids) for r in requests))
        done: dict[int, StepResult] = {}
        for (s, lookahead, proposal, fed, _, draft_s), out in zip(plans, outs):  # 3-4. per request
            if proposal.tree is not None:
                done[id(s)] = self._finish_tree(s, proposal.tree, lookahead, fed, out, forward_s, draft_s,
                                                report_cost=False)
            else:
                done[id(s)] = self._finish_chain(s, proposal, lookahead, fed, out, forward_s, draft_s,
                                                 report_cost=False)
        for (s, part), out in zip(chunks, outs[len(plans):]):
            s.prefill_pos += len(part)
            if not s.prefilling:
                self._prefilled(s, out.hidden[-1])
        if not chunks and decoding:  # a pure decode step: what it emitted per second, for the gate
            emitted = sum(len(r.token_ids) for r in done.values())
            self.batch_gate.observe(len(decoding), speculate, emitted, time.perf_counter() - t_step)
        fed_rows = self.last_batch[1]
        self.controller.on_verify(fed_rows, forward_s)  # the cost model learns the batch forward's cost
        for spec in self.speculators.values():
            spec.on_verify(fed_rows, forward_s)
        return [done.get(id(s)) for s in states]

    def _poll_threads(self) -> None:
        """Let ``--threads auto``'s governor (:class:`adaspec.threads.ThreadGovernor`) look at the machine."""
        governor = getattr(self.target, "thread_governor", None)
        if governor is not None:
            governor.poll()

    def _capture_features(self, state: RequestState, out, rows: list[int]) -> None:
        """Hand the features of the committed positions (fed ``rows``) to the speculators that learn from them."""
        if not self._feature_observers or not rows:
            return
        idx = torch.tensor(rows, dtype=torch.long)
        hidden = out.hidden.index_select(0, idx)  # [n, H]
        argmax = out.logits.index_select(0, idx).argmax(dim=-1)  # [n]
        for spec in self._feature_observers:
            spec.observe_features(state.request_id, hidden, argmax)

    def _after_verify(self, state: RequestState, num_fed: int, forward_s: float, committed: list[int],
                      num_accepted: int, num_draft_tokens: int, controller_view=None) -> None:
        """Tell the controller (``controller_view``: what it judges, default all) and every
        speculator what the verify forward cost (``num_fed`` 0: reported once per batch
        instead) and committed; free a finished request."""
        if num_fed:
            self.controller.on_verify(num_fed, forward_s)
        self.controller.observe(state.request_id, *(controller_view or (committed, num_accepted, num_draft_tokens)))
        for spec in self.speculators.values():
            if num_fed:
                spec.on_verify(num_fed, forward_s)
            spec.observe(state.request_id, committed, num_accepted, num_draft_tokens)
        if state.finished:
            self._release(state)

    def _max_draft_tokens(self, state: RequestState) -> int:
        """Upper bound on k: the token budget and the context window.

        A step emits at most k + 1 tokens and feeds positions up to
        ``len(token_ids) - 1 + k``, which must stay inside the window.
        """
        remaining = state.params.max_tokens - len(state.output_ids)
        window_left = self.target.max_model_len - len(state.token_ids)
        return max(0, min(remaining - 1, window_left - 1))

    def _propose(self, state: RequestState, batch: tuple[int, float] = (0, 0.0)) -> tuple[int, DraftProposal]:
        """The controller's lookahead and its draft, clipped to the bounds and the vocabulary.

        ``batch``: rows the rest of a batched step feeds and tokens it is expected
        to emit (:class:`~adaspec.types.ProposeContext` ``batch_rows``, ``batch_tokens``).
        """
        bound = self._max_draft_tokens(state)
        if bound <= 0:
            return 0, DraftProposal()
        ctx = ProposeContext(
            request_id=state.request_id,
            token_ids=state.token_ids,
            num_prompt_tokens=state.num_prompt_tokens,
            hidden_state=state.hidden_state,
            tenant=state.tenant,
            temperature=state.params.temperature,
            top_k=state.params.top_k,
            top_p=state.params.top_p,
            seed=state.params.seed,
            batch_rows=batch[0],
            batch_tokens=batch[1],
        )
        if state.constraint is not None and state.constraint.has_grammar:
            return self._propose_constrained(state, ctx, bound)
        decision = self.controller.propose(ctx, bound, self.speculators)
        k = min(decision.lookahead, bound)
        if decision.speculator is None or k <= 0:
            return 0, DraftProposal()
        if decision.proposal.tree is not None:
            # Logits processors (bias, penalties, min_p) run on chain rows only: such requests verify a chain.
            chains_only = state.constraint is not None or state.params.min_p > 0
            return self._tree_proposal(decision.proposal, bound, chains_only=chains_only)
        out = _sanitize(decision.proposal, k, self.target.vocab_size)
        if decision.proposal.expected_tokens is not None and out.num_draft_tokens == decision.proposal.num_draft_tokens:
            out.expected_tokens = decision.proposal.expected_tokens
        return k, out

    # ----------------------------------------------------------- the tree step
    def _tree_proposal(self, proposal: DraftProposal, bound: int,
                       chains_only: bool = False) -> tuple[int, DraftProposal]:
        """A tree proposal clipped to ``bound`` nodes and the vocabulary; a chain where trees cannot run.

        The bound (token budget and context window, :meth:`_max_draft_tokens`)
        caps the node count: the forward writes every node to the KV cache, and
        a path is never longer than the tree. On a runtime without tree
        attention (transformers) the tree's first branch is verified as a chain.
        """
        tree = _sanitize_tree(proposal.tree, bound, self.target.vocab_size)
        if tree.num_nodes == 0:
            return 0, DraftProposal()
        if chains_only or not getattr(self.target, "supports_trees", False):
            chain = _first_branch(tree)
            return len(chain.token_ids), chain
        return tree.num_nodes, DraftProposal(speculator="tree", tree=tree, expected_tokens=proposal.expected_tokens)

    def _step_tree(self, state: RequestState, tree: TokenTree, lookahead: int, draft_s: float) -> StepResult:
        """One tree step: feed ``[last] + tree`` with the tree mask, verify, keep the accepted path's KV.

        Commit and stop conditions are the chain step's (:meth:`_commit`); the
        KV cache keeps the root and the committed path (``keep_path``), so the
        invariant after the step is the chain step's.
        """
        fed = [state.token_ids[-1]] + tree.tokens
        t1 = time.perf_counter()
        out = self.target.forward_tree(state.kv, fed, [-1] + [p + 1 for p in tree.parents])  # logits [N+1, V]
        forward_s = time.perf_counter() - t1
        return self._finish_tree(state, tree, lookahead, fed, out, forward_s, draft_s)

    def _finish_tree(self, state: RequestState, tree: TokenTree, lookahead: int, fed: list[int], out,
                     forward_s: float, draft_s: float, report_cost: bool = True) -> StepResult:
        """Verify and commit a tree step after its tree-masked forward ``out`` (alone or in a batch)."""
        start = len(state.token_ids) - 1  # the slot the root was fed at
        result = self._evaluate_tree(state, out.logits, tree)
        rows = [0] + [i + 1 for i in result.path]  # fed rows along the accepted path
        committed = self._commit(state, VerifyResult(result.token_ids, result.num_accepted, tree.num_nodes),
                                 out.logits[rows])
        self.target.keep_path(state.kv, start, rows[:len(committed)])  # finished too: a cacheable prefix
        if not state.finished:
            state.hidden_state = out.hidden[rows[len(committed) - 1]]
        sources = [tree.source(i) for i in result.path[:min(result.num_accepted, len(committed))]]
        step = StepResult(speculator="tree", lookahead=lookahead, num_draft_tokens=tree.num_nodes,
                          num_accepted=result.num_accepted, token_ids=committed, forward_s=forward_s,
                          draft_s=draft_s, finish_reason=state.finish_reason, tree_size=tree.num_nodes,
                          accepted_sources=sources)
        state.stats.draft_time_s += draft_s
        state.stats.verify_time_s += forward_s
        state.stats.record_tree(tree.num_nodes, tree.max_depth, sources, len(committed))
        self._capture_features(state, out, rows[:len(committed)])
        self._after_verify(state, len(fed) if report_cost else 0, forward_s, committed, result.num_accepted,
                           tree.num_nodes)
        return step

    def _evaluate_tree(self, state: RequestState, logits: torch.Tensor, tree: TokenTree) -> TreeVerifyResult:
        p = state.params
        if p.greedy:
            return verify_tree_greedy(logits, tree)
        target_probs = process_logits(logits, p.temperature, p.top_k, p.top_p, p.min_p)  # [N+1, V]
        if p.seed is not None:
            return verify_tree_coupled(target_probs, tree, p.seed, len(state.output_ids))
        return verify_tree_stochastic(target_probs, tree, state.generator)

    def _propose_constrained(self, state: RequestState, ctx: ProposeContext, bound: int) -> tuple[int, DraftProposal]:
        """Draft under a grammar: forced tokens, the speculator's draft cut at its first illegal token, forced tokens.

        The forced tokens cost no drafting; the controller drafts the rest of the
        bound from the context extended by the forced prefix (without a hidden
        state there, which belongs to the last committed token).
        """
        c = state.constraint
        c.split = type(c.split)()
        if not self.grammar_drafts:
            decision = self.controller.propose(ctx, bound, self.speculators)
            k = min(decision.lookahead, bound)
            if decision.speculator is None or k <= 0:
                return 0, DraftProposal()
            spec = _sanitize(decision.proposal, k, self.target.vocab_size)
            return k, self._cut(c, spec, 0)
        forced = c.forced_tokens(min(bound, MAX_FORCED_DRAFT))
        spec = DraftProposal()
        k = 0
        if bound - len(forced) > 0:
            if forced:
                ctx.token_ids = list(state.token_ids) + forced
                ctx.hidden_state = None
            decision = self.controller.propose(ctx, bound - len(forced), self.speculators)
            k = min(decision.lookahead, bound - len(forced))
            if decision.speculator is not None and k > 0:
                spec = _sanitize(decision.proposal, k, self.target.vocab_size)
        if not forced and not spec.token_ids:
            return k, DraftProposal()
        prop = self._cut(c, spec, len(forced), prefix=forced)
        room = bound - prop.num_draft_tokens
        if room > 0 and c.split.cut_probs is None:
            tail = c.forced_after(prop.token_ids, min(room, MAX_FORCED_DRAFT))
            if tail:
                prop = _join(prop, tail, self.target.vocab_size)
        return len(forced) + k, prop

    def _cut(self, c: RequestConstraint, spec: DraftProposal, num_forced: int,
             prefix: Sequence[int] = ()) -> DraftProposal:
        """``prefix`` (forced) + ``spec`` cut at the first token the grammar forbids; remembers the split."""
        prefix = list(prefix)
        legal = c.legal_prefix(prefix + spec.token_ids) - len(prefix)
        kept = max(0, legal)
        c.split.num_forced_before = num_forced
        c.split.num_speculated = kept
        if kept < spec.num_draft_tokens and spec.draft_probs is not None:
            # A sampled draft token the grammar forbids has target probability 0: rejection
            # sampling would reject it for sure and draw from the residual at its row.
            c.split.cut_probs = spec.draft_probs[kept]
        cut = DraftProposal(token_ids=spec.token_ids[:kept],
                            draft_probs=spec.draft_probs[:kept] if spec.draft_probs is not None else None,
                            confidence=spec.confidence[:kept] if spec.confidence is not None else None,
                            speculator=spec.speculator)
        if not prefix:
            return cut
        return _join(DraftProposal(token_ids=prefix, confidence=[1.0] * len(prefix), speculator=GRAMMAR_DRAFTER),
                     cut.token_ids, self.target.vocab_size, tail_proposal=cut)

    def _controller_view(self, state: RequestState, committed: list[int], num_accepted: int,
                         num_draft_tokens: int) -> tuple[list[int], int, int]:
        """What the controller judges: its speculator's drafts only, never the grammar's forced ones."""
        c = state.constraint
        if c is None or not c.has_grammar:
            return committed, num_accepted, num_draft_tokens
        f, n = c.split.num_forced_before, c.split.num_speculated
        if num_accepted < f:  # a forced token was not the target's choice: the draft after it is not judged
            return committed[f:], 0, 0
        return committed[f:], min(num_accepted - f, n), n

    def _evaluate(self, state: RequestState, logits: torch.Tensor, proposal: DraftProposal) -> VerifyResult:
        p = state.params
        if p.greedy:
            return verify_greedy(logits, proposal.token_ids)
        target_probs = process_logits(logits, p.temperature, p.top_k, p.top_p, p.min_p)  # [n+1, V]
        if p.seed is not None:
            # A seed fixes the draw at each output position, whatever the drafts (drafter-invariant).
            return verify_coupled(target_probs, proposal.token_ids, p.seed, len(state.output_ids))
        cut = state.constraint.split.cut_probs if state.constraint is not None else None
        return verify_stochastic(target_probs, proposal.token_ids, proposal.draft_probs, state.generator,
                                 cut_probs=cut)

    def _commit(self, state: RequestState, result: VerifyResult, logits: torch.Tensor) -> list[int]:
        """Append emitted tokens one at a time, stopping at the first stop condition."""
        p = state.params
        logprob_rows = None
        if state.logprobs is not None:
            logprob_rows = torch.log_softmax(logits[: len(result.token_ids)].float(), dim=-1)
        committed: list[int] = []
        for i, tok in enumerate(result.token_ids):
            state.token_ids.append(tok)
            state.output_ids.append(tok)
            committed.append(tok)
            if state.first_token_s is None:
                state.first_token_s = time.perf_counter()
            if logprob_rows is not None:
                state.logprobs.append(_token_logprob(logprob_rows[i], tok, p.logprobs or 0))
            if self._check_stop(state, tok):
                break
        return committed

    def _check_stop(self, state: RequestState, tok: int) -> bool:
        """Stop conditions in order: stop token / EOS, stop string, max_tokens, window."""
        p = state.params
        if tok in p.stop_token_ids or (not p.ignore_eos and tok in self.eos_token_ids):
            state.finish_reason = "stop"
        elif p.stop and self._find_stop_string(state):
            state.finish_reason = "stop"
        elif len(state.output_ids) >= p.max_tokens:
            state.finish_reason = "length"
        elif len(state.token_ids) >= self.target.max_model_len:
            state.finish_reason = "length"
        return state.finished

    def _find_stop_string(self, state: RequestState) -> bool:
        # Checked after every token, so a new occurrence ends in the newest
        # token's text. Decode only a tail long enough to hold the longest stop
        # string (a token is >= 1 byte, a character <= 4; up to 3 leading chars
        # of a tail may decode differently, e.g. a split UTF-8 sequence), and
        # decode everything only on a hit, to find the exact cut: O(n) per
        # request instead of O(n^2).
        longest = max(len(x) for x in state.params.stop)
        tail_tokens = 4 * longest + 8
        if len(state.output_ids) > tail_tokens:
            tail = self.decode(state.output_ids[-tail_tokens:])
            if len(tail) >= longest + 3 and not any(x in tail for x in state.params.stop):
                return False
        text = self.decode(state.output_ids)
        hits = [i for i in (text.find(s) for s in state.params.stop) if i >= 0]
        if hits:
            state.stop_text_cut = min(hits)
            return True
        return False

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True, clean_up_tokenization_spaces=False)

    # ----------------------------------------------------------- drivers
    def result(self, state: RequestState) -> GenerationResult:
        """The finished request as a GenerationResult."""
        text = self.decode(state.output_ids)
        if state.stop_text_cut is not None:
            text = text[: state.stop_text_cut]
        return GenerationResult(
            text=text,
            token_ids=list(state.output_ids),
            finish_reason=state.finish_reason or "abort",
            usage=Usage(prompt_tokens=len(state.prompt_ids), completion_tokens=len(state.output_ids)),
            logprobs=list(state.logprobs) if state.logprobs is not None else None,
            speculation=state.stats,
            elapsed_s=time.perf_counter() - state.started_s,
        )

    def generate(
        self,
        prompt: str | Sequence[int],
        params: Optional[SamplingParams] = None,
        chat: bool = False,
        tenant: str = DEFAULT_TENANT,
    ) -> GenerationResult:
        """Run one request to completion.

        Args:
            prompt: text (tokenized with the model's tokenizer; with ``chat`` it
                becomes one user message in the chat template) or token ids.
            params: sampling and stopping settings (default: greedy, 64 tokens).

        Raises:
            ValueError: invalid params or prompt (see :meth:`start`).
        """
        state = self.start(self.encode_prompt(prompt, chat=chat), params or SamplingParams(), tenant)
        try:
            while not state.finished:
                self.step(state)
        except BaseException:
            self.abort(state)
            raise
        return self.result(state)

    def stream(
        self,
        prompt: str | Sequence[int],
        params: Optional[SamplingParams] = None,
        chat: bool = False,
        tenant: str = DEFAULT_TENANT,
    ) -> Iterator[StreamDelta]:
        """Like :meth:`generate`, yielding a StreamDelta after every step.

        Text is held back while it ends in an incomplete UTF-8 character or in a
        prefix of a stop string, so the concatenated deltas equal the final text.
        """
        state = self.start(self.encode_prompt(prompt, chat=chat), params or SamplingParams(), tenant)
        try:
            while not state.finished:
                self.step(state)
                delta = self.delta(state)
                if delta.token_ids or delta.text or delta.finish_reason:
                    yield delta
        finally:
            if not state.finished:  # consumer stopped early: free the request
                self.abort(state)

    def delta(self, state: RequestState) -> StreamDelta:
        """New text and tokens since the last call (the final delta carries the result)."""
        new_ids = state.output_ids[state.streamed_tokens :]
        lps = state.logprobs[state.streamed_tokens :] if state.logprobs is not None else None
        state.streamed_tokens = len(state.output_ids)
        if state.finished:
            result = self.result(state)
            text = result.text[state.streamed_text_len :]
            state.streamed_text_len = len(result.text)
            return StreamDelta(text=text, token_ids=new_ids, logprobs=lps, finish_reason=result.finish_reason,
                               result=result)
        text = self.decode(state.output_ids)
        safe = len(text)
        if text.endswith("\ufffd"):  # incomplete multi-byte character
            safe = len(text.rstrip("\ufffd"))
        limit = safe
        for s in state.params.stop:  # hold back a possible stop-string prefix
            for j in range(min(len(s) - 1, limit), 0, -1):
                if text[limit - j : limit] == s[:j]:
                    safe = min(safe, limit - j)
                    break
        piece = text[state.streamed_text_len : safe] if safe > state.streamed_text_len else ""
        state.streamed_text_len = max(state.streamed_text_len, safe)
        return StreamDelta(text=piece, token_ids=new_ids, logprobs=lps)


@dataclass
class _SharedPrefill:
    """A group's prefilled prompt, kept for the members still to start."""

    prompt_ids: list[int]
    kv: KVCache
    hidden_state: Optional[torch.Tensor]
    remaining: int
    version: int


# Most group prefills kept at once (members that never start must not pin KV blocks forever).
MAX_SHARED_PREFILLS = 16


def _copy_cache(kv: KVCache) -> KVCache:
    """An independent copy of a request's KV cache (lean: copied blocks on the same weights)."""
    if hasattr(kv, "copy") and hasattr(kv, "pool"):
        return kv.copy()
    import copy

    return KVCache(cache=copy.deepcopy(kv.cache), length=kv.length)


def _sanitize(proposal: DraftProposal, lookahead: int, vocab_size: int) -> DraftProposal:
    """Clip a proposal to the lookahead and at the first id outside the vocabulary."""
    ids = list(proposal.token_ids[:lookahead])
    for i, t in enumerate(ids):
        if not 0 <= int(t) < vocab_size:
            ids = ids[:i]
            break
    n = len(ids)
    probs = proposal.draft_probs[:n] if proposal.draft_probs is not None else None
    conf = proposal.confidence[:n] if proposal.confidence is not None else None
    return DraftProposal(token_ids=[int(t) for t in ids], draft_probs=probs, confidence=conf,
                         speculator=proposal.speculator)


def _sanitize_tree(tree: TokenTree, max_nodes: int, vocab_size: int) -> TokenTree:
    """The first ``max_nodes`` nodes of ``tree`` whose tokens (and ancestors') are in the vocabulary."""
    keep: list[int] = []
    ok: set[int] = {-1}
    for i, (t, par) in enumerate(zip(tree.tokens, tree.parents)):
        if len(keep) >= max_nodes:
            break
        if par in ok and 0 <= int(t) < vocab_size:
            ok.add(i)
            keep.append(i)
    # A cut tree keeps nodes by their place, which depends on the drafted tokens: point masses stay exact.
    return tree if len(keep) == tree.num_nodes else tree.subtree(keep, point_masses=True)


def _first_branch(tree: TokenTree) -> DraftProposal:
    """The tree's first root-to-leaf branch as a chain (first child at every level)."""
    ids, probs, conf, node = [], [], [], -1
    while True:
        kids = tree.children(node)
        if not kids:
            break
        node = kids[0]
        claim = tree.claims[node][0]
        ids.append(tree.tokens[node])
        probs.append(claim.draft_probs)
        conf.append(claim.confidence if claim.confidence is not None else 0.0)
    draft_probs = torch.stack(probs) if probs and all(q is not None for q in probs) else None
    if probs and draft_probs is None and any(q is not None for q in probs):
        # mixed deterministic and sampled claims cannot form one draft_probs matrix: cut at the first change
        n = next(j for j, q in enumerate(probs) if (q is None) != (probs[0] is None))
        ids, conf, probs = ids[:n], conf[:n], probs[:n]
        draft_probs = torch.stack(probs) if probs[0] is not None else None
    return DraftProposal(token_ids=ids, draft_probs=draft_probs, confidence=conf,
                         speculator=tree.source(tree.children(-1)[0]) if ids else "")

def _join(head: DraftProposal, tail_ids: Sequence[int], vocab_size: int,
          tail_proposal: Optional[DraftProposal] = None) -> DraftProposal:
    """``head`` then ``tail_ids``: grammar-forced tokens (confidence 1, point-mass rows) or ``tail_proposal``'s."""
    tail = tail_proposal or DraftProposal(token_ids=list(tail_ids), confidence=[1.0] * len(tail_ids))
    ids = head.token_ids + tail.token_ids
    probs = None
    if head.draft_probs is not None or tail.draft_probs is not None:
        def rows(p: DraftProposal) -> torch.Tensor:
            if p.draft_probs is not None:
                return p.draft_probs.float()
            return torch.nn.functional.one_hot(torch.tensor(p.token_ids, dtype=torch.long),
                                               vocab_size).float().reshape(len(p.token_ids), vocab_size)
        probs = torch.cat([rows(head), rows(tail)], dim=0)  # [n, V]
    conf = None
    if head.confidence is not None or tail.confidence is not None:
        conf = (head.confidence or [0.0] * head.num_draft_tokens) + (tail.confidence or [0.0] * tail.num_draft_tokens)
    name = head.speculator if head.speculator != GRAMMAR_DRAFTER or not tail.token_ids else tail.speculator
    return DraftProposal(token_ids=ids, draft_probs=probs, confidence=conf, speculator=name or GRAMMAR_DRAFTER)


def _token_logprob(row: torch.Tensor, tok: int, top_n: int) -> TokenLogprob:
    """Logprob of ``tok`` and the top-n alternatives from one ``[V]`` log-softmax row."""
    top: list[tuple[int, float]] = []
    if top_n > 0:
        vals, idx = torch.topk(row, top_n)
        top = [(int(i), float(v)) for i, v in zip(idx.tolist(), vals.tolist())]
    return TokenLogprob(token_id=int(tok), logprob=float(row[tok]), top=top)
