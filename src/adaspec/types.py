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
        batch_rows: rows the other requests of this step's batched forward feed
            (continuous batching: their verify rows and prefill chunks); 0 alone.
        batch_tokens: tokens the other requests of the batch are expected to
            emit this step; with ``batch_rows`` it lets a controller maximise the
            whole batch's tokens per second instead of this request's.
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
    batch_rows: int = 0
    batch_tokens: float = 0.0

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
        tree: a token tree to verify instead of the chain (tree mode; then
            ``token_ids`` is empty and ``speculator`` is "tree"); None for a chain.
        expected_tokens: the controller's estimate of the tokens this step
            emits (1 + expected accepted drafts); None when it has none.
    """

    token_ids: list[int] = field(default_factory=list)
    draft_probs: Optional[torch.Tensor] = None
    confidence: Optional[list[float]] = None
    speculator: str = ""
    tree: Optional["TokenTree"] = None
    expected_tokens: Optional[float] = None

    @property
    def num_draft_tokens(self) -> int:
        return len(self.token_ids)


@dataclass
class TreeClaim:
    """One speculator's proposal of one tree node.

    Attributes:
        source: the speculator's name.
        draft_probs: ``[V]`` float32, the distribution this speculator sampled
            the node's token from (processed with the request's sampling
            parameters); None for a deterministic proposal (a point mass).
        confidence: the speculator's own probability that the token is right
            given its parent, in [0, 1]; None if it has no opinion.
    """

    source: str
    draft_probs: Optional[torch.Tensor] = None
    confidence: Optional[float] = None


class TokenTree:
    """A token tree: several draft continuations of one request, verified in one forward.

    Node i holds ``tokens[i]``; ``parents[i]`` is its parent's index, or -1
    when its parent is the root (the request's last committed token, which
    the step feeds first). Parents come before children. A token proposed by
    several speculators at the same place is one node with several
    :class:`TreeClaim` s (shared prefixes are merged, so it is verified once);
    each claim stays a separate candidate for rejection sampling, which keeps
    it exact when claims sample from different distributions.

    Attributes:
        tokens: node tokens.
        parents: node parents (-1: the root).
        claims: per node, who proposed it (the first is its ``source``).
        value: per node, an estimate of the probability that the node is
            accepted (the product of its path's per-node acceptance
            estimates); set by whoever sizes the tree, 0.0 until then.
    """

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.parents: list[int] = []
        self.claims: list[list[TreeClaim]] = []
        self.value: list[float] = []
        self._children: dict[int, dict[int, int]] = {-1: {}}  # parent -> token -> node
        self._log: list[tuple[int, TreeClaim]] = []  # (node, claim) in the order claims were added
        self._cands: dict[int, list[tuple[int, TreeClaim]]] = {}  # parent -> its children's claims, in order

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def num_nodes(self) -> int:
        return len(self.tokens)

    def source(self, i: int) -> str:
        """Name of the first speculator that proposed node ``i``."""
        return self.claims[i][0].source

    def child(self, parent: int, token: int) -> Optional[int]:
        """The node under ``parent`` (-1: root) holding ``token``, or None."""
        return self._children.get(parent, {}).get(int(token))

    def children(self, parent: int) -> list[int]:
        """Nodes under ``parent`` (-1: root), in insertion order."""
        return list(self._children.get(parent, {}).values())

    def candidates(self, parent: int) -> list[tuple[int, TreeClaim]]:
        """``(child node, claim)`` for every claim on a child of ``parent``, in the order the claims were added.

        Rejection sampling tries them in this order: the proposal order, never
        regrouped by token (regrouping equal draws would make a later
        candidate depend on the values of the others).
        """
        return list(self._cands.get(parent, []))

    def add(self, parent: int, token: int, claim: TreeClaim, value: float = 0.0) -> int:
        """Add ``token`` under ``parent`` (-1: root), or add ``claim`` to the node already there.

        Returns:
            the node's index.

        Raises:
            ValueError: ``parent`` is not -1 or an existing node.
        """
        if not -1 <= parent < len(self.tokens):
            raise ValueError(f"parent {parent} is not a node of a {len(self.tokens)}-node tree")
        token = int(token)
        kids = self._children.setdefault(parent, {})
        i = kids.get(token)
        if i is not None:
            self.claims[i].append(claim)
            self.value[i] = max(self.value[i], value)
        else:
            i = len(self.tokens)
            self.tokens.append(token)
            self.parents.append(parent)
            self.claims.append([claim])
            self.value.append(value)
            kids[token] = i
        self._log.append((i, claim))
        self._cands.setdefault(parent, []).append((i, claim))
        return i

    def add_path(self, token_ids: Sequence[int], source: str, parent: int = -1,
                 draft_probs: Optional[torch.Tensor] = None,
                 confidence: Optional[Sequence[float]] = None) -> list[int]:
        """Add a chain under ``parent`` (shared prefixes merge); returns its node indices.

        Args:
            token_ids: the chain's tokens.
            draft_probs: ``[len(token_ids), V]`` rows (see :class:`TreeClaim`), or None.
            confidence: per token, or None.
        """
        out = []
        for j, t in enumerate(token_ids):
            claim = TreeClaim(source, draft_probs[j] if draft_probs is not None else None,
                              float(confidence[j]) if confidence is not None and j < len(confidence) else None)
            parent = self.add(parent, t, claim)
            out.append(parent)
        return out

    def merge(self, other: "TokenTree") -> None:
        """Add every claim of ``other`` (in its order, with its values), merging shared prefixes."""
        where: dict[int, int] = {-1: -1}
        for i, c in other._log:
            where[i] = self.add(where[other.parents[i]], other.tokens[i], c, other.value[i])

    def depth(self, i: int) -> int:
        """Depth of node ``i`` (1 for a child of the root)."""
        d = 0
        while i >= 0:
            d += 1
            i = self.parents[i]
        return d

    @property
    def max_depth(self) -> int:
        depths: list[int] = []
        for p in self.parents:
            depths.append(1 + (depths[p] if p >= 0 else 0))
        return max(depths, default=0)

    def path(self, i: int) -> list[int]:
        """Node indices from the root's child down to node ``i``."""
        out = []
        while i >= 0:
            out.append(i)
            i = self.parents[i]
        return out[::-1]

    def subtree(self, keep: Sequence[int], point_masses: bool = False) -> "TokenTree":
        """The tree of nodes ``keep`` (each one's parent must be kept too), claims in their order.

        Args:
            keep: node indices to keep.
            point_masses: drop every claim's ``draft_probs`` (each kept token
                becomes a deterministic candidate). Required when ``keep`` was
                chosen by looking at the drafted tokens (e.g. by their value):
                a sampled token that survived a selection is no longer a draw
                from its q, while a point mass stays exact for any token.

        Raises:
            ValueError: a node kept without its parent.
        """
        kept = set(int(i) for i in keep)
        for i in kept:
            p = self.parents[i]
            if p >= 0 and p not in kept:
                raise ValueError(f"node {i} kept without its parent {p}")
        where: dict[int, int] = {-1: -1}
        out = TokenTree()
        for i, c in self._log:
            if i in kept:
                if point_masses and c.draft_probs is not None:
                    c = TreeClaim(c.source, None, c.confidence)
                where[i] = out.add(where[self.parents[i]], self.tokens[i], c, self.value[i])
        return out

    @classmethod
    def from_chain(cls, proposal: "DraftProposal") -> "TokenTree":
        """A one-branch tree holding a chain proposal."""
        tree = cls()
        tree.add_path(proposal.token_ids, proposal.speculator or "chain", draft_probs=proposal.draft_probs,
                      confidence=proposal.confidence)
        return tree

    def __repr__(self) -> str:
        return f"TokenTree(tokens={self.tokens}, parents={self.parents})"


