"""The background trainer: fine-tunes each tenant's draft head on its live traffic.

Per tenant, a copy of the static draft head (the version currently served,
the static head itself at first) is fine-tuned in rounds. A round runs when
the tenant's buffer holds ``min_new_positions`` new labelled positions:

1. ``steps_per_round`` AdamW steps of the offline trainer's loss
   (:func:`adaspec.train.draft_head.chain_loss`: an unrolled chain, KL to the
   target's draft-vocabulary distribution plus feature regression, EAGLE-3's
   training-time test) on start positions drawn from the recent FIFO, the
   reservoir of older traffic and **replay** of broad data (the shipped
   :func:`replay_docs`, the static head's kind of data), mixed by
   ``mix`` so a head tuned on the newest domain does not forget the others;
2. evaluation of the candidate and of the serving version on the tenant's
   held-out recent documents (:func:`adaspec.train.draft_head.evaluate_head`:
   greedy mean acceptance length of simulated chains at lookahead ``eval_k``);
3. publication (:func:`adaspec.online.versions.publish`) only when the
   candidate beats the serving version there by ``min_gain``; otherwise the
   candidate keeps training from where it is, and the served version stays.

While no tenant has new data, the trainer's core would idle: the most recently
trained tenant's candidate gets up to ``extra_rounds`` more rounds on the data
it has (:meth:`OnlineTrainer.idle_tenant`).

Before its steps, a round also **adapts the draft vocabulary** (FR-Spec's
frequency-ranked draft vocabulary, Zhao et al. 2025, arXiv 2502.14856, kept
per tenant and re-ranked on live traffic): the last ``vocab_slots`` draft ids,
which the static head gave to the least frequent tokens of its training
corpus, go to the tokens the target produced most often in the tenant's
buffer that the draft vocabulary lacks (at least ``vocab_min_count`` times),
each slot taking that token's row of the target's LM head. A head can never
draft a token outside its draft vocabulary, so on a domain the static corpus
never had (SQL's column names, tool calls' JSON punctuation) this is where
acceptance is lost first; the head's trained weights are unchanged by a swap,
and the gate judges the candidate with its vocabulary.

:class:`OnlineTrainer` is the in-process core (tests drive it directly);
:func:`trainer_main` runs it in a separate process behind a pipe, at the
lowest CPU priority and one torch thread (see :mod:`adaspec.online.learned`).
"""

from __future__ import annotations

import copy
import json
import math
import os
import signal
import time
import traceback
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from adaspec.online.buffer import LabelBuffer, TrafficDoc, docs_from_tensors, docs_to_tensors
from adaspec.online.versions import head_digest, load_version, publish, read_current, set_current, tenant_key
from adaspec.speculators.draft_head import DraftHeadNet
from adaspec.train.data import FeatureDoc

REPLAY_FORMAT = "adaspec.replay"
BUFFER_FILE = "buffer.safetensors"


