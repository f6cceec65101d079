"""Glossary and the small dataclasses that cross module boundaries.

Glossary (STYLE.md):

- **target model**: the model whose output adaspec reproduces exactly.
- **speculator**: anything that proposes draft tokens; **draft tokens** are what
  it proposed this step.
- **lookahead** (k, ``num_speculative_tokens``): the most draft tokens a step may
  propose; **num_draft_tokens**: what a speculator actually proposed (0..k).
- **accepted tokens**: drafts the target agreed with.
- **recovered token**: the token sampled from the adjusted distribution at the
  first rejection.
- **bonus token**: the extra target token emitted when every draft was accepted.
- **acceptance rate** = accepted / proposed draft tokens.
- **mean acceptance length** = tokens emitted per target forward on steps that
  had a draft (accepted + the recovered or bonus token).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch

DEFAULT_TENANT = "default"
GREEDY_TEMPERATURE = 1e-5


def is_greedy(temperature: float) -> bool:
    """The one greedy rule: a temperature below ``GREEDY_TEMPERATURE`` (1e-5, as vLLM) means argmax.

    Tiny positive temperatures would overflow ``logits / temperature`` into NaN,
    so they are greedy too; every part (engine, speculators, controller,
    server) asks this function.
    """
    return temperature < GREEDY_TEMPERATURE


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token sequences."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


@dataclass
class ProposeContext:
    """What a speculator may read when it drafts for one request.

    Attributes:
        request_id: the request this draft is for.
        token_ids: every committed token of the request so far (prompt then
            output), the last one not yet fed to the target model.
        num_prompt_tokens: how many of ``token_ids`` are the prompt.
        hidden_state: the target model's last-layer hidden state (after the final
            norm) at the position that predicted ``token_ids[-1]``, shape ``[H]``,
            float32; ``None`` when the engine has none (e.g. inside vLLM).
        tenant: the tenant whose learned state may be used.
        temperature / top_k / top_p: the request's sampling parameters; a
            speculator that returns ``draft_probs`` must process its logits with
            them (``adaspec.sampling.process_logits``); temperature 0 is greedy.
        seed: the request's seed, or None. The engine verifies a seeded request
            with coupled sampling (``adaspec.verify.verify_coupled``), so its
            output does not depend on the drafts; a speculator that samples its
            drafts should draw them, for a seeded request, with the same noise
            (``adaspec.speculators.base.coupled_draft``) to be accepted often.
    """

    request_id: str
    token_ids: Sequence[int]
    num_prompt_tokens: int
    hidden_state: Optional[torch.Tensor] = None
    tenant: str = DEFAULT_TENANT
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: Optional[int] = None

    @property
    def greedy(self) -> bool:
        return is_greedy(self.temperature)


@dataclass
class DraftProposal:
    """A speculator's draft for one step.

    Attributes:
        token_ids: draft token ids, length ``num_draft_tokens`` (0..lookahead).
        draft_probs: the distribution each draft token was sampled from,
            shape ``[num_draft_tokens, V]``, float32, already processed with the
            request's sampling parameters; ``None`` for a deterministic draft
            (treated as a point mass on each draft token, which keeps rejection
            sampling exact).
        confidence: the speculator's own probability that each draft token is
            right, length ``num_draft_tokens``, each in [0, 1]; ``None`` if it
            has no opinion.
        speculator: name of the speculator that drafted.
    """

    token_ids: list[int] = field(default_factory=list)
    draft_probs: Optional[torch.Tensor] = None
    confidence: Optional[list[float]] = None
    speculator: str = ""

    @property
    def num_draft_tokens(self) -> int:
        return len(self.token_ids)


@dataclass
class VerifyResult:
    """Outcome of verifying one draft block against the target model.

    Attributes:
        token_ids: tokens to emit: the accepted draft tokens, then one recovered
            token (first rejection) or one bonus token (all accepted); length
            ``num_accepted + 1``.
        num_accepted: how many draft tokens the target accepted (0..num_draft_tokens).
        num_draft_tokens: how many draft tokens were verified.
    """

    token_ids: list[int]
    num_accepted: int
    num_draft_tokens: int


@dataclass
class StepResult:
    """What one engine step did (``Engine.step``).

    Attributes:
        speculator: who drafted ("none" when the step decoded plainly).
        lookahead: the k the controller allowed this step (0 = plain decoding).
        num_draft_tokens: drafts proposed (0..lookahead).
        num_accepted: drafts the target accepted (0..num_draft_tokens).
        token_ids: tokens committed by this step, in order (accepted drafts then
            the recovered or bonus token, cut at the first stop condition); may
            be shorter than ``num_accepted + 1`` when a stop condition cut it.
        forward_s: wall seconds of the target forward alone (what the cost
            model learns from).
        draft_s: wall seconds the controller and speculators spent drafting.
        finish_reason: set when this step finished the request.
    """

    speculator: str = "none"
    lookahead: int = 0
    num_draft_tokens: int = 0
    num_accepted: int = 0
    token_ids: list[int] = field(default_factory=list)
    forward_s: float = 0.0
    draft_s: float = 0.0
    finish_reason: Optional[str] = None

    @property
    def num_emitted(self) -> int:
        """Tokens this step committed (``len(token_ids)``)."""
        return len(self.token_ids)


@dataclass
class SamplingParams:
    """Per-request sampling and stopping settings.

    Attributes:
        max_tokens: most new tokens to generate (>= 1). Default 64.
        temperature: below ``GREEDY_TEMPERATURE`` (1e-5, as vLLM) means greedy
            (argmax); above it samples. Default 0.0.
        top_p: nucleus mass in (0, 1]. Default 1.0 (off).
        top_k: keep the k most likely tokens; 0 means off. Default 0.
        seed: fixes the sampled output: the draw at each output position is a
            function of (seed, position) and the target's distribution there
            (Gumbel-max, ``adaspec.verify.verify_coupled``), so it does not
            depend on speculators, lookahead or other requests.
        stop: stop strings; the text is cut before the first occurrence.
        stop_token_ids: token ids that end generation (kept in ``token_ids``).
        ignore_eos: do not stop on the tokenizer's EOS token. Default False.
        logprobs: None for no logprobs; n >= 0 to return each emitted token's
            log-probability and its top-n alternatives (n <= 20).
        learn: False keeps the request out of learned state: speculators
            start it with ``start_request_private`` and store none of its
            prompt or output. Default True.
        grammar: an llguidance grammar the output must follow (built by
            ``adaspec.constraints``: JSON schema, tool calls); None for free text.
        logit_bias: ``{token_id: bias}`` added to the target's raw logits.
        presence_penalty / frequency_penalty: OpenAI's penalties in [-2, 2],
            over the output tokens before each position.
        min_p: min-p sampling threshold in [0, 1]; 0 is off.
    """

    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: Optional[int] = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: Optional[int] = None
    learn: bool = True
    grammar: Optional[str] = None
    logit_bias: dict[int, float] = field(default_factory=dict)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    min_p: float = 0.0

    @property
    def constrained(self) -> bool:
        """True when the target's logits are changed before sampling (grammar, bias, penalties)."""
        return bool(self.grammar is not None or self.logit_bias or self.presence_penalty or self.frequency_penalty)

    def validate(self) -> None:
        """Raise ValueError naming the first invalid field."""
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not (self.temperature >= 0.0) or self.temperature != self.temperature or self.temperature == float("inf"):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if self.logprobs is not None and not (0 <= self.logprobs <= 20):
            raise ValueError(f"logprobs must be in 0..20, got {self.logprobs!r}")
        if any((not isinstance(s, str)) or s == "" for s in self.stop):
            raise ValueError("stop strings must be non-empty strings")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not (-2.0 <= v <= 2.0):
                raise ValueError(f"{name} must be in [-2, 2], got {v!r}")
        if not (0.0 <= self.min_p <= 1.0):
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p!r}")
        for tok, b in self.logit_bias.items():
            if not isinstance(tok, int) or not (-100.0 <= b <= 100.0):
                raise ValueError(f"logit_bias must map token ids to biases in [-100, 100], got {tok!r}: {b!r}")
        if self.grammar is not None and self.ignore_eos:
            raise ValueError("ignore_eos cannot be combined with a grammar (the grammar ends with EOS)")

    @property
    def greedy(self) -> bool:
        return is_greedy(self.temperature)


