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


def measure_machine(seconds: float = 0.5) -> dict[str, float]:
    """What this machine does at the current torch thread count: read bandwidth and fp32 peak.

    ``bandwidth_gbs``: GB/s of a ``sum`` over a 256 MB float32 tensor (read once, far larger
    than the caches); ``fp32_gflops``: GFLOP/s of a 1024 x 1024 float32 matmul (torch's BLAS,
    which uses every vector extension the CPU has: a strict peak for an AVX2 kernel). Best of
    several runs of each.
    """
    import torch

    big = torch.ones(64 * 2 ** 20)  # 256 MB
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    bw, fl = 0.0, 0.0
    t_end = time.perf_counter() + seconds
    for i in range(20):
        t0 = time.perf_counter()
        big.sum()
        bw = max(bw, big.numel() * 4 / (time.perf_counter() - t0) / 1e9)
        t0 = time.perf_counter()
        torch.mm(a, b)
        fl = max(fl, 2 * 1024 ** 3 / (time.perf_counter() - t0) / 1e9)
        if i >= 4 and time.perf_counter() > t_end:
            break
    return {"bandwidth_gbs": bw, "fp32_gflops": fl}


def forward_floors(decoder, k: int, context: int, machine: dict[str, float]) -> dict[str, float]:
    """Floors of one lean forward of ``k`` new tokens after ``context`` cached ones, in ms.

    ``memory_ms``: weight bytes plus the K/V bytes attention reads, over the measured read
    bandwidth (the bound at small k); ``attention_flop_ms``: attention's multiply-adds
    (q.k and p.v for every fed token against every position it sees, 4 FLOPs per position per
    head dim per query head per layer) over the measured fp32 peak.
    """
    positions = context + k
    mem = (decoder.weight_bytes() + decoder.kv_bytes(positions)) / (machine["bandwidth_gbs"] * 1e9) * 1e3
    flops = 4.0 * k * positions * decoder.num_heads * decoder.head_dim * decoder.num_layers
    return {"memory_ms": mem, "attention_flop_ms": flops / (machine["fp32_gflops"] * 1e9) * 1e3}


def format_floors(results: dict[int, dict[str, dict[int, float]]], decoder, matmuls: dict[int, float],
                  machine: dict[str, float]) -> str:
    """Markdown: the lean forward beside its floors, per context and k (``matmuls``: ms of the
    linear layers alone by rows; the rest of the forward is attention, norms, RoPE, SiLU)."""
    rows = [f"machine: read bandwidth {machine['bandwidth_gbs']:.1f} GB/s, fp32 peak {machine['fp32_gflops']:.0f} "
            f"GFLOP/s (at this thread count); weights {decoder.weight_bytes() / 1e6:.1f} MB", "",
            "| context | k | lean ms | memory floor ms | lean / memory floor | matmuls ms | rest ms "
            "| attention FLOP floor ms | rest / attention floor |",
            "|---|---|---|---|---|---|---|---|---|"]
    for ctx, per in results.items():
        lean = per.get("lean")
        if not lean:
            continue
        for k in sorted(lean):
            f = forward_floors(decoder, k, ctx, machine)
            mm = matmuls.get(k)
            rest = lean[k] - mm if mm is not None else None
            cells = [str(ctx), str(k), f"{lean[k]:.1f}", f"{f['memory_ms']:.1f}", f"{lean[k] / f['memory_ms']:.2f}x",
                     f"{mm:.1f}" if mm is not None else "-", f"{rest:.1f}" if rest is not None else "-",
                     f"{f['attention_flop_ms']:.2f}",
                     f"{rest / f['attention_flop_ms']:.1f}x" if rest is not None else "-"]
            rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


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
        lean = systems.get("lean")
        if lean is not None:
            mms = {}
            for k in sorted({1, 2, 4, 8, 16} & set(range(1, args.max_k + 1))):
                mms[k] = matmul_floor_ms(lean, rows=k)["lean"]
            table += "\n\n" + format_floors(results, lean.decoder, mms, measure_machine())
        print(table, flush=True)
        text.append(table)
    if args.out:
        Path(args.out).write_text("\n\n".join(text) + "\n")
    return 0
