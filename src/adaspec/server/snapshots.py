"""Learned-state snapshots while the server runs: on an interval, after enough learning, at shutdown.

The speculators' ``state_dict()`` is taken on the engine worker thread between
two steps (:meth:`Scheduler.run_between_steps`), so it is never read half-way
through an update; encoding and the atomic write (temp file, fsync, rename:
:meth:`adaspec.store.SnapshotStore.save`) happen on the saver's own thread, off
the request path. A crash therefore loses at most one interval, and a file on
disk is always a whole snapshot (an old one or the new one).

Triggers: ``interval_s`` since the last snapshot, or ``learned_tokens`` new
tokens (prompt + generated, as the server counted them) since the last one,
whichever comes first, and never more often than ``MIN_GAP_S``. Nothing is
written while nothing was learned (unless :meth:`SnapshotSaver.mark_dirty`).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable, Optional

log = logging.getLogger("adaspec.server")

DEFAULT_SNAPSHOT_INTERVAL_S = 60.0
DEFAULT_SNAPSHOT_TOKENS = 50_000
MIN_GAP_S = 1.0  # snapshots at most this often, whatever the triggers say
POLL_S = 0.25  # how often the saver checks the token trigger


def collect_learned_state(engine: Any) -> dict[str, dict[str, Any]]:
    """Every part's learned state by snapshot name (``Engine.learned_state``); call on the engine's thread."""
    try:
        return engine.learned_state()
    except Exception:
        log.exception("could not read the learned state")
        raise


class SnapshotSaver:
    """A daemon thread that snapshots learned state on an interval.

    Args:
        store: ``save(name, state)`` (an :class:`adaspec.store.SnapshotStore`).
        collect: returns ``{speculator: state_dict}`` read consistently (e.g.
            on the engine thread between steps); blocking.
        progress: a counter of tokens seen so far (monotonic), for the
            learned-tokens trigger.
        interval_s: seconds between snapshots while something was learned;
            0 disables the timer. Default 60.
        learned_tokens: snapshot early after this many new tokens; 0 disables.
            Default 50_000.
        last_snapshot_unix: when the state loaded at start-up was written
            (the age gauge starts from it), or None.

    Attributes:
        last_good_unix: wall time of the newest snapshot known to be on disk
            (or the server start, before any).
        snapshots: snapshots written by this saver.
    """

    def __init__(self, store: Any, collect: Callable[[], dict[str, dict[str, Any]]],
                 progress: Callable[[], float] = lambda: 0.0, interval_s: float = DEFAULT_SNAPSHOT_INTERVAL_S,
                 learned_tokens: int = DEFAULT_SNAPSHOT_TOKENS,
                 last_snapshot_unix: Optional[float] = None) -> None:
        if interval_s < 0 or learned_tokens < 0:
            raise ValueError(f"need interval_s >= 0 and learned_tokens >= 0, got {interval_s}, {learned_tokens}")
        self.store = store
        self.collect = collect
        self.progress = progress
        self.interval_s = interval_s
        self.learned_tokens = learned_tokens
        self.last_good_unix = last_snapshot_unix or time.time()
        self.snapshots = 0
        self._last_attempt = time.monotonic()
        self._mark = progress()
        self._dirty = False
        self._lock = threading.Lock()  # one snapshot at a time (timer, shutdown, admin)
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def age_s(self) -> float:
        """Seconds since the last good snapshot (the ``adaspec_snapshot_age_seconds`` gauge)."""
        return max(0.0, time.time() - self.last_good_unix)

    def mark_dirty(self) -> None:
        """Learned state changed without new tokens (deletion, retention): write at the next check."""
        self._dirty = True

    def start(self) -> None:
        if self.interval_s <= 0 and self.learned_tokens <= 0:
            return
        self._thread = threading.Thread(target=self._run, name="adaspec-snapshots", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the timer thread (a snapshot in progress finishes first)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60.0)

    def _due(self) -> bool:
        since = time.monotonic() - self._last_attempt
        if since < MIN_GAP_S:
            return False
        learned = self.progress() - self._mark
        if self._dirty:
            return True
        if learned <= 0:
            return False
        if self.learned_tokens and learned >= self.learned_tokens:
            return True
        return bool(self.interval_s) and since >= self.interval_s

    def _run(self) -> None:
        while not self._stop.wait(POLL_S):
            if self._due():
                self.snapshot()

    def snapshot(self) -> bool:
        """Take and write one snapshot now; True if every speculator's state was written."""
        with self._lock:
            self._last_attempt = time.monotonic()
            mark = self.progress()
            self._dirty = False
            try:
                states = self.collect()
            except Exception:
                log.exception("could not collect learned state for a snapshot")
                return False
            ok = True
            for name, state in states.items():
                if not state:
                    continue
                try:
                    self.store.save(name, state)
                except Exception:
                    ok = False
                    log.exception("could not write the snapshot of speculator %s", name)
            if ok:
                self._mark = mark
                self.last_good_unix = time.time()
                self.snapshots += 1
            return ok
