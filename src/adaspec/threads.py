"""Intra-op threads: a default that is never slower than one thread on a busy machine.

A second thread pays only if the OpenMP team wakes at once for each of the ~150
parallel regions of a forward: with idle threads sleeping (``OMP_WAIT_POLICY=PASSIVE``)
a 2-thread forward is slower than a 1-thread one, and with threads that spin, a
second thread beside another busy process makes it several times slower
(BENCHMARKS.md, "Threads"). So:

- ``adaspec`` sets ``GOMP_SPINCOUNT`` (bounded spinning, about 0.1 ms, then sleep)
  before torch is first imported, unless the user set ``OMP_WAIT_POLICY`` or
  ``GOMP_SPINCOUNT``: the team stays awake within a forward and sleeps between them;
- ``--threads auto`` (the default) starts on one thread and, once the target
  is loaded, times one-token forwards at one thread and at one per core
  (:func:`tune_threads`), keeping the faster;
- where it keeps more than one, a :class:`ThreadGovernor` watches, about once a
  second, how much CPU other processes use (``/proc/stat`` less this process's
  own time) and drops to one thread while they use more than a quarter of a core,
  going back once they stop. A number pins the count (no governor).
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from typing import Any, Callable, Optional

THREADS_AUTO = "auto"
WAIT_POLICY_ENV = "OMP_WAIT_POLICY"


SPIN_COUNT_ENV = "GOMP_SPINCOUNT"
SPIN_COUNT = "100000"  # libgomp's spin iterations before a waiting thread sleeps (its default: 300000)
#: other processes' CPU use (cores) above which ``--threads auto`` runs one thread
BUSY_CORES = 0.25


def bounded_wait_policy() -> None:
    """Bound OpenMP's spin-waiting (only effective before torch is imported; the user's setting wins)."""
    if "torch" not in sys.modules and WAIT_POLICY_ENV not in os.environ:
        os.environ.setdefault(SPIN_COUNT_ENV, SPIN_COUNT)


def parse_threads(value: Any) -> int | str:
    """``"auto"`` or a thread count >= 1.

    Raises:
        ValueError: anything else.
    """
    if value is None or value == THREADS_AUTO:
        return THREADS_AUTO
    if isinstance(value, bool):
        raise ValueError(f"threads must be 'auto' or an integer >= 1, got {value!r}")
    try:
        n = int(str(value).strip())
    except ValueError:
        raise ValueError(f"threads must be 'auto' or an integer >= 1, got {value!r}") from None
    if n < 1:
        raise ValueError(f"threads must be 'auto' or an integer >= 1, got {value!r}")
    return n


def available_cores() -> int:
    """Cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def apply_threads(value: Any, log: Optional[Callable[[str], None]] = None) -> int:
    """Set torch's intra-op threads for ``value`` (a count; "auto" starts at 1, see :func:`tune_threads`).

    Returns:
        the thread count now set.

    Raises:
        ValueError: an invalid value.
    """
    import torch

    n = parse_threads(value)
    n = 1 if n == THREADS_AUTO else n
    torch.set_num_threads(n)
    if log is not None and value != THREADS_AUTO:
        log(f"threads: {n} (--threads {value})")
    return n


def _forward_ms(target: Any, n: int, give_up_ms: Optional[float] = None) -> float:
    """Median ms of 5 one-token forwards at ``n`` threads (after one untimed); past the
    first, a forward slower than ``give_up_ms`` ends the measurement (it returns that time)."""
    import torch

    torch.set_num_threads(n)
    kv = target.new_cache()
    target.forward(kv, [(7 * i + 3) % target.vocab_size for i in range(16)], last_only=True)
    times = []
    for i in range(6):
        t0 = time.perf_counter()
        target.forward(kv, [(11 * i + 5) % target.vocab_size])
        times.append((time.perf_counter() - t0) * 1000.0)
        if give_up_ms is not None and i >= 1 and times[-1] > give_up_ms:
            return times[-1]
    return statistics.median(times[1:])


