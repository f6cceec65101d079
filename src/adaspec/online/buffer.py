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
- **held out**: the second document and every ``heldout_every``-th one after
  it (documents 2, 2 + n, 2 + 2n, ...) never train; the trainer evaluates
  candidates on the newest of them. (The second, so that a new tenant's first
  candidate can be judged after a few requests.)

Positions are counted as labelled (generated) positions.

A buffer survives restarts and crashes: :meth:`LabelBuffer.save` writes it
(every part, its counters and the reservoir's random state) to one
safetensors file atomically (temporary name, fsync, rename; mode 0600: the
features come from users' traffic), and :meth:`LabelBuffer.load` reads it back.
"""

from __future__ import annotations

import json
import random
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

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
        heldout_every: the 2nd document and every n-th after it are held out (n >= 2). Default 5.
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
        if self.docs_seen % self.heldout_every == 2 % self.heldout_every:
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

    # ---------------------------------------------------------------- persistence
    def save(self, path: str | Path, info: Optional[dict] = None) -> Path:
        """Write every document, the counters and the reservoir's random state to ``path``, atomically.

        Args:
            path: the file (its folder is created, mode 0700).
            info: JSON-serialisable notes stored beside (the trainer records its static head's digest).

        Raises:
            OSError: the write failed; an older file at ``path`` is left as it was.
        """
        from safetensors.torch import save

        from adaspec.store import write_atomic

        docs = [*self.recent, *self.reservoir, *self.heldout]
        part = [0] * len(self.recent) + [1] * len(self.reservoir) + [2] * len(self.heldout)
        tensors = docs_to_tensors(docs) if docs else {}
        tensors["part"] = torch.tensor(part, dtype=torch.long)
        state = {"docs_seen": self.docs_seen, "positions_seen": self.positions_seen,
                 "evicted_seen": self._evicted_seen, "new_positions": self.new_positions,
                 "rng": repr(self._rng.getstate())}
        meta = {"format": BUFFER_FORMAT, "state": json.dumps(state), "info": json.dumps(info or {}),
                "doc_ids": json.dumps([d.doc_id for d in docs])}
        path = Path(path)
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_atomic(path, save(tensors, metadata=meta), 0o600)
        return path

    def load(self, path: str | Path, hidden_size: Optional[int] = None) -> dict:
        """Replace this buffer's documents and counters with those saved at ``path``; returns the saved info.

        The budgets are this buffer's: documents over them are dropped, oldest first.

        Raises:
            FileNotFoundError: no file at ``path``.
            ValueError: not a buffer file, malformed, or features of another width than ``hidden_size``.
        """
        import ast

        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no label buffer at {path}")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("format") != BUFFER_FORMAT:
                    raise ValueError(f"{path} is not a label-buffer file")
                t = {k: f.get_tensor(k) for k in f.keys()}
            state = json.loads(meta["state"])
            info = json.loads(meta.get("info") or "{}")
            docs = docs_from_tensors(t) if "token_ids" in t else []
            ids = json.loads(meta.get("doc_ids") or "[]")
            for d, i in zip(docs, ids):
                d.doc_id = str(i)
            part = t["part"].tolist()
            if len(part) != len(docs) or any(p not in (0, 1, 2) for p in part):
                raise ValueError(f"{path}: part tags {part[:8]} do not fit {len(docs)} documents")
            for d in docs:
                d.validate()
                if hidden_size is not None and int(d.hidden.shape[1]) != hidden_size:
                    raise ValueError(f"{path}: features of width {int(d.hidden.shape[1])}, expected {hidden_size}")
            rng = random.Random()
            rng.setstate(ast.literal_eval(state["rng"]))
        except ValueError:
            raise
        except Exception as e:  # noqa: BLE001 - a truncated or foreign file: one clear error
            raise ValueError(f"{path} is not a readable label-buffer file: {e}") from e
        self.clear()
        parts = (self.recent, self.reservoir, self.heldout)
        for d, p in zip(docs, part):
            parts[p].append(d)
        while len(self.recent) > 1 and self.recent_positions > self.max_recent_positions:
            self.recent.popleft()
        while len(self.reservoir) > 1 and self.reservoir_positions > self.max_reservoir_positions:
            self.reservoir.pop(0)
        while len(self.heldout) > 1 and self.heldout_positions > self.max_heldout_positions:
            self.heldout.popleft()
        self.docs_seen = int(state["docs_seen"])
        self.positions_seen = int(state["positions_seen"])
        self._evicted_seen = int(state["evicted_seen"])
        self.new_positions = int(state["new_positions"])
        self._rng = rng
        return info


BUFFER_FORMAT = "adaspec.label_buffer"


def docs_to_tensors(docs: Sequence[TrafficDoc]) -> dict[str, torch.Tensor]:
    """Documents as flat tensors (``token_ids``, ``num_tokens``, ``num_prompt_tokens``, ``hidden`` float16,
    ``target_argmax``), the layout of the replay and buffer files; :func:`docs_from_tensors` inverts it."""
    return {
        "token_ids": torch.cat([d.token_ids for d in docs]).long(),
        "num_tokens": torch.tensor([int(d.token_ids.shape[0]) for d in docs], dtype=torch.long),
        "num_prompt_tokens": torch.tensor([d.num_prompt_tokens for d in docs], dtype=torch.long),
        "hidden": torch.cat([d.hidden for d in docs]).to(torch.float16).contiguous(),
        "target_argmax": torch.cat([d.target_argmax for d in docs]).long(),
    }


def docs_from_tensors(t: dict[str, torch.Tensor], prefix: str = "") -> list[TrafficDoc]:
    """The documents :func:`docs_to_tensors` flattened (``doc_id``: ``prefix`` + index)."""
    docs, tok, lab = [], 0, 0
    for n, p in zip(t["num_tokens"].tolist(), t["num_prompt_tokens"].tolist()):
        m = n - p + 1
        docs.append(TrafficDoc(t["token_ids"][tok:tok + n], p, t["hidden"][lab:lab + m],
                               t["target_argmax"][lab:lab + m], f"{prefix}{len(docs)}"))
        tok += n
        lab += m
    return docs


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