@dataclass
class TreeVerifyResult:
    """Outcome of verifying a token tree.

    Attributes:
        token_ids: tokens to emit: the accepted path's tokens, then one
            recovered or bonus token; length ``num_accepted + 1``.
        path: node indices of the accepted path (root's child first).
        num_draft_tokens: nodes in the verified tree.
    """

    token_ids: list[int]
    path: list[int]
    num_draft_tokens: int

    @property
    def num_accepted(self) -> int:
        return len(self.path)


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
        tree_size: nodes of the verified token tree (0: a chain or plain step;
            then ``num_draft_tokens`` counts the chain).
        accepted_sources: for a tree step, the speculator that first
            proposed each accepted token, in order.
    """

    speculator: str = "none"
    lookahead: int = 0
    num_draft_tokens: int = 0
    num_accepted: int = 0
    token_ids: list[int] = field(default_factory=list)
    forward_s: float = 0.0
    draft_s: float = 0.0
    finish_reason: Optional[str] = None
    tree_size: int = 0
    accepted_sources: list[str] = field(default_factory=list)

    @property
    def num_emitted(self) -> int:
        """Tokens this step committed (``len(token_ids)``)."""
        return len(self.token_ids)


# Most samples of one prompt in one call (OpenAI's ``n``; an RL group's G).
MAX_N = 64


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
    tree_steps: int = 0
    tree_nodes: int = 0
    tree_path_hist: dict[int, int] = field(default_factory=dict)
    accepted_by_source: dict[str, int] = field(default_factory=dict)

    def record_tree(self, tree_size: int, tree_depth: int, accepted_sources: Sequence[str], num_emitted: int) -> None:
        """Count one target forward that verified a token tree of ``tree_size`` nodes.

        ``accepted_sources`` names the speculator of each accepted token (the
        accepted path, cut where a stop condition cut the step). The tree
        counts as ``tree_size`` proposed tokens; by position, every depth up
        to ``tree_depth`` counts as proposed once.
        """
        self.tree_steps += 1
        self.tree_nodes += tree_size
        n_acc = len(accepted_sources)
        self.tree_path_hist[n_acc] = self.tree_path_hist.get(n_acc, 0) + 1
        for s in accepted_sources:
            self.accepted_by_source[s] = self.accepted_by_source.get(s, 0) + 1
        self.target_forwards += 1
        self.lookahead_hist[tree_size] = self.lookahead_hist.get(tree_size, 0) + 1
        key = "tree" if tree_size > 0 else "none"
        self.steps_by_speculator[key] = self.steps_by_speculator.get(key, 0) + 1
        if tree_size == 0:
            return
        self.proposed += tree_size
        self.accepted += n_acc
        self.draft_steps += 1
        self.emitted_on_draft_steps += num_emitted
        while len(self.proposed_by_position) < tree_depth:
            self.proposed_by_position.append(0)
            self.accepted_by_position.append(0)
        for i in range(tree_depth):
            self.proposed_by_position[i] += 1
        for i in range(n_acc):
            self.accepted_by_position[i] += 1

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
            "tree_steps": self.tree_steps,
            "tree_nodes": self.tree_nodes,
            "mean_tree_size": self.tree_nodes / self.tree_steps if self.tree_steps else 0.0,
            "tree_path_hist": {str(k): v for k, v in sorted(self.tree_path_hist.items())},
            "accepted_by_source": dict(self.accepted_by_source),
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
