"""Controllers: which speculator drafts each step, and how far ahead (k).

A controller is engine-agnostic: it reads a request's counters and the
engine's bound on k, and returns a :class:`Decision`. This module holds the
protocol and the fixed policy used when the user names one speculator and one
lookahead; the confidence-aware controller builds on the same protocol.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional


@dataclass
class Decision:
    """One step's choice.

    Attributes:
        speculator: name of the speculator that drafts, or None to decode plainly.
        lookahead: most draft tokens it may propose (0 = plain decoding).
    """

    speculator: Optional[str]
    lookahead: int


class Controller:
    """Protocol: ``decide`` before the step, ``update`` after it."""

    def decide(self, request: Any, max_lookahead: int) -> Decision:
        """Choose the speculator and k (``0 <= k <= max_lookahead``) for one step.

        Args:
            request: the engine's per-request state (read-only).
            max_lookahead: the most draft tokens the token budget and context
                window allow this step.
        """
        raise NotImplementedError

    def update(self, request: Any, decision: Decision, proposal: Any, result: Any, verify_s: float) -> None:
        """Learn from the step's outcome (default: nothing)."""


class FixedController(Controller):
    """Always the same speculator with the same lookahead, clipped to the bound.

    Args:
        speculator: name of the speculator, or None for plain decoding.
        lookahead: k >= 0.
    """

    def __init__(self, speculator: Optional[str], lookahead: int) -> None:
        if lookahead < 0:
            raise ValueError(f"lookahead must be >= 0, got {lookahead}")
        self.speculator = speculator
        self.lookahead = lookahead

    def decide(self, request: Any, max_lookahead: int) -> Decision:
        k = min(self.lookahead, max_lookahead)
        if self.speculator is None or k <= 0:
            return Decision(None, 0)
        return Decision(self.speculator, k)
