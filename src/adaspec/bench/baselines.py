"""Speculators that never pay, for the speed-floor benchmark (FAULT_CASES.md F15).

Engine-agnostic like every speculator: token ids in, drafts out.
"""

from __future__ import annotations

import random

from adaspec.speculators.base import Speculator
from adaspec.types import DraftProposal, ProposeContext


class NothingSpeculator(Speculator):
    """Proposes nothing, every step: what the step loop costs when no draft exists."""

    name = "nothing"

    def propose(self, ctx: ProposeContext, max_draft_tokens: int) -> DraftProposal:
        return DraftProposal(speculator=self.name)


class RandomTokenSpeculator(Speculator):
    """Proposes ``max_draft_tokens`` uniformly random token ids (seeded); almost never accepted.

    Args:
        vocab_size: ids are drawn from ``0 .. vocab_size - 1``.
        seed: seed of its own generator. Default 0.
        confidence: the confidence it claims for each token (it lies, to test
            that the controller learns from acceptance, not from claims). Default 0.9.
    """

    name = "random"

    def __init__(self, vocab_size: int, seed: int = 0, confidence: float = 0.9) -> None:
        if vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
        self.vocab_size = vocab_size
        self.rng = random.Random(seed)
        self.claimed = confidence

    def propose(self, ctx: ProposeContext, max_draft_tokens: int) -> DraftProposal:
        ids = [self.rng.randrange(self.vocab_size) for _ in range(max_draft_tokens)]
        return DraftProposal(token_ids=ids, confidence=[self.claimed] * len(ids), speculator=self.name)