def others_cores(before: Optional[tuple[float, float, float]], after: Optional[tuple[float, float, float]]
                 ) -> Optional[float]:
    """Cores other processes kept busy between two :func:`cpu_sample` s (None if either is None)."""
    if before is None or after is None or after[0] <= before[0]:
        return None
    return max(0.0, (after[1] - before[1]) - (after[2] - before[2])) / (after[0] - before[0])


def tune_threads(target: Any, value: Any = THREADS_AUTO, log: Optional[Callable[[str], None]] = None,
                 since: Optional[tuple[float, float, float]] = None) -> int:
    """For ``--threads auto``: keep one thread per core only where it measures faster than one thread.

    Times a few one-token forwards (about 0.3 s) at 1 thread and at
    :func:`available_cores` threads and sets the faster (one thread unless the
    other is at least 5% faster). Where other processes kept more than
    :data:`BUSY_CORES` cores busy while the one-thread forwards ran, one thread
    is set without trying more: a spinning team beside a busy process is several
    times slower than one thread, and timing it would cost seconds of start-up.
    A pinned count is left as is.

    Timings measured on a quiet machine are kept in the cost cache
    (:mod:`adaspec.cost_cache`, keyed by model, machine and kernel build); a
    later start reuses them and only checks how busy the machine was since
    ``since`` (a :func:`cpu_sample` taken before the target was loaded, so the
    check costs no extra time), timing nothing.

    Returns:
        the thread count now set.
    """
    import torch

    if parse_threads(value) != THREADS_AUTO:
        return torch.get_num_threads()
    cores = available_cores()
    chosen, note = 1, "one core"
    if cores > 1:
        key, stored = _stored_timings(target, cores)
        if stored is not None and since is not None:
            one, many = stored
            others = others_cores(since, _sample_after(since))
            if others is not None and others > BUSY_CORES:
                note = f"other processes used {others:.2f} cores at start-up"
            else:
                chosen = _faster(one, many, cores)
                note = f"1-token forward {one:.1f} ms at 1 thread, {many:.1f} ms at {cores} (timed at an earlier start)"
        else:
            before = cpu_sample()
            one = min(_forward_ms(target, 1), _forward_ms(target, 1))
            others = others_cores(before, _sample_after(before))
            if others is not None and others > BUSY_CORES:
                note = f"other processes used {others:.2f} cores at start-up; 1-token forward {one:.1f} ms at 1 thread"
            else:
                many = _forward_ms(target, cores, give_up_ms=3.0 * one)
                if many < 3.0 * one:
                    many = min(many, _forward_ms(target, cores, give_up_ms=3.0 * one))
                chosen = _faster(one, many, cores)
                note = f"1-token forward {one:.1f} ms at 1 thread, {many:.1f} ms at {cores}"
                if key is not None and many < 3.0 * one:  # a complete timing on a quiet machine
                    from adaspec import cost_cache

                    cost_cache.save_json(key, {"thread_timings_ms": {"1": one, str(cores): many}})
    torch.set_num_threads(chosen)
    if chosen > 1:
        governor = ThreadGovernor(chosen, log=log)
        if governor.available:
            try:
                target.thread_governor = governor
            except AttributeError:  # a target that takes no attributes: no governor
                pass
    if log is not None:
        log(f"threads: {chosen} (auto: {note}; {WAIT_POLICY_ENV}={os.environ.get(WAIT_POLICY_ENV, 'unset')}, "
            f"{SPIN_COUNT_ENV}={os.environ.get(SPIN_COUNT_ENV, 'unset')})")
    return chosen


def _faster(one_ms: float, many_ms: float, cores: int) -> int:
    """``cores`` where a forward on them is at least 5% faster than on one thread, else 1."""
    return cores if many_ms < 0.95 * one_ms else 1


def _sample_after(before: Optional[tuple[float, float, float]]) -> Optional[tuple[float, float, float]]:
    """A :func:`cpu_sample` at least 0.2 s after ``before`` (the window /proc/stat's ticks resolve)."""
    if before is not None:
        time.sleep(max(0.0, 0.2 - (time.monotonic() - before[0])))
    return cpu_sample()


