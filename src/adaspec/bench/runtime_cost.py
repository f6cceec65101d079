"""``adaspec bench step-cost`` across runtimes: the lean core vs transformers, by context length.

Step cost = wall milliseconds of one forward of k new tokens on a cached context
(the verify forward of a speculative step); the floor = the int8 matmuls alone.
"""

from __future__ import annotations

import statistics
import time
from typing import Iterable

from adaspec.target import TargetModel


def _prefix(target: TargetModel, n: int) -> list[int]:
    return [(17 * i + 5) % target.vocab_size for i in range(n)]


def compare_step_cost(systems: dict[str, TargetModel], ks: Iterable[int] = range(1, 17),
                      contexts: Iterable[int] = (128, 1024, 4096), repeats: int = 5) -> dict[int, dict[str, dict[int, float]]]:
    """Median ms of one forward of k new tokens after a cached context, per system.

    Every system gets the same context and tokens; within each repeat the k values
    and the systems are interleaved, so machine noise (a shared machine) spreads
    over all of them. The cache is truncated back after every forward.

    Returns:
        ``{context: {system: {k: median_ms}}}``.
    """
    ks = list(ks)
    out: dict[int, dict[str, dict[int, float]]] = {}
    for ctx in contexts:
        caches = {}
        for name, target in systems.items():
            kv = target.new_cache()
            target.forward(kv, _prefix(target, ctx), last_only=True)
            caches[name] = kv
        times = {name: {k: [] for k in ks} for name in systems}
        for r in range(1 + repeats):  # the first round is warm-up
            for k in ks:
                ids = [(31 * j + 7) % 49152 for j in range(k)]
                for name, target in systems.items():
                    t0 = time.perf_counter()
                    target.forward(caches[name], ids)
                    dt = (time.perf_counter() - t0) * 1000.0
                    target.truncate(caches[name], ctx)
                    if r:
                        times[name][k].append(dt)
        out[ctx] = {name: {k: statistics.median(v) for k, v in t.items()} for name, t in times.items()}
        for kv in caches.values():
            if hasattr(kv, "release"):
                kv.release()
    return out


def matmul_floor_ms(target: TargetModel, rows: int = 1, repeats: int = 9) -> dict[str, float]:
    """Median ms of only the int8 matmuls of one forward of ``rows`` tokens.

    ``lean``: every linear layer of the lean core (:meth:`LeanDecoder.matmuls_only`);
    ``fbgemm``: every :class:`adaspec.quant.Int8Linear` of the transformers model once
    (fused groups once), on random inputs. Either needs the int8 model.
    """
    import torch

    from adaspec.quant import Int8Linear

    out = {}
    lins = [m for m in target.model.modules() if isinstance(m, Int8Linear)]
    if lins:
        xs = {m.in_features: torch.randn(rows, m.in_features) for m in lins}
        runs = []
        for r in range(2 + repeats):
            t0 = time.perf_counter()
            with torch.inference_mode():
                for m in lins:
                    m(xs[m.in_features])
            runs.append((time.perf_counter() - t0) * 1000.0)
        out["fbgemm"] = statistics.median(runs[2:])
    decoder = getattr(target, "decoder", None)
    if decoder is not None:
        runs = []
        for r in range(2 + repeats):
            t0 = time.perf_counter()
            decoder.matmuls_only(rows)
            runs.append((time.perf_counter() - t0) * 1000.0)
        out["lean"] = statistics.median(runs[2:])
    return out


def format_compare(results: dict[int, dict[str, dict[int, float]]], floors: dict[str, float]) -> str:
    """Markdown: one row per (context, system), ms per k and the ratio of k=8 to k=1."""
    ctx0 = next(iter(results))
    ks = sorted(next(iter(results[ctx0].values())))
    head = "| context | runtime | " + " | ".join(f"k={k}" for k in ks) + " | k=8 / k=1 |"
    rows = [head, "|---|---|" + "---|" * (len(ks) + 1)]
    for ctx, per in results.items():
        for name, t in per.items():
            ratio = f"{t[8] / t[1]:.2f}x" if 8 in t else ""
            rows.append(f"| {ctx} | {name} | " + " | ".join(f"{t[k]:.1f}" for k in ks) + f" | {ratio} |")
    if floors:
        rows.append("")
        rows.append("matmuls only: " + ", ".join(f"{n} {v:.2f} ms" for n, v in floors.items()))
    return "\n".join(rows)


def cli_step_cost(args) -> int:
    """``adaspec bench step-cost``: per dtype, the lean core vs the transformers runtime.

    One transformers model per dtype; the lean runtime is built on the same weights
    (:func:`adaspec.model.target.lean_target`), so both see identical int8 weights.
    """
    from pathlib import Path

    from adaspec.target import load_target
    from adaspec.threads import apply_threads

    apply_threads(args.threads)  # a count; "auto" measures at 1 thread (a benchmark does not tune)
    runtimes = [r for r in getattr(args, "runtimes", "transformers,lean").split(",") if r]
    contexts = [int(c) for c in str(getattr(args, "contexts", "128")).split(",") if c]
    text = []
    for dtype in args.dtypes.split(","):
        base = load_target(args.model, dtype=dtype, runtime="transformers")
        systems: dict[str, TargetModel] = {}
        for rt in runtimes:
            if rt == "lean":
                from adaspec.model.target import lean_target

                systems["lean"] = lean_target(base)
            elif rt == "transformers":
                systems["transformers"] = base
            else:
                raise ValueError(f"unknown runtime {rt!r}")
        results = compare_step_cost(systems, range(1, args.max_k + 1), contexts, repeats=args.repeats)
        floors = {}
        if dtype == "int8":
            lean = systems.get("lean")
            for rows in (1, 8):
                for n, v in matmul_floor_ms(lean if lean is not None else base, rows=rows).items():
                    floors[f"{n} k={rows}"] = v
        table = f"### {dtype}\n\n" + format_compare(results, floors)
        print(table, flush=True)
        text.append(table)
    if args.out:
        Path(args.out).write_text("\n\n".join(text) + "\n")
    return 0
