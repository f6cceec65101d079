"""``adaspec bench step-cost``: the verify-forward cost table, relative to k = 1."""

from __future__ import annotations

from adaspec.step_cost import measure_step_cost  # noqa: F401  (re-exported for the bench CLI)


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
