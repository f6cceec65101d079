"""Scripted speculators that reach every accept/reject case (FAULT_CASES.md).

Each knows the plain-decoding continuation of the request and proposes from it:
the oracle proposes it exactly (all accepted), the always-wrong one proposes a
different token at every position (none accepted), and prefix-then-wrong(j)
proposes j right tokens, then wrong ones.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from adaspec.speculators.base import Speculator
from adaspec.types import DraftProposal, ProposeContext


class ScriptedSpeculator(Speculator):
    """Proposes from ``plain_output`` (the plain continuation of the prompt).

    Args:
        plain_output: plain decoding's generated ids.
        num_right: how many leading draft tokens are right (None = all).
        vocab_size: for building wrong tokens.
    """

    name = "scripted"

    def __init__(self, plain_output: Sequence[int], num_right: Optional[int], vocab_size: int) -> None:
        self.plain = list(plain_output)
        self.num_right = num_right
        self.vocab_size = vocab_size
        self.calls: list[int] = []  # lookahead asked per step
        self.positions: list[int] = []  # len(token_ids) at each call

    def propose(self, ctx: ProposeContext, max_draft_tokens: int) -> DraftProposal:
        self.calls.append(max_draft_tokens)
        self.positions.append(len(ctx.token_ids))
        pos = len(ctx.token_ids) - ctx.num_prompt_tokens
        truth = self.plain[pos : pos + max_draft_tokens]
        right = len(truth) if self.num_right is None else min(self.num_right, len(truth))
        wrong = [(t + 1 + i) % self.vocab_size for i, t in enumerate(truth[right:])]
        # Past the end of the plain output there is no truth: pad with wrong ids.
        pad = [(7 + i) % self.vocab_size for i in range(max_draft_tokens - len(truth))] if self.num_right is not None else []
        return DraftProposal(token_ids=truth[:right] + wrong + pad, speculator=self.name)


class RandomSpeculator(Speculator):
    """Proposes uniformly random token ids (deterministic draft, seeded)."""

    name = "random"

    def __init__(self, vocab_size: int, seed: int = 0) -> None:
        self.vocab_size = vocab_size
        self.gen = torch.Generator().manual_seed(seed)

    def propose(self, ctx: ProposeContext, max_draft_tokens: int) -> DraftProposal:
        ids = torch.randint(0, self.vocab_size, (max_draft_tokens,), generator=self.gen).tolist()
        return DraftProposal(token_ids=ids, speculator=self.name)


class SampledDraftSpeculator(Speculator):
    """Samples drafts from a fixed distribution and reports it as draft_probs.

    Exercises the rejection sampler with real draft probabilities.
    """

    name = "sampled"
    provides_draft_probs = True

    def __init__(self, draft_probs_row: torch.Tensor, seed: int = 0) -> None:
        self.row = draft_probs_row  # [V] float32
        self.gen = torch.Generator().manual_seed(seed)

    def propose(self, ctx: ProposeContext, max_draft_tokens: int) -> DraftProposal:
        probs = self.row.unsqueeze(0).repeat(max_draft_tokens, 1)  # [k, V]
        ids = torch.multinomial(probs, 1, generator=self.gen).squeeze(1).tolist()
        return DraftProposal(token_ids=ids, draft_probs=probs, speculator=self.name)


class EmptySpeculator(Speculator):
    """Never proposes anything."""

    name = "empty"

    def propose(self, ctx: ProposeContext, max_draft_tokens: int) -> DraftProposal:
        return DraftProposal(speculator=self.name)


class ScriptedTreeController:
    """A controller that proposes a scripted token tree every step (tree mode's every accept/reject case).

    ``shape(truth, wrong)`` returns the tree as a list of ``(parent, token)``
    (parents before children, -1 = the root), where ``truth`` is the plain
    continuation from this step on (up to 8 tokens) and ``wrong(x, i)`` a token
    different from x. ``draft_probs(node)`` may give a node's ``[V]`` row (its
    token must then have been sampled from it; tests use it with sampled shapes).
    """

    name = "scripted-tree"
    speculators = ()

    def __init__(self, plain_output: Sequence[int], shape, vocab_size: int, sources=("a", "b")) -> None:
        self.plain = list(plain_output)
        self.shape = shape
        self.vocab_size = vocab_size
        self.sources = sources
        self.trees: list = []  # every tree proposed, for inspection

    def _wrong(self, x: int, i: int = 0) -> int:
        return (int(x) + 1 + i) % self.vocab_size

    def propose(self, ctx: ProposeContext, max_lookahead: int, speculators=None):
        from adaspec.controller import Decision
        from adaspec.types import TokenTree, TreeClaim

        pos = len(ctx.token_ids) - ctx.num_prompt_tokens
        truth = self.plain[pos:pos + 8]
        truth += [(3 + i) % self.vocab_size for i in range(8 - len(truth))]  # past the end: anything
        tree = TokenTree()
        where = {-1: -1}  # shape index -> tree node (a repeated (parent, token) merges)
        for j, (parent, tok) in enumerate(self.shape(truth, self._wrong)):
            where[j] = tree.add(where[parent], tok, TreeClaim(self.sources[j % len(self.sources)], None, 0.5))
        self.trees.append(tree)
        return Decision("tree", tree.num_nodes, DraftProposal(speculator="tree", tree=tree))

    def start_request(self, *a, **k) -> None: ...
    def stop_request(self, *a, **k) -> None: ...
    def observe(self, *a, **k) -> None: ...
    def on_verify(self, *a, **k) -> None: ...
    def state_dict(self) -> dict:
        return {}


class PlainLookup(Speculator):
    """Scripted static speculator: knows plain outputs by prompt; first ``num_right`` right."""

    def __init__(self, name, plain_by_prompt, num_right, vocab_size):
        self.name = name
        self.plain = plain_by_prompt
        self.num_right = num_right
        self.V = vocab_size
        self.prompts = {}

    def start_request(self, request_id, prompt_ids, tenant="default"):
        self.prompts[request_id] = tuple(prompt_ids)

    def propose(self, ctx, k):
        truth = self.plain.get(tuple(ctx.token_ids[: ctx.num_prompt_tokens]), [])
        pos = len(ctx.token_ids) - ctx.num_prompt_tokens
        t = truth[pos : pos + k]
        r = min(self.num_right, len(t))
        ids = t[:r] + [(x + 1) % self.V for x in t[r:]]
        return DraftProposal(token_ids=ids, confidence=[0.6] * len(ids), speculator=self.name)

    def stop_request(self, request_id):
        self.prompts.pop(request_id, None)