@dataclass
class TokenLogprob:
    """Log-probability of one emitted token under the target model (raw logits).

    Attributes:
        token_id: the emitted token.
        logprob: its natural-log probability.
        top: the ``n`` most likely tokens as ``(token_id, logprob)``, sorted by
            logprob descending.
    """

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class SpeculationStats:
    """Per-request speculation counters.

    ``acceptance_rate = accepted / proposed`` (0 when nothing was proposed).
    ``mean_acceptance_length = emitted_on_draft_steps / draft_steps``: tokens
    emitted per target forward on steps that had at least one draft token
    (accepted + the recovered or bonus token). Steps without a draft are not
    proposals and do not count in either.
    """

    proposed: int = 0
    accepted: int = 0
    target_forwards: int = 0
    draft_steps: int = 0
    emitted_on_draft_steps: int = 0
    accepted_by_position: list[int] = field(default_factory=list)
    proposed_by_position: list[int] = field(default_factory=list)
    steps_by_speculator: dict[str, int] = field(default_factory=dict)
    lookahead_hist: dict[int, int] = field(default_factory=dict)
    draft_time_s: float = 0.0
    verify_time_s: float = 0.0

    def record(self, speculator: str, num_draft_tokens: int, num_accepted: int, num_emitted: int) -> None:
        """Count one target forward that verified ``num_draft_tokens`` drafts."""
        self.target_forwards += 1
        self.lookahead_hist[num_draft_tokens] = self.lookahead_hist.get(num_draft_tokens, 0) + 1
        key = speculator if num_draft_tokens > 0 else "none"
        self.steps_by_speculator[key] = self.steps_by_speculator.get(key, 0) + 1
        if num_draft_tokens == 0:
            return
        self.proposed += num_draft_tokens
        self.accepted += num_accepted
        self.draft_steps += 1
        self.emitted_on_draft_steps += num_emitted
        while len(self.proposed_by_position) < num_draft_tokens:
            self.proposed_by_position.append(0)
            self.accepted_by_position.append(0)
        for i in range(num_draft_tokens):
            self.proposed_by_position[i] += 1
        for i in range(num_accepted):
            self.accepted_by_position[i] += 1

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def mean_acceptance_length(self) -> float:
        return self.emitted_on_draft_steps / self.draft_steps if self.draft_steps else 0.0

    @property
    def acceptance_by_position(self) -> list[float]:
        return [a / p if p else 0.0 for a, p in zip(self.accepted_by_position, self.proposed_by_position)]

    def to_dict(self) -> dict[str, Any]:
        return {
            "proposed": self.proposed,
            "accepted": self.accepted,
            "acceptance_rate": self.acceptance_rate,
            "mean_acceptance_length": self.mean_acceptance_length,
            "target_forwards": self.target_forwards,
            "draft_steps": self.draft_steps,
            "emitted_on_draft_steps": self.emitted_on_draft_steps,
            "acceptance_by_position": self.acceptance_by_position,
            "steps_by_speculator": dict(self.steps_by_speculator),
            "lookahead_hist": {str(k): v for k, v in sorted(self.lookahead_hist.items())},
            "draft_time_s": self.draft_time_s,
            "verify_time_s": self.verify_time_s,
        }


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def to_dict(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
        }


