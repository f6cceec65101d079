"""Labels from live traffic: per-request documents and a bounded per-tenant buffer.

Every verify forward already computes what a draft head learns from: the
target's **feature** (last-layer hidden state after the final norm) at each
fed position, and the committed tokens. A finished request becomes one
:class:`TrafficDoc`: its prompt and output tokens, the features of the
positions from the prompt's last token on (row ``t`` predicted token
``t + 1``), and the target's greedy choice at each of them (its argmax, also
under sampling). The target's distribution over the draft vocabulary is not
stored: the trainer recomputes it from the feature with the frozen draft
LM-head rows, as the offline trainer does.

:class:`LabelBuffer` keeps one tenant's documents within a position budget:

- **recent**: a FIFO of the newest documents;
- **reservoir**: documents pushed out of the FIFO enter a reservoir sample
  (Vitter's algorithm R over documents), so older traffic keeps a share;
- **held out**: every ``heldout_every``-th document never trains; the trainer
  evaluates candidates on the newest of them.

Positions are counted as labelled (generated) positions.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass
from typing import Iterable, Optional

import torch

from adaspec.train.data import FeatureDoc


@dataclass
class TrafficDoc:
    """One finished request, as the trainer learns from it.

    Attributes:
        token_ids: ``[T]`` int64, prompt then output.
        num_prompt_tokens: P, leading prompt tokens (P >= 1).
        hidden: ``[T - P + 1, H]`` float16: row i is the feature at position
            ``P - 1 + i`` (it predicted token ``P + i``).
        target_argmax: ``[T - P + 1]`` int64: the target's greedy token at those positions.
        doc_id: the request id (informative).
    """

    token_ids: torch.Tensor
    num_prompt_tokens: int
    hidden: torch.Tensor
    target_argmax: torch.Tensor
    doc_id: str = ""

    @property
    def num_labels(self) -> int:
        """Labelled positions: the generated tokens the features predicted."""
        return int(self.hidden.shape[0])

    def validate(self) -> None:
        """Raise ValueError unless the shapes agree (see the attributes)."""
        T, P = int(self.token_ids.shape[0]), int(self.num_prompt_tokens)
        n = T - P + 1
        if P < 1 or n < 1 or self.hidden.dim() != 2 or self.hidden.shape[0] != n or self.target_argmax.shape != (n,):
            raise ValueError(f"traffic doc {self.doc_id!r}: {T} tokens, {P} prompt tokens, hidden "
                             f"{tuple(self.hidden.shape)}, argmax {tuple(self.target_argmax.shape)}")

    def to_feature_doc(self, max_prompt_tokens: int = 512, source: str = "traffic") -> FeatureDoc:
        """As an offline-training document (prompt features zero; they are never read).

        Only the last ``max_prompt_tokens`` prompt tokens are kept (the context
        successor's n-gram index reaches back that far).
        """
        P = self.num_prompt_tokens
        cut = max(0, P - max_prompt_tokens)
        tokens = self.token_ids[cut:].long()
        P2 = P - cut
        H = int(self.hidden.shape[1])
        hidden = torch.zeros(int(tokens.shape[0]), H, dtype=torch.float16)  # [T', H]
        hidden[P2 - 1:] = self.hidden.to(torch.float16)
        argmax = torch.zeros(int(tokens.shape[0]), dtype=torch.long)
        argmax[P2 - 1:] = self.target_argmax.long()
        lse = torch.zeros(int(tokens.shape[0]), dtype=torch.float32)  # not captured; unused in training
        return FeatureDoc(source, self.doc_id, "train", tokens, hidden, lse, argmax, num_prompt_tokens=P2)


class LabelBuffer:
    """One tenant's traffic documents, bounded (see the module docstring).

    Args:
        max_recent_positions: labelled positions in the recent FIFO. Default 8192.
        max_reservoir_positions: labelled positions in the reservoir. Default 8192.
        heldout_every: every n-th document is held out (n >= 2). Default 5.
        max_heldout_positions: labelled positions of held-out documents kept (newest). Default 2048.
        seed: seed of the reservoir's choices.

    Raises:
        ValueError: a non-positive budget or ``heldout_every < 2``.
    """

    def __init__(self, max_recent_positions: int = 8192, max_reservoir_positions: int = 8192,
                 heldout_every: int = 5, max_heldout_positions: int = 2048, seed: int = 0) -> None:
        if min(max_recent_positions, max_reservoir_positions, max_heldout_positions) <= 0 or heldout_every < 2:
            raise ValueError("buffer budgets must be > 0 and heldout_every >= 2")
        self.max_recent_positions = max_recent_positions
        self.max_reservoir_positions = max_reservoir_positions
        self.heldout_every = heldout_every
        self.max_heldout_positions = max_heldout_positions
        self.recent: deque[TrafficDoc] = deque()
        self.reservoir: list[TrafficDoc] = []
        self.heldout: deque[TrafficDoc] = deque()
        self.docs_seen = 0
        self.positions_seen = 0
        self._evicted_seen = 0  # documents offered to the reservoir
        self._rng = random.Random(seed)
        self.new_positions = 0  # labelled positions added since the trainer last took a round

    @staticmethod
    def _positions(docs: Iterable[TrafficDoc]) -> int:
        return sum(d.num_labels for d in docs)

    @property
    def recent_positions(self) -> int:
        return self._positions(self.recent)

    @property
    def reservoir_positions(self) -> int:
        return self._positions(self.reservoir)

    @property
    def heldout_positions(self) -> int:
        return self._positions(self.heldout)

    def add(self, doc: TrafficDoc) -> str:
        """Add a finished request's document; returns where it went ("recent" or "heldout").

        Raises:
            ValueError: a malformed document (see :meth:`TrafficDoc.validate`).
        """
        doc.validate()
        self.docs_seen += 1
        self.positions_seen += doc.num_labels
        if self.docs_seen % self.heldout_every == 0:
            self.heldout.append(doc)
            while len(self.heldout) > 1 and self.heldout_positions > self.max_heldout_positions:
                self.heldout.popleft()
            return "heldout"
        self.recent.append(doc)
        self.new_positions += doc.num_labels
        while len(self.recent) > 1 and self.recent_positions > self.max_recent_positions:
            self._offer_reservoir(self.recent.popleft())
        return "recent"

    def _offer_reservoir(self, doc: TrafficDoc) -> None:
        """Algorithm R over documents, within the position budget."""
        self._evicted_seen += 1
        if self.reservoir_positions + doc.num_labels <= self.max_reservoir_positions:
            self.reservoir.append(doc)
            return
        j = self._rng.randrange(self._evicted_seen)
        if j < len(self.reservoir):
            self.reservoir[j] = doc
            while len(self.reservoir) > 1 and self.reservoir_positions > self.max_reservoir_positions:
                self.reservoir.pop(self._rng.randrange(len(self.reservoir)))

    def stats(self) -> dict:
        """Sizes, for metrics: documents and labelled positions per part."""
        return {"docs_seen": self.docs_seen, "positions_seen": self.positions_seen,
                "recent_positions": self.recent_positions, "reservoir_positions": self.reservoir_positions,
                "heldout_positions": self.heldout_positions, "new_positions": self.new_positions}

    def clear(self) -> None:
        """Forget every document (a tenant's data deleted, or a policy update)."""
        self.recent.clear()
        self.reservoir.clear()
        self.heldout.clear()
        self.new_positions = 0


def doc_from_capture(token_ids: list[int], num_prompt_tokens: int, hidden_rows: list[torch.Tensor],
                     argmax_rows: list[torch.Tensor], doc_id: str = "") -> Optional[TrafficDoc]:
    """A :class:`TrafficDoc` from what a speculator captured step by step, or None when nothing was labelled.

    Args:
        token_ids: the request's tokens (prompt then every committed token).
        num_prompt_tokens: P.
        hidden_rows: ``[n_i, H]`` feature blocks in position order, from position P - 1 on.
        argmax_rows: ``[n_i]`` matching target greedy tokens.
    """
    if not hidden_rows:
        return None
    hidden = torch.cat(hidden_rows).to(torch.float16)  # [N, H]
    argmax = torch.cat(argmax_rows).long()  # [N]
    n = min(int(hidden.shape[0]), len(token_ids) - num_prompt_tokens + 1)
    if n < 1 or num_prompt_tokens < 1:
        return None
    tokens = torch.tensor(token_ids[: num_prompt_tokens - 1 + n], dtype=torch.long)
    return TrafficDoc(tokens, num_prompt_tokens, hidden[:n].contiguous(), argmax[:n].contiguous(), doc_id)
