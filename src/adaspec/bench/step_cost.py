"""Cost of one verify forward for k new tokens on a cached prompt, relative to k = 1."""

from __future__ import annotations

import statistics
import time
from typing import Iterable

from adaspec.target import TargetModel


def measure_step_cost(target: TargetModel, ks: Iterable[int] = range(1, 17), repeats: int = 7,
                      prompt_len: int = 64) -> dict[int, float]:
    """Median milliseconds of one forward of k tokens after a ``prompt_len`` prefix.

    The cache is truncated back after every forward, so each measurement sees
    the same prefix. Forwards for different k are interleaved across repeats so
    machine noise spreads evenly.

    Returns:
        ``{k: median_ms}``.
    """
    ks = list(ks)
    kv = target.new_cache()
    prefix = [(17 * i + 5) % target.vocab_size for i in range(prompt_len)]
    target.forward(kv, prefix, last_only=True)
    times: dict[int, list[float]] = {k: [] for k in ks}
    for _ in range(2):  # warm-up
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


def format_step_cost(results: dict[str, dict[int, float]]) -> str:
    """Markdown table: one row per dtype, ms and ratio to k=1 per k."""
    dtypes = list(results)
    ks = sorted(next(iter(results.values())))
    head = "| dtype | " + " | ".join(f"k={k}" for k in ks) + " |"
    sep = "|---|" + "---|" * len(ks)
    rows = [head, sep]
    for d in dtypes:
        base = results[d][ks[0]]
        rows.append(f"| {d} | " + " | ".join(f"{results[d][k]:.1f} ms ({results[d][k] / base:.2f}x)" for k in ks) + " |")
    return "\n".join(rows)
