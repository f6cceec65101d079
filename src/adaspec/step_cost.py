"""Cost of one target forward for k new tokens on a cached prompt (the controller's calibration).

A runtime module: the confidence-aware controller's cost model starts from
this table at start-up; ``adaspec bench step-cost`` prints it.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Iterable


def measure_step_cost(target: Any, ks: Iterable[int] = range(1, 17), repeats: int = 7,
                      prompt_len: int = 64, warmup: int = 2) -> dict[int, float]:
    """Median milliseconds of one forward of k tokens after a ``prompt_len`` prefix.

    The cache is truncated back after every forward, so each measurement sees
    the same prefix. Forwards for different k are interleaved across repeats so
    machine noise spreads evenly. Logits are computed for all k positions (as
    verification needs).

    Args:
        target: an :class:`adaspec.target.TargetModel` (float32 or int8).
        ks: token counts per forward (k = 1 is plain decoding).
        repeats: timed forwards per k (median taken).
        prompt_len: cached prefix length in tokens.
        warmup: untimed rounds over all ks first.

    Returns:
        ``{k: median_ms}``.
    """
    ks = list(ks)
    kv = target.new_cache()
    prefix = [(17 * i + 5) % target.vocab_size for i in range(prompt_len)]
    target.forward(kv, prefix, last_only=True)
    times: dict[int, list[float]] = {k: [] for k in ks}
    for _ in range(warmup):
        for k in ks:
            target.forward(kv, prefix[:k] if k <= len(prefix) else [5] * k)
            target.truncate(kv, prompt_len)
    for _ in range(repeats):
        for k in ks:
            ids = [(31 * j + 7) % target.vocab_size for j in range(k)]
            t0 = time.perf_counter()
            target.forward(kv, ids)
            times[k].append((time.perf_counter() - t0) * 1000.0)
            target.truncate(kv, prompt_len)
    return {k: statistics.median(v) for k, v in times.items()}


def measure_batch_cost(target: Any, rows: Iterable[int] = (1, 2, 4, 8, 16, 32, 64, 128), repeats: int = 3,
                       prompt_len: int = 64, max_requests: int = 16, warmup: int = 1) -> dict[int, float]:
    """Median milliseconds of one batched forward feeding ``rows`` rows (continuous batching's cost).

    ``rows`` rows are spread over ``min(rows, max_requests)`` requests (each
    with a ``prompt_len`` cached prefix), as verify rows of a batched step are;
    every row gets logits. Caches are truncated back after every forward.

    Args:
        target: a target with ``forward_batch`` (the lean core).
        rows: total rows fed per forward.
        repeats: timed forwards per row count (median taken).
        prompt_len: cached prefix length of every request, tokens.
        max_requests: most requests in one forward.
        warmup: untimed rounds first.

    Returns:
        ``{rows: median_ms}``.

    Raises:
        ValueError: the target has no ``forward_batch``.
    """
    if not hasattr(target, "forward_batch"):
        raise ValueError("measure_batch_cost needs a target with forward_batch (the lean runtime)")
    from adaspec.model.decoder import BatchRequest

    rows = list(rows)
    caches = []
    for q in range(min(max(rows), max_requests)):
        kv = target.new_cache()
        target.forward(kv, [(17 * i + 5 + q) % target.vocab_size for i in range(prompt_len)], last_only=True)
        caches.append(kv)
    times: dict[int, list[float]] = {n: [] for n in rows}

    def once(n: int) -> float:
        nreq = min(n, max_requests)
        per = [n // nreq + (1 if q < n % nreq else 0) for q in range(nreq)]
        batch = [BatchRequest(caches[q], [(31 * j + 7 + q) % target.vocab_size for j in range(per[q])])
                 for q in range(nreq)]
        t0 = time.perf_counter()
        target.forward_batch(batch)
        dt = (time.perf_counter() - t0) * 1000.0
        for q in range(nreq):
            target.truncate(caches[q], prompt_len)
        return dt

    for _ in range(warmup):
        for n in rows:
            once(n)
    for _ in range(repeats):
        for n in rows:
            times[n].append(once(n))
    for kv in caches:
        if hasattr(kv, "release"):
            kv.release()
    return {n: statistics.median(v) for n, v in times.items()}
