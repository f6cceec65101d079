"""``adaspec bench quality``: perplexity of each target precision on held-out text.

The int8 path changes the model's numbers; this measures what that costs in
quality against float32, per domain, on texts kept out of the int8
calibration set (``adaspec.quant.held_out_texts``: HumanEval and HumanEval-X
Rust canonical solutions, MT-bench questions).
"""

from __future__ import annotations

import argparse
from typing import Optional, Sequence

from adaspec.bench.common import print_table


def measure_quality(model: str, dtypes: Sequence[str], n_per_domain: int = 16, max_tokens: int = 256,
                    threads: Optional[int] = None) -> dict[str, dict[str, dict]]:
    """Perplexity per dtype and domain.

    Returns:
        ``{dtype: {domain: {"ppl", "nll", "tokens"}}}``; domain ``all`` pools the texts.

    Raises:
        ValueError: unknown dtype or model.
    """
    from adaspec import quant
    from adaspec.target import DTYPES, load_target

    if not dtypes:
        raise ValueError("give at least one dtype (e.g. --dtypes float32,int8)")
    unknown = [d for d in dtypes if d not in DTYPES]
    if unknown:
        raise ValueError(f"unknown dtype(s) {', '.join(unknown)}; choose from {', '.join(DTYPES)}")
    held = quant.held_out_texts(n_per_domain=n_per_domain)
    out: dict[str, dict[str, dict]] = {}
    for dtype in dtypes:
        target = load_target(model, dtype=dtype, num_threads=threads)
        tok = target.tokenizer
        row = {d: quant.perplexity(target.model, tok, texts, max_tokens=max_tokens) for d, texts in held.items()}
        row["all"] = quant.perplexity(target.model, tok, [t for ts in held.values() for t in ts], max_tokens=max_tokens)
        out[dtype] = row
    return out


def format_quality(results: dict[str, dict[str, dict]]) -> str:
    """Markdown: perplexity per domain and dtype, with the ratio to the first dtype."""
    dtypes = list(results)
    domains = list(next(iter(results.values())))
    base = results[dtypes[0]]
    lines = ["| dtype | " + " | ".join(domains) + " |", "|---|" + "---|" * len(domains)]
    for dt in dtypes:
        cells = []
        for d in domains:
            ppl = results[dt][d]["ppl"]
            cells.append(f"{ppl:.3f}" if dt == dtypes[0] else f"{ppl:.3f} ({ppl / base[d]['ppl']:.3f}x)")
        lines.append(f"| {dt} | " + " | ".join(cells) + " |")
    tokens = {d: base[d]["tokens"] for d in domains}
    lines.append("")
    lines.append("scored tokens: " + ", ".join(f"{d} {n}" for d, n in tokens.items()))
    return "\n".join(lines) + "\n"


def add_quality_arguments(p: argparse.ArgumentParser) -> None:
    from adaspec.models import DEFAULT_MODEL

    p.add_argument("--model", default=DEFAULT_MODEL, help="default: %(default)s")
    p.add_argument("--dtypes", default="float32,int8", help="comma list, the first is the reference (default: %(default)s)")
    p.add_argument("--per-domain", type=int, default=16, help="held-out texts per domain (default: %(default)s)")
    p.add_argument("--max-tokens", type=int, default=256, help="each text is cut to this many tokens (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--out", default=None, help="write the Markdown table here")


def quality_from_args(args: argparse.Namespace) -> int:
    results = measure_quality(args.model, [d for d in args.dtypes.split(",") if d], args.per_domain,
                              args.max_tokens, args.threads)
    table = format_quality(results)
    print_table(table, args.out)
    return 0
