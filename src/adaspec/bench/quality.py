"""``adaspec bench quality``: perplexity of each target precision and runtime on held-out text.

The int8 path changes the model's numbers; this measures what that costs in
quality against float32, per domain, on texts kept out of the int8
calibration set (``adaspec.quant.held_out_texts``: HumanEval and HumanEval-X
Rust canonical solutions, MT-bench questions). Scores go through the
runtime's own forward (:func:`adaspec.quant.runtime_perplexity`: chunked
prefill, logits at every fed position), so ``int8:lean`` measures the lean
core's kernels and ``int8:transformers`` today's transformers int8 path, on
the same weights.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Optional, Sequence

from adaspec.bench.common import print_table

# What `bench quality` scores unless told otherwise: the fp32 reference and both int8 runtimes.
DEFAULT_SYSTEMS = "float32:transformers,int8:transformers,int8:lean"


@dataclass(frozen=True)
class QualitySystem:
    """One row of the quality table: a precision on a runtime ("auto", "lean", "transformers")."""

    dtype: str
    runtime: str = "auto"

    @property
    def label(self) -> str:
        return f"{self.dtype}:{self.runtime}"


def parse_systems(specs: Sequence[str]) -> list[QualitySystem]:
    """``["float32", "int8:lean", ...]`` -> systems (a bare dtype runs on runtime "auto").

    Raises:
        ValueError: empty, or an unknown dtype or runtime.
    """
    from adaspec.target import DTYPES, RUNTIMES

    if not specs:
        raise ValueError("give at least one dtype (e.g. --dtypes float32,int8:lean)")
    systems = []
    for spec in specs:
        dtype, _, runtime = spec.partition(":")
        runtime = runtime or "auto"
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r} in {spec!r}; choose from {', '.join(DTYPES)}")
        if runtime not in RUNTIMES:
            raise ValueError(f"unknown runtime {runtime!r} in {spec!r}; choose from {', '.join(RUNTIMES)}")
        systems.append(QualitySystem(dtype, runtime))
    return systems


def measure_quality(model: str, dtypes: Sequence[str], n_per_domain: int = 16, max_tokens: int = 256,
                    threads: Optional[int] = None, chunk: int = 64) -> dict[str, dict[str, dict]]:
    """Perplexity per system (``dtype[:runtime]``) and domain, through each runtime's forward.

    Each dtype is loaded (and for int8 quantized) once; its runtimes share those
    weights, the lean core wrapping the transformers module
    (:func:`adaspec.model.target.lean_target`).

    Args:
        model: registry name or local path.
        dtypes: systems, e.g. ``["float32:transformers", "int8:transformers", "int8:lean"]``;
            a bare dtype means runtime "auto". The first is the table's reference.
        n_per_domain: held-out texts per domain.
        max_tokens: each text is cut to this many tokens.
        threads: torch intra-op threads (None: leave as is).
        chunk: prefill tokens per forward.

    Returns:
        ``{label: {domain: {"ppl", "nll", "tokens"}}}``, label ``dtype:runtime``
        with the runtime that actually ran ("auto" resolved); domain ``all`` pools
        the texts.

    Raises:
        ValueError: unknown dtype, runtime or model; "lean" on an unsupported architecture.
        RuntimeError: "lean" and the kernel does not build.
    """
    from adaspec import quant
    from adaspec.target import load_target, on_runtime

    systems = parse_systems(dtypes)
    held = quant.held_out_texts(n_per_domain=n_per_domain)
    scored: dict[QualitySystem, tuple[str, dict[str, dict]]] = {}
    for dtype in dict.fromkeys(s.dtype for s in systems):  # each dtype loaded once, first-seen order
        base = load_target(model, dtype=dtype, num_threads=threads, runtime="transformers")
        for system in (s for s in systems if s.dtype == dtype):
            target = on_runtime(base, system.runtime)
            row = {d: quant.runtime_perplexity(target, target.tokenizer, texts, max_tokens=max_tokens, chunk=chunk)
                   for d, texts in held.items()}
            row["all"] = _pool(row.values())
            scored[system] = (f"{dtype}:{getattr(target, 'runtime', 'transformers')}", row)
    return dict(scored[s] for s in systems)  # the caller's order: the first row is the reference


def _pool(rows) -> dict:
    """Perplexity over the union of the rows' tokens (token-weighted mean NLL)."""
    import math

    rows = list(rows)
    tokens = sum(r["tokens"] for r in rows)
    nll = sum(r["nll"] * r["tokens"] for r in rows) / tokens
    return {"ppl": math.exp(nll), "nll": nll, "tokens": tokens}


def format_quality(results: dict[str, dict[str, dict]]) -> str:
    """Markdown: perplexity per domain and system, with the ratio to the first system.

    Below the table, for each dtype scored on both runtimes, lean over
    transformers per domain (the lean core's own cost in quality).
    """
    systems = list(results)
    domains = list(next(iter(results.values())))
    base = results[systems[0]]
    lines = ["| dtype:runtime | " + " | ".join(domains) + " |", "|---|" + "---|" * len(domains)]
    for sy in systems:
        cells = []
        for d in domains:
            ppl = results[sy][d]["ppl"]
            cells.append(f"{ppl:.3f}" if sy == systems[0] else f"{ppl:.3f} ({ppl / base[d]['ppl']:.3f}x)")
        lines.append(f"| {sy} | " + " | ".join(cells) + " |")
    tokens = {d: base[d]["tokens"] for d in domains}
    lines.append("")
    lines.append("scored tokens: " + ", ".join(f"{d} {n}" for d, n in tokens.items()))
    for dtype in dict.fromkeys(sy.partition(":")[0] for sy in systems):
        lean, hf = results.get(f"{dtype}:lean"), results.get(f"{dtype}:transformers")
        if lean and hf:
            lines.append(f"{dtype} lean / transformers: "
                         + ", ".join(f"{d} {lean[d]['ppl'] / hf[d]['ppl']:.4f}x" for d in domains))
    return "\n".join(lines) + "\n"


def add_quality_arguments(p: argparse.ArgumentParser) -> None:
    from adaspec.models import DEFAULT_MODEL

    p.add_argument("--model", default=DEFAULT_MODEL, help="default: %(default)s")
    p.add_argument("--dtypes", default=DEFAULT_SYSTEMS,
                   help="comma list of dtype[:runtime] (runtime auto, lean or transformers; bare: auto); "
                        "the first is the reference (default: %(default)s)")
    p.add_argument("--per-domain", type=int, default=16, help="held-out texts per domain (default: %(default)s)")
    p.add_argument("--max-tokens", type=int, default=256, help="each text is cut to this many tokens (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--chunk", type=int, default=64, help="prefill tokens per forward (default: %(default)s)")
    p.add_argument("--out", default=None, help="write the Markdown table here")


def quality_from_args(args: argparse.Namespace) -> int:
    results = measure_quality(args.model, [d for d in args.dtypes.split(",") if d], args.per_domain,
                              args.max_tokens, args.threads, args.chunk)
    table = format_quality(results)
    print_table(table, args.out)
    return 0
