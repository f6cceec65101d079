"""``adaspec bench threads``: ``--threads`` settings on a quiet machine and beside a busy core.

Each trial runs ``adaspec generate --json`` in a fresh process (so the thread
choice, OpenMP's wait policy and start-up are all as a user meets them) and
reads its decode speed (completion tokens / the request's elapsed seconds,
start-up excluded) and its wall time. Trials alternate between the settings
so machine noise spreads evenly; "busy" trials run a pure-Python busy loop in
another process for the whole trial (one core taken, as by any other job).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Optional, Sequence

from adaspec import config
from adaspec.bench.common import print_table

PROMPT = "Write a Python function that returns the n-th Fibonacci number, with a docstring and tests."


def _spin(stop) -> None:  # a busy core: what any other job on the machine looks like
    x = 0
    while not stop.is_set():
        x = (x * 31 + 7) % 1000003


@dataclass
class Trial:
    threads: str
    busy: bool
    tokens_per_s: float
    wall_s: float


def run_trial(threads: str, busy: bool, model: str, speculator: str, max_tokens: int) -> Trial:
    """One ``adaspec generate`` process at ``--threads threads``, optionally beside a busy loop.

    Raises:
        RuntimeError: the process failed.
    """
    stop = mp.Event()
    spinner = mp.Process(target=_spin, args=(stop,), daemon=True) if busy else None
    if spinner is not None:
        spinner.start()
    try:
        cmd = [sys.executable, "-m", "adaspec.cli", "generate", "--model", model, "--prompt", PROMPT, "--chat",
               "--max-tokens", str(max_tokens), "--speculator", speculator, "--threads", threads,
               "--json"]
        t0 = time.perf_counter()
        out = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t0
    finally:
        if spinner is not None:
            stop.set()
            spinner.join(5)
    if out.returncode != 0:
        raise RuntimeError(f"adaspec generate --threads {threads} failed: {out.stderr[-500:]}")
    r = json.loads(out.stdout.strip().splitlines()[-1])
    return Trial(threads, busy, r["usage"]["completion_tokens"] / max(r["elapsed_s"], 1e-9), wall)


def run_threads_bench(settings: Sequence[str], repeats: int, model: str, speculator: str,
                      max_tokens: int, progress: bool = True) -> list[Trial]:
    trials = []
    for rep in range(repeats):
        for busy in (False, True):
            for s in settings:
                t = run_trial(s, busy, model, speculator, max_tokens)
                trials.append(t)
                if progress:
                    print(f"  [{rep + 1}/{repeats}] threads={s:5s} {'busy ' if busy else 'quiet'} "
                          f"{t.tokens_per_s:6.1f} tok/s, wall {t.wall_s:5.1f} s", flush=True)
    return trials


def format_threads(trials: Sequence[Trial], header: Sequence[str] = ()) -> str:
    """Median decode tok/s and wall time per setting, quiet and busy, with ratios to ``--threads 1``."""
    lines = list(header) + ["", "| --threads | quiet tok/s | vs 1 | quiet wall s | busy tok/s | vs 1 | busy wall s |",
                            "|---|---|---|---|---|---|---|"]
    med = {}
    for t in trials:
        med.setdefault((t.threads, t.busy), []).append(t)
    settings = list(dict.fromkeys(t.threads for t in trials))

    def m(s: str, busy: bool, attr: str) -> float:
        return statistics.median(getattr(t, attr) for t in med[(s, busy)])

    base = "1" if "1" in settings else settings[0]
    for s in settings:
        q, b = m(s, False, "tokens_per_s"), m(s, True, "tokens_per_s")
        lines.append(f"| {s} | {q:.1f} | {q / m(base, False, 'tokens_per_s'):.2f}x | {m(s, False, 'wall_s'):.1f} "
                     f"| {b:.1f} | {b / m(base, True, 'tokens_per_s'):.2f}x | {m(s, True, 'wall_s'):.1f} |")
    return "\n".join(lines) + "\n"


def add_threads_bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=config.DEFAULT_MODEL, help="default: %(default)s")
    p.add_argument("--speculator", default="none", choices=config.SPECULATORS, help="default: %(default)s")
    p.add_argument("--settings", default="auto,1,2", help="comma list of --threads values (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="trials per setting and condition (default: %(default)s)")
    p.add_argument("--max-tokens", type=int, default=96, help="default: %(default)s")
    p.add_argument("--out", default=None, help="write the Markdown table here")


def threads_from_args(args: argparse.Namespace) -> int:
    from adaspec.threads import parse_threads

    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    if not settings or args.repeats < 1:
        raise ValueError("need at least one --settings value and --repeats >= 1")
    for s in settings:
        parse_threads(s)
    trials = run_threads_bench(settings, args.repeats, args.model, args.speculator, args.max_tokens)
    header = [f"model `{args.model}`, speculator {args.speculator}, {args.max_tokens} new tokens, "
              f"{args.repeats} trials per cell (median); busy = a busy loop on another core"]
    print_table(format_threads(trials, header), args.out)
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="adaspec bench threads", description=__doc__.splitlines()[0])
    add_threads_bench_arguments(p)
    return threads_from_args(p.parse_args(argv))