@dataclass
class OnlineConfig:
    """Settings of online learning (defaults: what ``--online-learning`` uses).

    Attributes:
        min_new_positions: new labelled positions of a tenant that start a round. Default 192.
        min_heldout_positions: held-out positions needed before a candidate can be judged (rounds
            before that train it without judging or publishing it). Default 48.
        steps_per_round: optimizer steps per round. Default 24.
        batch_size: chain starts per step. Default 64.
        unroll: chained head steps per start (training-time test). Default 3.
        lr: AdamW learning rate (constant; fine-tuning from a trained head). Default 1e-4.
        feature_loss_weight: weight of the feature regression. Default 0.1.
        mix: shares of chain starts drawn from (recent, reservoir, replay);
            an empty part's share goes to the others. Default (0.5, 0.25, 0.25).
        eval_k: lookahead of the held-out evaluation. Default 4.
        eval_max_positions: most held-out start positions evaluated, from the newest held-out
            documents (candidates are judged on recent traffic). Default 512.
        min_gain: relative gain in held-out mean acceptance length a candidate
            needs over the serving version to be published. Default 0.01.
        vocab_slots: draft ids at the end of the static head's frequency order that
            a tenant's traffic may reassign to tokens missing from the draft
            vocabulary (see the module docstring); 0 keeps the static vocabulary. Default 1024.
        extra_rounds: rounds a tenant's candidate may train again on the data it has while no
            tenant has ``min_new_positions`` new positions (the trainer's core is otherwise idle;
            held-out acceptance keeps rising over a few passes over the same documents). Default 2.
        vocab_min_count: times a missing token must be the target's choice in the
            tenant's buffer (recent and reservoir) to take a slot. Default 2.
        max_tenants: tenants whose heads and optimizer states stay in the
            trainer's memory (least recently trained evicted; their published
            versions stay on disk). Default 4.
        keep_versions: versions kept on disk per tenant. Default 3.
        recent_positions / reservoir_positions / heldout_positions / heldout_every:
            the buffer's budgets (:class:`~adaspec.online.buffer.LabelBuffer`).
            Defaults 8192 / 8192 / 2048 / 5.
        save_buffer_every_s: a tenant's buffer with unsaved documents is written to
            ``ROOT/<tenant>/buffer.safetensors`` after each of its rounds, when the
            trainer stops or loses the server, and otherwise at most this often
            (seconds). 0 turns the buffer's persistence off. Default 30.
        seed: RNG seed.
    """

    min_new_positions: int = 192
    min_heldout_positions: int = 48
    steps_per_round: int = 24
    batch_size: int = 64
    unroll: int = 3
    lr: float = 1e-4
    feature_loss_weight: float = 0.1
    mix: tuple[float, float, float] = (0.5, 0.25, 0.25)
    eval_k: int = 4
    eval_max_positions: int = 512
    min_gain: float = 0.01
    vocab_slots: int = 1024
    vocab_min_count: int = 2
    extra_rounds: int = 2
    max_tenants: int = 4
    keep_versions: int = 3
    recent_positions: int = 8192
    reservoir_positions: int = 8192
    heldout_positions: int = 2048
    heldout_every: int = 5
    save_buffer_every_s: float = 30.0
    seed: int = 0

    def validate(self) -> None:
        """Raise ValueError naming the first invalid field."""
        for name in ("min_new_positions", "steps_per_round", "batch_size", "unroll", "eval_k",
                     "eval_max_positions", "max_tenants", "recent_positions", "reservoir_positions",
                     "heldout_positions"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"online learning: {name} must be >= 1, got {getattr(self, name)!r}")
        if int(self.extra_rounds) < 0:
            raise ValueError(f"online learning: extra_rounds must be >= 0, got {self.extra_rounds!r}")
        if int(self.vocab_slots) < 0 or int(self.vocab_min_count) < 1:
            raise ValueError(f"online learning: vocab_slots must be >= 0 and vocab_min_count >= 1, got "
                             f"{self.vocab_slots!r} and {self.vocab_min_count!r}")
        if self.keep_versions < 2:
            raise ValueError(f"online learning: keep_versions must be >= 2 (a rollback needs one), got {self.keep_versions}")
        if self.heldout_every < 2:
            raise ValueError(f"online learning: heldout_every must be >= 2, got {self.heldout_every}")
        if len(self.mix) != 3 or min(self.mix) < 0 or sum(self.mix) <= 0:
            raise ValueError(f"online learning: mix must be three shares >= 0 with a positive sum, got {self.mix!r}")
        if not (self.save_buffer_every_s >= 0 and math.isfinite(self.save_buffer_every_s)):
            raise ValueError(f"online learning: save_buffer_every_s must be >= 0, got {self.save_buffer_every_s!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)) or self.min_gain < 0:
            raise ValueError("online learning: lr must be > 0 and min_gain >= 0")


@dataclass
class RoundResult:
    """What one training round of a tenant did.

    Attributes:
        tenant: whose round.
        steps: optimizer steps taken.
        loss: mean training loss over the round.
        candidate_acceptance_length / serving_acceptance_length / static_acceptance_length:
            held-out greedy mean acceptance length at ``eval_k`` of the
            candidate, the version served before the round, and the static head.
        heldout_positions: held-out start positions evaluated.
        published: the new version number, or None when the candidate did not win.
        serving_version: the version served after the round (0: the static head).
        train_s / eval_s: seconds spent training and evaluating.
        buffer: the tenant's buffer sizes after the round (:meth:`LabelBuffer.stats`).
        vocab_changed: draft-vocabulary slots reassigned by this round.
        vocab_adapted: slots of the candidate's draft vocabulary that differ from the static head's.
    """

    tenant: str
    steps: int
    loss: float
    candidate_acceptance_length: float
    serving_acceptance_length: float
    static_acceptance_length: float
    heldout_positions: int
    published: Optional[int]
    serving_version: int
    train_s: float
    eval_s: float
    buffer: dict = field(default_factory=dict)
    vocab_changed: int = 0
    vocab_adapted: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class _TenantState:
    buffer: LabelBuffer
    net: Optional[DraftHeadNet] = None  # the candidate being trained (float32); None while evicted
    opt: Optional[torch.optim.Optimizer] = None
    serving_version: int = 0  # 0: the static head
    serving_acceptance_length: Optional[float] = None  # on the held-out set at the last round
    rounds: int = 0
    history: list[dict] = field(default_factory=list)
    unsaved: bool = False  # documents arrived since the buffer was last written
    saved_at: float = 0.0  # time.monotonic() of the last write
    extra_rounds: int = 0  # rounds on the same data since the last round with new data
    eval_cache: tuple = ((), {})  # (held-out documents, {version: their evaluation}) of unchanging heads


class OnlineTrainer:
    """Per-tenant fine-tuning of the draft head with gated publication (see the module docstring).

    Args:
        base: the static head (float32); never modified.
        embed: ``[V, H]`` float32 target input embeddings.
        root: folder the versions are published to (see :mod:`adaspec.online.versions`).
        config: settings. Default :class:`OnlineConfig`.
        replay: broad-data documents mixed into every round (may be empty).
        lm_head: ``[V, H]`` the target's LM-head weight (any float dtype), the rows a
            reassigned draft id takes; None: ``embed`` (a target with tied embeddings).

    Raises:
        ValueError: an invalid config, or embeddings or an LM head that do not fit the head.
    """

    def __init__(self, base: DraftHeadNet, embed: torch.Tensor, root: str | Path,
                 config: Optional[OnlineConfig] = None, replay: Sequence[FeatureDoc] = (),
                 lm_head: Optional[torch.Tensor] = None) -> None:
        self.config = config or OnlineConfig()
        self.config.validate()
        cfg = base.config
        if tuple(embed.shape) != (cfg.target_vocab_size, cfg.hidden_size):
            raise ValueError(f"embeddings {tuple(embed.shape)} do not fit the draft head "
                             f"({cfg.target_vocab_size} x {cfg.hidden_size})")
        self.base = base.eval()
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.base_digest = head_digest(base)
        self.embed = embed.float()
        if lm_head is not None and tuple(lm_head.shape) != tuple(embed.shape):
            raise ValueError(f"LM head {tuple(lm_head.shape)} does not fit the draft head "
                             f"({cfg.target_vocab_size} x {cfg.hidden_size})")
        self.lm_head = self.embed if lm_head is None else lm_head
        self._base_slot = {int(t): i for i, t in enumerate(base.draft_to_target.tolist())}
        self.root = Path(root)
        self.replay = [d for d in replay if len(d) >= 2]
        self._tenants: dict[str, _TenantState] = {}
        self._resident: OrderedDict[str, None] = OrderedDict()  # tenants whose nets are in memory, LRU order
        self._gen = torch.Generator().manual_seed(self.config.seed)
        self.restored: dict[str, dict] = {}  # tenants whose buffer was read back from disk: its sizes
        self.restore_errors: dict[str, str] = {}  # tenants whose saved buffer could not be used: why

    # ---------------------------------------------------------------- data
    def tenant(self, tenant: str) -> _TenantState:
        st = self._tenants.get(tenant)
        if st is None:
            c = self.config
            st = self._tenants[tenant] = _TenantState(LabelBuffer(c.recent_positions, c.reservoir_positions,
                                                                  c.heldout_every, c.heldout_positions, seed=c.seed))
            current = read_current(self.root, tenant)
            if current is not None and current.get("base") == self.base_digest:
                st.serving_version = int(current["version"])
            st.saved_at = time.monotonic()
            self._restore_buffer(tenant, st)
        return st

    def add_doc(self, tenant: str, doc: TrafficDoc) -> str:
        """Add a finished request's labels to ``tenant``'s buffer; returns "recent" or "heldout"."""
        st = self.tenant(tenant)
        where = st.buffer.add(doc)
        st.unsaved = True
        return where

    # ---------------------------------------------------------------- the buffer on disk
    def buffer_path(self, tenant: str) -> Path:
        """Where ``tenant``'s label buffer is saved."""
        return self.root / tenant_key(tenant) / BUFFER_FILE

    def _restore_buffer(self, tenant: str, st: _TenantState) -> None:
        """Read ``tenant``'s saved buffer, if any (a damaged or foreign file is set aside, not trusted)."""
        path = self.buffer_path(tenant)
        if not self.config.save_buffer_every_s or not path.is_file():
            return
        try:
            info = st.buffer.load(path, hidden_size=self.base.config.hidden_size)
            if info.get("base") not in (None, self.base_digest):
                raise ValueError("saved for another static head")
            self.restored[tenant] = st.buffer.stats()
        except (OSError, ValueError) as e:
            st.buffer.clear()
            self.restore_errors[tenant] = str(e)
            try:
                path.replace(path.with_name(path.name + ".bad"))
            except OSError:
                pass

    def restore_saved_buffers(self) -> list[str]:
        """Read back every tenant's buffer saved under the root (at start-up); returns the tenants restored."""
        from safetensors import safe_open

        if not self.config.save_buffer_every_s or not self.root.is_dir():
            return []
        for path in sorted(self.root.glob(f"*/{BUFFER_FILE}")):
            try:
                with safe_open(str(path), framework="pt") as f:
                    tenant = json.loads((f.metadata() or {}).get("info") or "{}").get("tenant")
            except Exception as e:  # noqa: BLE001 - unreadable header: its tenant is unknown, so it is only reported
                self.restore_errors[path.parent.name] = f"{path}: {e}"
                continue
            if isinstance(tenant, str) and path.parent.name == tenant_key(tenant):
                self.tenant(tenant)
        return sorted(self.restored)

    def save_buffers(self, force: bool = False) -> list[str]:
        """Write the buffers with unsaved documents (all of them with ``force``, else those last written at least
        ``save_buffer_every_s`` ago); returns the tenants written. A failed write keeps the document unsaved."""
        every = self.config.save_buffer_every_s
        if not every:
            return []
        now = time.monotonic()
        done = []
        for tenant, st in list(self._tenants.items()):
            if not st.unsaved or (not force and now - st.saved_at < every):
                continue
            try:
                st.buffer.save(self.buffer_path(tenant), info={"base": self.base_digest, "tenant": tenant})
            except OSError:
                continue
            st.unsaved, st.saved_at = False, now
            done.append(tenant)
        return done

    def _drop_buffer_file(self, tenant: str) -> None:
        try:
            self.buffer_path(tenant).unlink(missing_ok=True)
        except OSError:
            pass

    def ready(self, tenant: str) -> bool:
        """Whether ``tenant`` has enough new data for a round (with too little held-out data yet, the
        round trains the candidate but does not judge it)."""
        st = self._tenants.get(tenant)
        return st is not None and st.buffer.new_positions >= self.config.min_new_positions

    def next_tenant(self) -> Optional[str]:
        """The ready tenant with the most new positions, or None."""
        ready = [t for t in self._tenants if self.ready(t)]
        return max(ready, key=lambda t: self._tenants[t].buffer.new_positions) if ready else None

    def idle_tenant(self) -> Optional[str]:
        """A tenant to train again on the data it has while no tenant is ready (the most recently trained
        one with fewer than ``extra_rounds`` rounds since its last new data), or None."""
        for t in reversed(self._resident):
            st = self._tenants.get(t)
            if st is not None and st.net is not None and st.extra_rounds < self.config.extra_rounds:
                return t
        return None

    def forget_tenant(self, tenant: str) -> None:
        """Drop ``tenant``'s buffer (its file included) and in-memory head (its published versions are the
        caller's to delete)."""
        self._tenants.pop(tenant, None)
        self._resident.pop(tenant, None)
        self._drop_buffer_file(tenant)

    def clear_buffers(self) -> None:
        """Empty every tenant's buffer, files included (after a policy update, old traffic predicts the new
        target less well)."""
        for st in self._tenants.values():
            st.buffer.clear()
            st.unsaved = False
        if self.root.is_dir():  # every tenant's saved traffic, seen since the start or not
            for path in self.root.glob(f"*/{BUFFER_FILE}"):
                path.unlink(missing_ok=True)

    # ---------------------------------------------------------------- heads
    def serving_net(self, tenant: str) -> DraftHeadNet:
        """The head ``tenant`` is served now (the static head before any version)."""
        st = self.tenant(tenant)
        if st.serving_version:
            try:
                return load_version(self.root, tenant, st.serving_version, self.base)
            except (FileNotFoundError, ValueError):
                st.serving_version = 0
        return self.base

    def _candidate(self, tenant: str) -> _TenantState:
        st = self.tenant(tenant)
        if st.net is None:
            st.net = copy.deepcopy(self.serving_net(tenant)).train()
            for name, p in st.net.named_parameters():
                p.requires_grad_(True)
            st.opt = torch.optim.AdamW([p for p in st.net.parameters() if p.requires_grad], lr=self.config.lr,
                                       betas=(0.9, 0.95), weight_decay=0.0)
        self._resident[tenant] = None
        self._resident.move_to_end(tenant)
        while len(self._resident) > self.config.max_tenants:
            old, _ = self._resident.popitem(last=False)
            o = self._tenants.get(old)
            if o is not None:
                o.net, o.opt = None, None  # its published version stays on disk
        return st

    def rollback(self, tenant: str, to_version: int) -> None:
        """The server rolled ``tenant`` back to ``to_version``: train on from it, judge against it."""
        st = self.tenant(tenant)
        if to_version:
            set_current(self.root, tenant, to_version, info={"rollback": True})
        st.serving_version = to_version
        st.serving_acceptance_length = None
        st.net, st.opt = None, None
        self._resident.pop(tenant, None)

    # ---------------------------------------------------------------- a round
    def _mixed_starts(self, packed, parts: list[tuple[int, int]], n: int) -> torch.Tensor:
        """``n`` chain starts, each part (start-index range) drawn with its share of ``config.mix``."""
        weights = torch.zeros(packed.starts.numel())
        shares = [s if hi > lo else 0.0 for s, (lo, hi) in zip(self.config.mix, parts)]
        total = sum(shares)
        for s, (lo, hi) in zip(shares, parts):
            if hi > lo and s > 0:
                weights[lo:hi] = s / total / (hi - lo)
        return packed.starts[torch.multinomial(weights, n, replacement=True, generator=self._gen)]

    def _pack_parts(self, groups: list[list[FeatureDoc]]):
        """Pack the groups (recent, reservoir, replay) together; chain starts sorted by group.

        Returns:
            ``(packed, parts)``: ``packed.starts`` holds only starts whose
            feature at ``s - 1`` was captured (generated positions), and
            ``parts[g]`` is the ``(lo, hi)`` index range of group g's starts.
        """
        from adaspec.train.draft_head import pack

        docs, group_of_pos = [], []
        for gi, g in enumerate(groups):
            for d in g:
                if len(d) >= 2:  # what pack() keeps
                    docs.append(d)
                    group_of_pos.append(torch.full((len(d),), gi, dtype=torch.long))
        if not docs:
            raise ValueError("no document with at least two positions")
        packed = pack(docs, self.base.config.context_ngram)
        starts = packed.starts[packed.generated[packed.starts]]
        group = torch.cat(group_of_pos)[starts]
        order = torch.argsort(group, stable=True)
        packed.starts, group = starts[order], group[order]
        parts = []
        for gi in range(len(groups)):
            idx = (group == gi).nonzero().flatten()
            parts.append((int(idx[0]), int(idx[-1]) + 1) if idx.numel() else (0, 0))
        return packed, parts

    def heldout_packed(self, tenant: str):
        """The tenant's newest held-out documents (``eval_max_positions`` labelled positions' worth, newest
        first) packed for :func:`evaluate_head`, or None when there are none.

        Candidates are judged on recent traffic: after a shift, older held-out documents would mostly measure
        the domains left behind (replay and the reservoir keep those in training)."""
        st = self.tenant(tenant)
        newest, n = [], 0
        for d in reversed(st.buffer.heldout):
            if n >= self.config.eval_max_positions:
                break
            newest.append(d)
            n += d.num_labels
        docs = [d.to_feature_doc() for d in reversed(newest)]
        if not docs:
            return None
        try:
            packed, _ = self._pack_parts([docs])
        except ValueError:  # no document long enough
            return None
        packed.heldout_docs = tuple(newest)  # which documents (identity), for the evaluation cache
        return packed if packed.starts.numel() else None

    def _evaluate_cached(self, st: "_TenantState", key: Any, net: DraftHeadNet, packed) -> float:
        """:meth:`evaluate` of a head that does not change (the static head, a published version),
        reused while the held-out documents are the same ones."""
        docs, cache = st.eval_cache
        same = len(docs) == len(packed.heldout_docs) and all(a is b for a, b in zip(docs, packed.heldout_docs))
        if not same:
            cache = {}
            st.eval_cache = (packed.heldout_docs, cache)
        if key not in cache:
            cache[key] = self.evaluate(net, packed)
        return cache[key]

    def evaluate(self, net: DraftHeadNet, packed) -> float:
        """Greedy mean acceptance length at ``eval_k`` of ``net`` on ``packed`` (held-out starts)."""
        from adaspec.train.draft_head import evaluate_head

        ev = evaluate_head(net, self.embed, packed, max_k=self.config.eval_k,
                           max_positions=self.config.eval_max_positions, seed=self.config.seed)
        return float(ev["overall"]["acceptance_length"][str(self.config.eval_k)])

    @staticmethod
    def vocabulary_counts(docs: Sequence[TrafficDoc], vocab_size: int) -> torch.Tensor:
        """``[V]`` int64: how often the target chose each token at the labelled positions of ``docs``."""
        return torch.bincount(torch.cat([d.target_argmax.long() for d in docs]).clamp(0, vocab_size - 1),
                              minlength=vocab_size)

    def adapt_vocabulary(self, net: DraftHeadNet, docs: Sequence[TrafficDoc]) -> int:
        """Reassign ``net``'s last ``vocab_slots`` draft ids to the tokens ``docs`` need (module docstring).

        The slots' occupants are chosen among the static head's tokens of those
        slots and the tokens outside the static draft vocabulary that the target
        chose at least ``vocab_min_count`` times in ``docs``: most chosen first,
        a static occupant before a newcomer on a tie (then in the static order).
        An occupant that stays keeps its slot. Changes ``net.draft_to_target``
        and ``net.lm_head`` in place.

        Returns:
            the number of slots whose token changed.
        """
        c = self.config
        Vd = int(self.base.draft_to_target.numel())
        S = min(int(c.vocab_slots), Vd - 1)
        if S <= 0 or not docs:
            return 0
        V = int(self.embed.shape[0])
        counts = self.vocabulary_counts(docs, V)
        lo = Vd - S
        base_d2t = self.base.draft_to_target
        kept = torch.zeros(V, dtype=torch.bool)
        kept[base_d2t[:lo]] = True  # never reassigned
        tail = base_d2t[lo:]  # the static occupants, most frequent first
        newcomers = ((counts >= int(c.vocab_min_count)) & ~kept).nonzero().flatten()
        newcomers = newcomers[~torch.isin(newcomers, tail)]
        pool = torch.cat([tail, newcomers])
        is_static = torch.cat([torch.ones(tail.numel(), dtype=torch.long), torch.zeros(newcomers.numel(), dtype=torch.long)])
        order = torch.arange(pool.numel())
        # sort by (count desc, static first, position in pool asc): keys combined into one int64
        key = counts[pool].long() * (2 * pool.numel() + 2) + is_static * (pool.numel() + 1) + (pool.numel() - order)
        chosen = pool[torch.argsort(key, descending=True, stable=True)[:S]].tolist()
        want = set(chosen)
        current = net.draft_to_target[lo:].tolist()
        placed = {t for t in current if t in want}
        queue = [t for t in chosen if t not in placed]
        changed = 0
        for i, t in enumerate(current):
            if t in want or not queue:
                continue
            new = queue.pop(0)
            slot = lo + i
            net.draft_to_target[slot] = new
            b = self._base_slot.get(new)
            net.lm_head[slot] = self.base.lm_head[b] if b is not None else (
                self.lm_head[new].to(torch.float16).to(net.lm_head.dtype))
            changed += 1
        return changed

    def train_round(self, tenant: str) -> RoundResult:
        """One round for ``tenant`` (see the module docstring); publishes a winning candidate.

        Raises:
            ValueError: the tenant has no labelled traffic to train on.
        """
        from adaspec.train.draft_head import chain_loss

        c = self.config
        st = self._candidate(tenant)
        buf = st.buffer
        recent = [d.to_feature_doc() for d in buf.recent]
        reservoir = [d.to_feature_doc() for d in buf.reservoir]
        if not recent and not reservoir:
            raise ValueError(f"tenant {tenant!r} has no traffic to train on")
        packed, parts = self._pack_parts([recent, reservoir, list(self.replay)])
        if packed.starts.numel() == 0:
            raise ValueError(f"tenant {tenant!r} has no labelled positions to train on")
        st.extra_rounds = st.extra_rounds + 1 if buf.new_positions < c.min_new_positions else 0
        buf.new_positions = 0
        t0 = time.perf_counter()
        net, opt = st.net, st.opt
        vocab_changed = self.adapt_vocabulary(net, list(buf.recent) + list(buf.reservoir))
        net.train()
        losses = []
        for _ in range(c.steps_per_round):
            starts = self._mixed_starts(packed, parts, c.batch_size)
            loss, _ = chain_loss(net, self.embed, packed, starts, c.unroll, c.feature_loss_weight, None)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            opt.step()
            losses.append(float(loss.detach()))
        net.eval()
        train_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        held = self.heldout_packed(tenant) if buf.heldout_positions >= c.min_heldout_positions else None
        n_held = int(held.starts.numel()) if held is not None else 0
        cand = self.evaluate(net, held) if held is not None else float("nan")
        static = self._evaluate_cached(st, 0, self.base, held) if held is not None else float("nan")
        serving = static if st.serving_version == 0 else (
            self._evaluate_cached(st, st.serving_version, self.serving_net(tenant), held)
            if held is not None else float("nan"))
        eval_s = time.perf_counter() - t1
        published = None
        if held is not None and n_held >= 1 and cand > serving * (1.0 + c.min_gain):
            info = {"heldout_acceptance_length": round(cand, 4), "serving_acceptance_length": round(serving, 4),
                    "static_acceptance_length": round(static, 4), "heldout_positions": n_held,
                    "positions_seen": buf.positions_seen, "eval_k": c.eval_k, "time": time.time()}
            published = publish(self.root, tenant, net, self.base_digest, info=info, keep=c.keep_versions,
                                base=self.base)
            st.serving_version = published
            st.serving_acceptance_length = cand
        else:
            st.serving_acceptance_length = serving
        st.rounds += 1
        result = RoundResult(tenant, c.steps_per_round, sum(losses) / max(1, len(losses)), cand, serving, static,
                             n_held, published, st.serving_version, round(train_s, 3), round(eval_s, 3))
        st.history.append(result.to_dict())
        del st.history[:-50]
        result.buffer = buf.stats()
        result.vocab_changed = vocab_changed
        result.vocab_adapted = int((net.draft_to_target != self.base.draft_to_target).sum())
        return result

    def stats(self) -> dict:
        """Per tenant: buffer sizes, serving version, rounds, the last round."""
        return {t: {"buffer": st.buffer.stats(), "serving_version": st.serving_version, "rounds": st.rounds,
                    "last_round": st.history[-1] if st.history else None} for t, st in self._tenants.items()}


# ---------------------------------------------------------------- replay of broad data
def save_replay(path: str | Path, docs: Sequence[TrafficDoc], info: Optional[dict] = None) -> Path:
    """Write broad-data documents (as captured from the target) to a safetensors file, atomically."""
    import json

    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = docs_to_tensors(docs)
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": REPLAY_FORMAT, "info": json.dumps(info or {})})
    tmp.replace(path)
    return path


def load_replay(path: str | Path) -> list[TrafficDoc]:
    """Read :func:`save_replay`'s file.

    Raises:
        FileNotFoundError / ValueError: missing file, or not a replay file.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no replay file at {path}")
    with safe_open(str(path), framework="pt") as f:
        if (f.metadata() or {}).get("format") != REPLAY_FORMAT:
            raise ValueError(f"{path} is not a replay file")
        t = {k: f.get_tensor(k) for k in f.keys()}
    return docs_from_tensors(t, prefix="replay/")


def shipped_replay_path(target_name: str) -> Path:
    """Where the packaged replay file for ``target_name`` lives (it may not exist)."""
    return Path(__file__).resolve().parent.parent / "data" / f"replay-{target_name}.safetensors"


# ---------------------------------------------------------------- the process
def send_message(conn: Any, msg: tuple) -> None:
    """Send ``msg`` as plain pickle bytes (tensors inline: the two processes share no memory)."""
    import pickle

    conn.send_bytes(pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL))


def recv_message(conn: Any) -> tuple:
    """Receive what :func:`send_message` sent. Raises EOFError when the other side is gone."""
    import pickle

    return pickle.loads(conn.recv_bytes())


def trainer_main(conn_in: Any, conn_out: Any) -> None:
    """The trainer process's loop: read ``conn_in`` until it closes or says "stop".

    The first message is ``("init", base_path, embed, root, config_dict, replay_path, lm_head)``:
    the static head's checkpoint, the ``[V, H]`` target input embeddings, the
    versions folder, :class:`OnlineConfig` fields, the replay file (or None) and
    the ``[V, H]`` target LM head (None: tied to the embeddings).
    Then, in: ``("doc", tenant, TrafficDoc)``, ``("rollback", tenant, version)``,
    ``("forget", tenant)``, ``("policy_update",)``, ``("stats",)``, ``("stop",)``.
    Out, on ``conn_out``: ``("ready", info)`` once, ``("round", RoundResult dict)``
    after each round (``published`` set when a version was written),
    ``("stats", dict)``, ``("error", text)`` when something failed (the trainer goes on).

    Runs at the lowest CPU priority with one torch thread, so serving keeps
    the cores it needs.
    """
    try:
        os.nice(19)
    except OSError:
        pass
    torch.set_num_threads(1)
    from adaspec.speculators.draft_head import load_draft_head

    try:
        init = recv_message(conn_in)
    except (EOFError, OSError):
        return
    _, base_path, embed, root, config, replay_path, lm_head = init
    base, _ = load_draft_head(base_path)
    replay = []
    if replay_path:
        try:
            replay = [d.to_feature_doc(source="replay") for d in load_replay(replay_path)]
        except (OSError, ValueError) as e:
            send_message(conn_out, ("error", f"replay data not used: {e}"))
    trainer = OnlineTrainer(base, embed.float(), root, OnlineConfig(**config), replay=replay, lm_head=lm_head)
    del embed
    restored = trainer.restore_saved_buffers()
    send_message(conn_out, ("ready", {"pid": os.getpid(), "replay_docs": len(replay),
                                      "restored_buffers": {t: trainer.restored[t] for t in restored}}))

    def on_term(signum: int, frame: Any) -> None:
        raise _Terminated()

    signal.signal(signal.SIGTERM, on_term)  # terminated mid-round by the server's close: keep the buffers
    try:
        _trainer_loop(trainer, conn_in, conn_out)
    except _Terminated:
        trainer.save_buffers(force=True)


class _Terminated(BaseException):
    """SIGTERM reached the trainer process."""


def _trainer_loop(trainer: OnlineTrainer, conn_in: Any, conn_out: Any) -> None:
    while True:
        try:
            # Drain what arrived; wait a little when there is nothing to train.
            timeout = 0.0 if trainer.next_tenant() is not None else 0.5
            while conn_in.poll(timeout):
                msg = recv_message(conn_in)
                timeout = 0.0
                kind = msg[0]
                if kind == "stop":
                    trainer.save_buffers(force=True)
                    return
                if kind == "doc":
                    trainer.add_doc(msg[1], msg[2])
                elif kind == "rollback":
                    trainer.rollback(msg[1], int(msg[2]))
                elif kind == "forget":
                    trainer.forget_tenant(msg[1])
                elif kind == "policy_update":
                    trainer.clear_buffers()
                elif kind == "stats":
                    send_message(conn_out, ("stats", trainer.stats()))
        except (EOFError, OSError):
            trainer.save_buffers(force=True)  # the server is gone (maybe crashed): keep what it taught
            return
        tenant = trainer.next_tenant()
        if tenant is None:
            trainer.save_buffers()
            tenant = trainer.idle_tenant()  # nothing new: another round on what the last tenant has
            if tenant is None or conn_in.poll(0):
                continue
        try:
            result = trainer.train_round(tenant).to_dict()
            trainer.save_buffers(force=True)
            send_message(conn_out, ("round", result))
        except (EOFError, OSError):
            trainer.save_buffers(force=True)
            return
        except Exception:  # a bad round must not end learning for everyone
            try:
                send_message(conn_out, ("error", traceback.format_exc(limit=5)))
            except (EOFError, OSError):
                return


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m adaspec.online.trainer FD_IN FD_OUT``: the trainer process on two inherited pipe ends."""
    import sys
    from multiprocessing.connection import Connection

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m adaspec.online.trainer FD_IN FD_OUT (started by the server)", file=sys.stderr)
        return 2
    conn_in = Connection(int(args[0]), writable=False)
    conn_out = Connection(int(args[1]), readable=False)
    trainer_main(conn_in, conn_out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