def _stored_timings(target: Any, cores: int) -> tuple[Optional[str], Optional[tuple[float, float]]]:
    """The cost-cache key for ``target``'s thread timings at ``cores`` threads, and the stored
    ``(ms at 1 thread, ms at cores)`` (None when absent, damaged, or the target has no cache identity)."""
    from adaspec import cost_cache

    if not getattr(target, "name", None):  # a target the cache cannot name (tests' stand-ins): time it
        return None, None
    try:
        key = cost_cache.cache_key(target, {"thread_timings": cores})
    except Exception:  # noqa: BLE001  (a target the key cannot describe: time it every start)
        return None, None
    data = cost_cache.load_json(key)
    try:
        times = data["thread_timings_ms"]  # type: ignore[index]
        one, many = float(times["1"]), float(times[str(cores)])
    except (TypeError, KeyError, ValueError):
        return key, None
    if not (one > 0 and many > 0):
        return key, None
    return key, (one, many)


def cpu_sample() -> Optional[tuple[float, float, float]]:
    """``(monotonic s, CPU seconds the whole machine spent busy, CPU seconds of this process)``,
    or None where ``/proc/stat`` cannot be read."""
    try:
        with open("/proc/stat") as f:
            fields = [float(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    if len(fields) < 4:
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    t = os.times()
    return time.monotonic(), (sum(fields[:8]) - idle) / tick, t.user + t.system


class ThreadGovernor:
    """``--threads auto`` at run time: more than one thread only while other processes leave the cores free.

    :meth:`poll` is called from the step loop; at most once per ``interval_s`` it
    compares the machine's busy CPU time with this process's own over the last
    interval. When other processes used more than ``busy_cores`` cores, it sets
    one thread (a spinning team beside a busy process is several times slower than
    one thread); once they use less than half of that, ``threads`` again. Switching the count does
    not change any result (the kernels are bitwise thread-count invariant).

    Args:
        threads: the count to use on a quiet machine (:func:`tune_threads`'s choice).
        interval_s: seconds between looks.
        busy_cores: other processes' CPU use (cores) above which one thread runs.
        sample: the CPU sampler (tests pass their own); :func:`cpu_sample` by default.
        set_threads: applies a count (default ``torch.set_num_threads``).
        clock: monotonic seconds, the sampler's clock (tests pass their own).
    """

    def __init__(self, threads: int, interval_s: float = 1.0, busy_cores: float = BUSY_CORES,
                 log: Optional[Callable[[str], None]] = None,
                 sample: Callable[[], Optional[tuple[float, float, float]]] = cpu_sample,
                 set_threads: Optional[Callable[[int], None]] = None,
                 clock: Callable[[], float] = time.monotonic):
        if threads < 1 or interval_s <= 0 or busy_cores < 0:
            raise ValueError(f"threads must be >= 1, interval_s > 0 and busy_cores >= 0, got "
                             f"{threads}, {interval_s}, {busy_cores}")
        self.threads, self.interval_s, self.busy_cores = threads, interval_s, busy_cores
        self.current = threads
        self.switches = 0
        self._log, self._sample = log, sample
        self._set, self._clock = set_threads, clock
        self._last = sample()
        self._next = (self._last[0] if self._last else 0.0) + interval_s
        self.available = self._last is not None

    def poll(self) -> int:
        """Look again if ``interval_s`` has passed; returns the thread count now in use."""
        if self._last is None or self._clock() < self._next:
            return self.current
        now = self._sample()
        if now is None:
            return self.current
        if now[0] - self._last[0] < self.interval_s:
            return self.current
        others = others_cores(self._last, now)
        self._last, self._next = now, now[0] + self.interval_s
        # hysteresis: down above busy_cores, back up only below half of it (no flapping at the threshold)
        want = 1 if others > self.busy_cores else (self.threads if others < self.busy_cores / 2 else self.current)
        if want != self.current:
            if self._set is None:
                import torch

                torch.set_num_threads(want)
            else:
                self._set(want)
            self.current = want
            self.switches += 1
            if self._log is not None:
                self._log(f"threads: {want} (other processes use {others:.2f} cores)")
        return self.current