@dataclass
class GenerationResult:
    """A finished request.

    Attributes:
        text: generated text (stop string excluded, special tokens skipped).
        token_ids: generated token ids only (a stop token id or EOS that ended
            the request is included; tokens after a stop string are not).
        finish_reason: "stop" (EOS, stop token or stop string) or "length"
            (max_tokens or the context window).
        usage: prompt and completion token counts; completion_tokens equals
            ``len(token_ids)``.
        logprobs: one entry per token in ``token_ids`` when requested.
        speculation: the request's speculation counters.
        elapsed_s: wall time from start to finish, seconds.
    """

    text: str
    token_ids: list[int]
    finish_reason: str
    usage: Usage
    logprobs: Optional[list[TokenLogprob]]
    speculation: SpeculationStats
    elapsed_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "text": self.text,
            "token_ids": list(self.token_ids),
            "finish_reason": self.finish_reason,
            "usage": self.usage.to_dict(),
            "speculation": self.speculation.to_dict(),
            "elapsed_s": self.elapsed_s,
        }
        if self.logprobs is not None:
            out["logprobs"] = [
                {"token_id": lp.token_id, "logprob": lp.logprob, "top": [list(t) for t in lp.top]}
                for lp in self.logprobs
            ]
        return out


@dataclass
class StreamDelta:
    """One streamed piece of a request's output.

    Attributes:
        text: new text since the previous delta (may be "" while text is held
            back, e.g. an incomplete UTF-8 character or a possible stop string).
        token_ids: new token ids since the previous delta.
        logprobs: entries for ``token_ids`` when requested.
        finish_reason: set on the last delta only.
        result: the full result, set on the last delta only.
    """

    text: str
    token_ids: list[int]
    logprobs: Optional[list[TokenLogprob]] = None
    finish_reason: Optional[str] = None
    result: Optional[GenerationResult] = None
