"""Intra-op threads: a default that is never slower than one thread on a busy machine.

On a 2-core machine with any other process busy, OpenMP's default spin-waiting
makes a multi-threaded forward many times slower (BENCHMARKS.md, "Threads"), while on
a quiet machine a second thread can help. So:

- ``adaspec`` sets ``OMP_WAIT_POLICY=PASSIVE`` before torch is first imported
  (unless the user set it): idle OpenMP threads sleep instead of spinning, so
  a team never fights another process for a core;
- ``--threads auto`` (the default) starts on one thread and, once the target
  is loaded, times one-token forwards at one thread and at one per core
  (:func:`tune_threads`), keeping the faster. A number pins the count.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from typing import Any, Callable, Optional

THREADS_AUTO = "auto"
WAIT_POLICY_ENV = "OMP_WAIT_POLICY"


def passive_wait_policy() -> None:
    """Ask OpenMP to let idle threads sleep (only effective before torch is imported; user's choice wins)."""
    if "torch" not in sys.modules:
        os.environ.setdefault(WAIT_POLICY_ENV, "PASSIVE")


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


def _forward_ms(target: Any, n: int) -> float:
    import torch

    torch.set_num_threads(n)
    kv = target.new_cache()
    target.forward(kv, [(7 * i + 3) % target.vocab_size for i in range(16)], last_only=True)
    times = []
    for i in range(6):
        t0 = time.perf_counter()
        target.forward(kv, [(11 * i + 5) % target.vocab_size])
        times.append((time.perf_counter() - t0) * 1000.0)
    return statistics.median(times[1:])


def tune_threads(target: Any, value: Any = THREADS_AUTO, log: Optional[Callable[[str], None]] = None) -> int:
    """For ``--threads auto``: keep one thread per core only where it measures faster than one thread.

    Times a few one-token forwards (about 0.3 s) at 1 thread and at
    :func:`available_cores` threads, interleaved, and sets the faster (one
    thread unless the other is at least 5% faster). A pinned count is left as is.

    Returns:
        the thread count now set.
    """
    import torch

    if parse_threads(value) != THREADS_AUTO:
        return torch.get_num_threads()
    cores = available_cores()
    chosen, note = 1, "one core"
    if cores > 1:
        one = min(_forward_ms(target, 1), _forward_ms(target, 1))
        many = min(_forward_ms(target, cores), _forward_ms(target, cores))
        chosen = cores if many < 0.95 * one else 1
        note = f"1-token forward {one:.1f} ms at 1 thread, {many:.1f} ms at {cores}"
    torch.set_num_threads(chosen)
    if log is not None:
        log(f"threads: {chosen} (auto: {note}; {WAIT_POLICY_ENV}={os.environ.get(WAIT_POLICY_ENV, 'unset')})")
    return chosen
