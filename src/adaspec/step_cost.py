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
