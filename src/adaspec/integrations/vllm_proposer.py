"""Run adaspec's adaptive speculator as vLLM's ``custom_class`` proposer.

vLLM (>= 0.32) loads a user class as its drafter with::

    LLM(model=..., speculative_config={
        "method": "custom_class",
        "model": "adaspec.integrations.vllm_proposer.AdaspecSuffixProposer",
        "num_speculative_tokens": 8})

The class is built with the ``VllmConfig``, gets ``load_model(...)``, then, each
step, ``propose(sampled_token_ids, num_tokens_no_spec, token_ids_cpu,
slot_mappings=None)`` for the whole batch and returns one draft list per
request (lengths may differ; ``[]`` means no draft). vLLM brings tensor and
pipeline parallelism and multi-node serving; this adapter brings the learning
speculator. It imports nothing from vLLM or transformers: the batch arrives as
numpy arrays and token lists.

**Which request is in which row.** vLLM's hook passes only rows of its
persistent batch, and vLLM moves requests between rows (a finished request's
row is filled by the last one, a new request takes a free row, a preempted one
comes back elsewhere). So the adapter follows requests by their tokens: a row
continues the tracked request whose committed tokens are a prefix of the
row's (its own row's first, then any other); a row that continues none is a
new request; a tracked request no row continues has finished (or was
preempted) and is stopped, so its tokens are learned. New tokens of a
continued request are passed to ``observe`` with how much of last step's draft
they accepted.

**Learned state** (the same snapshot files as ``adaspec serve --state-dir``):
set ``ADASPEC_STATE_DIR`` in the environment vLLM's workers inherit (the hook
gets only the ``VllmConfig``). The proposer loads its snapshot when built and
writes it (atomically, :class:`adaspec.store.SnapshotStore`) from a daemon
thread every ``ADASPEC_SNAPSHOT_INTERVAL_S`` seconds (default 60) while
something was learned, and at interpreter exit. vLLM runs the proposer in a
spawned worker that is often killed at shutdown, so the interval is what
bounds the loss. A request that sees no step for ``IDLE_STOP_S`` seconds is
taken as finished (vLLM calls the hook every step while anything runs), so
what an idle server learned last is in the next snapshot.
``ADASPEC_TENANT`` names the tenant whose state is used (vLLM passes no
request metadata to the hook). Default "default". Under tensor parallelism
each rank's worker runs an identical proposer; all load the snapshot and
only rank 0 writes it.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import os
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np

from adaspec.controller import Controller
from adaspec.speculators.base import Speculator
from adaspec.types import DEFAULT_TENANT, DraftProposal, ProposeContext, common_prefix_len

log = logging.getLogger("adaspec.vllm")

_ids = itertools.count()

STATE_DIR_ENV = "ADASPEC_STATE_DIR"
SNAPSHOT_INTERVAL_ENV = "ADASPEC_SNAPSHOT_INTERVAL_S"
TENANT_ENV = "ADASPEC_TENANT"
DEFAULT_SNAPSHOT_INTERVAL_S = 60.0
IDLE_STOP_S = 5.0  # no hook call for this long: the tracked requests have finished


@dataclass
class _Tracked:
    """One request as the adapter follows it across steps and rows."""

    request_id: str
    tokens: list[int]  # committed tokens seen so far (prompt + output)
    prompt_len: int
    last_draft: list[int] = field(default_factory=list)


class AdaspecSuffixProposer:
    """vLLM ``custom_class`` drafter backed by an adaspec speculator.

    Args:
        vllm_config: vLLM's config; ``speculative_config.num_speculative_tokens``
            sets the lookahead (default 8 when absent); drafts are cut so they
            never pass ``model_config.max_model_len``.
        speculator: the speculator to run (default: a fresh SuffixSpeculator).
        tenant: tenant whose learned state is used. Default ``$ADASPEC_TENANT``
            or "default".
        state_dir: snapshot directory. Default ``$ADASPEC_STATE_DIR``; none
            means nothing is loaded or saved.
        snapshot_interval_s: seconds between snapshots while learning. Default
            ``$ADASPEC_SNAPSHOT_INTERVAL_S`` or 60; 0 saves only at exit.

    Attributes:
        snapshot_name: the snapshot file's name (``suffix``, or the
            controller's name for :class:`AdaspecAtlasProposer`), as the
            standalone engine names it.
        restored: whether learned state was loaded at start.
        snapshots: snapshots written so far.

    Raises:
        ValueError: a negative or non-numeric snapshot interval.
    """

    def __init__(self, vllm_config: Any = None, *args: Any, speculator: Optional[Speculator] = None,
                 tenant: Optional[str] = None, state_dir: Optional[str] = None,
                 snapshot_interval_s: Optional[float] = None, **kwargs: Any) -> None:
        spec_cfg = getattr(vllm_config, "speculative_config", None)
        self.lookahead = int(getattr(spec_cfg, "num_speculative_tokens", None) or 8)
        # Drafts never reach past the context window (docs/FAULT_CASES.md, F13): vLLM would
        # have to score positions the model does not have.
        model_cfg = getattr(vllm_config, "model_config", None)
        window = getattr(model_cfg, "max_model_len", None)
        self.max_model_len: Optional[int] = int(window) if window else None
        if speculator is None:
            from adaspec.speculators.suffix import SuffixSpeculator

            speculator = SuffixSpeculator()
        self.speculator = speculator
        self.tenant = tenant or os.environ.get(TENANT_ENV) or DEFAULT_TENANT
        self.snapshot_name = getattr(speculator, "snapshot_name", None) or speculator.name
        self._rows: dict[int, _Tracked] = {}  # row -> the request it held at the last step
        self._lock = threading.RLock()  # the hook's thread and the snapshot thread
        self._last_call = time.monotonic()
        self._learned = 0  # tokens observed so far
        self._saved_mark = 0
        self.restored = False
        self.snapshots = 0
        self._store = None
        self._stop = threading.Event()
        state_dir = state_dir if state_dir is not None else os.environ.get(STATE_DIR_ENV)
        if snapshot_interval_s is None:
            raw = os.environ.get(SNAPSHOT_INTERVAL_ENV, str(DEFAULT_SNAPSHOT_INTERVAL_S))
            try:
                snapshot_interval_s = float(raw)
            except ValueError:
                raise ValueError(f"{SNAPSHOT_INTERVAL_ENV} must be a number of seconds, got {raw!r}") from None
        if snapshot_interval_s < 0:
            raise ValueError(f"snapshot interval must be >= 0 seconds, got {snapshot_interval_s}")
        self.snapshot_interval_s = float(snapshot_interval_s)
        # Under tensor parallelism every rank's worker runs its own, identical proposer:
        # all of them load the snapshot, only rank 0 writes it.
        self.rank = int(getattr(getattr(vllm_config, "parallel_config", None), "rank", 0) or 0)
        if state_dir:
            self._open_store(state_dir)

    # ------------------------------------------------------------ learned state
    def _open_store(self, state_dir: str) -> None:
        from adaspec.store import SnapshotStore

        self._store = SnapshotStore(state_dir)
        state = self._store.load(self.snapshot_name)
        if state:
            try:
                self.speculator.load_state_dict(state)
                self.restored = True
                log.info("adaspec: restored learned state %r from %s", self.snapshot_name, state_dir)
            except ValueError as e:
                log.warning("adaspec: learned state %r not loaded (%s); it starts empty", self.snapshot_name, e)
        ref = weakref.ref(self)
        atexit.register(_save_at_exit, ref)
        threading.Thread(target=_snapshot_loop, args=(ref, self._stop), name="adaspec-vllm-snapshots",
                         daemon=True).start()

    def save_state(self, force: bool = False) -> bool:
        """Write the snapshot now if anything was learned since the last one (or ``force``).

        Returns:
            True if a snapshot was written. False without a state directory,
            with nothing new, or when the write failed (logged; the previous
            snapshot stays).
        """
        if self._store is None or self.rank != 0:
            return False
        with self._lock:
            if not force and self._learned == self._saved_mark:
                return False
            mark = self._learned
            state = self.speculator.state_dict()
        try:
            self._store.save(self.snapshot_name, state)
        except (OSError, ValueError, TypeError):
            log.exception("adaspec: could not write snapshot %r", self.snapshot_name)
            return False
        self._saved_mark = mark
        self.snapshots += 1
        return True

    def stop_idle(self) -> int:
        """Stop every tracked request when no step came for ``IDLE_STOP_S``; returns how many."""
        with self._lock:
            if not self._rows or time.monotonic() - self._last_call < IDLE_STOP_S:
                return 0
            n = len(self._rows)
            for tracked in self._rows.values():
                self.speculator.stop_request(tracked.request_id)
            self._rows = {}
            self._learned += n
            return n

    def close(self) -> None:
        """Stop the snapshot thread and write a last snapshot (idempotent)."""
        self._stop.set()
        with self._lock:
            for tracked in self._rows.values():
                self.speculator.stop_request(tracked.request_id)
            if self._rows:
                self._learned += len(self._rows)
            self._rows = {}
        self.save_state()

    # ------------------------------------------------------------------ drafting
    def load_model(self, *args: Any, **kwargs: Any) -> None:
        """Model-free speculator: nothing to load."""

    def propose(
        self,
        sampled_token_ids: Sequence[Sequence[int]],
        num_tokens_no_spec: np.ndarray,
        token_ids_cpu: np.ndarray,
        slot_mappings: Any = None,
    ) -> list[list[int]]:
        """Draft tokens for every request in the batch.

        Args:
            sampled_token_ids: per request, the tokens sampled this step (empty
                for a request still in chunked prefill: it gets no draft).
            num_tokens_no_spec: ``[num_reqs]`` int, valid tokens per row of
                ``token_ids_cpu`` (prompt + output, drafts excluded).
            token_ids_cpu: ``[num_reqs, max_model_len]`` int token ids.

        Returns:
            One list of draft token ids per request, each of length 0..lookahead.
        """
        with self._lock:
            self._last_call = time.monotonic()
            unclaimed = self._rows
            self._rows = {}
            drafts: list[list[int]] = []
            for row, sampled in enumerate(sampled_token_ids):
                n = int(num_tokens_no_spec[row])
                if not sampled or n == 0:
                    drafts.append([])
                    continue
                tracked = self._claim(row, token_ids_cpu[row], n, len(sampled), unclaimed)
                self._rows[row] = tracked
                room = self.lookahead if self.max_model_len is None else min(self.lookahead, self.max_model_len - n)
                if room <= 0:
                    tracked.last_draft = []
                    drafts.append([])
                    continue
                ctx = ProposeContext(request_id=tracked.request_id, token_ids=tracked.tokens,
                                     num_prompt_tokens=tracked.prompt_len, tenant=self.tenant)
                draft = [int(t) for t in self.speculator.propose(ctx, room).token_ids][:room]
                tracked.last_draft = draft
                drafts.append(draft)
            # Requests no row continues have finished (or were preempted): learn them.
            for tracked in unclaimed.values():
                self.speculator.stop_request(tracked.request_id)
            return drafts

    def _claim(self, row: int, row_ids: np.ndarray, n: int, num_sampled: int,
               unclaimed: dict[int, _Tracked]) -> _Tracked:
        """The tracked request row ``row`` continues (removed from ``unclaimed``), or a new one."""
        candidates = ([row] if row in unclaimed else []) + [r for r in unclaimed if r != row]
        for r in candidates:
            tracked = unclaimed[r]
            m = len(tracked.tokens)
            if m > n or int(row_ids[m - 1]) != tracked.tokens[-1] or int(row_ids[0]) != tracked.tokens[0]:
                continue
            if row_ids[:m].tolist() != tracked.tokens:
                continue
            del unclaimed[r]
            new = [int(t) for t in row_ids[m:n]]
            if new:
                # vLLM committed the accepted prefix of last step's draft plus one
                # token: tell the speculator how its draft fared.
                accepted = common_prefix_len(tracked.last_draft, new[:-1])
                self.speculator.observe(tracked.request_id, new, accepted, len(tracked.last_draft))
                tracked.tokens.extend(new)
                self._learned += len(new)
            return tracked
        tokens = [int(t) for t in row_ids[:n]]
        rid = f"vllm-row{row}-{next(_ids)}"
        prompt_len = max(1, n - num_sampled)
        self.speculator.start_request(rid, tokens[:prompt_len], self.tenant)
        if tokens[prompt_len:]:
            self.speculator.observe(rid, tokens[prompt_len:], 0, 0)
        self._learned += n
        return _Tracked(rid, tokens, prompt_len)


def _snapshot_loop(ref: "weakref.ref[AdaspecSuffixProposer]", stop: threading.Event) -> None:
    """The snapshot thread: idle requests stopped, then a snapshot, every interval (weakly held)."""
    while True:
        prop = ref()
        if prop is None:
            return
        interval = prop.snapshot_interval_s
        del prop
        if stop.wait(min(interval, IDLE_STOP_S) if interval > 0 else IDLE_STOP_S):
            return
        prop = ref()
        if prop is None:
            return
        prop.stop_idle()
        if interval > 0 and time.monotonic() - getattr(prop, "_last_save_try", 0.0) >= interval:
            prop._last_save_try = time.monotonic()
            prop.save_state()
        del prop


def _save_at_exit(ref: "weakref.ref[AdaspecSuffixProposer]") -> None:
    prop = ref()
    if prop is not None:
        prop.close()


class ControlledDrafter(Speculator):
    """A controller and its speculators presented as the one drafter a proposer hook expects.

    Fans the request lifecycle out as the engine does (every speculator sees
    every request and committed token; the controller judges its drafts) and
    drafts through ``controller.propose``.
    """

    name = "controlled"

    def __init__(self, controller: Controller) -> None:
        self.controller = controller
        self.speculators = {s.name: s for s in controller.speculators}
        self.snapshot_name = controller.name  # saved as the engine saves it (Engine.learned_state)

    def start_request(self, request_id: str, prompt_ids: Sequence[int], tenant: str = DEFAULT_TENANT) -> None:
        for s in self.speculators.values():
            s.start_request(request_id, prompt_ids, tenant)
        self.controller.start_request(request_id, prompt_ids, tenant)

    def propose(self, ctx: ProposeContext, max_draft_tokens: int) -> DraftProposal:
        return self.controller.propose(ctx, max_draft_tokens, self.speculators).proposal

    def observe(self, request_id: str, token_ids: Sequence[int], num_accepted: int, num_draft_tokens: int) -> None:
        self.controller.observe(request_id, token_ids, num_accepted, num_draft_tokens)
        for s in self.speculators.values():
            s.observe(request_id, token_ids, num_accepted, num_draft_tokens)

    def stop_request(self, request_id: str) -> None:
        for s in self.speculators.values():
            s.stop_request(request_id)
        self.controller.stop_request(request_id)

    def state_dict(self) -> dict[str, Any]:
        return self.controller.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.controller.load_state_dict(state)


class AdaspecAtlasProposer(AdaspecSuffixProposer):
    """vLLM ``custom_class`` drafter running adaspec's confidence-aware controller over the suffix speculator.

    The same :class:`~adaspec.controller.ConfidenceAwareController` as
    ``--speculator atlas``, without the static draft head (the hook passes no
    hidden states): each step it drafts, for each request, the suffix
    speculator's draft cut to the length that maximises expected tokens per
    second, or nothing. vLLM reports no verify times through the hook, so the
    cost model keeps its flat prior (verification as cheap for k tokens as for
    one, as on a GPU).

    Load with ``"model": "adaspec.integrations.vllm_proposer.AdaspecAtlasProposer"``.

    Attributes:
        controller: the controller (its acceptance estimates, ``choices``).
    """

    def __init__(self, vllm_config: Any = None, *args: Any, tenant: str = DEFAULT_TENANT, **kwargs: Any) -> None:
        from adaspec.controller import ConfidenceAwareController
        from adaspec.speculators.suffix import SuffixSpeculator

        self.controller = ConfidenceAwareController(adaptive=SuffixSpeculator())
        super().__init__(vllm_config, *args, speculator=ControlledDrafter(self.controller), tenant=tenant, **kwargs)
