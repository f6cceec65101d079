"""``adaspec bench restart``: is a restarted server as fast on repeated traffic as before?

Three servers in turn, each a real uvicorn server around a new engine and new
speculator objects (learned state passes only through the snapshot files):

1. **before**: starts empty with ``--state-dir DIR``, learns from ``--learn``
   requests, then serves the ``--replay`` requests again (repeated traffic);
   at shutdown it writes its snapshot.
2. **after restart**: restores the snapshot from DIR and serves the same replay.
3. **cold**: starts empty (no state dir) and serves the same replay: what a
   server that lost its state would do.

Every request is greedy through ``/v1/chat/completions``; the table shows
tokens/s (wall time per request, prefill included) and mean acceptance length
per server, and each replay's outputs are checked against the first server's.
Timings on a shared machine are noisy; mean acceptance length is not.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from adaspec.bench.common import print_table
from adaspec.bench.drift import build_phases
from adaspec.prompts import BenchPrompt


@dataclass
class ReplayResult:
    """One server's replay: per-request tokens, seconds, draft steps and emitted tokens, outputs."""

    name: str
    tokens: int = 0
    seconds: float = 0.0
    draft_steps: int = 0
    emitted_on_draft_steps: int = 0
    outputs: list[str] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def mean_acceptance_length(self) -> Optional[float]:
        return self.emitted_on_draft_steps / self.draft_steps if self.draft_steps else None


def _serve(engine: Any, store: Any, prompts: Sequence[BenchPrompt], max_tokens: int, name: str,
           warm: Sequence[BenchPrompt] = (), progress: bool = True) -> ReplayResult:
    """Start a server around ``engine``; send ``warm`` then ``prompts``; shut down (snapshot saved)."""
    import httpx

    from adaspec.server.app import create_app
    from adaspec.server.testing import BackgroundServer

    res = ReplayResult(name)
    app = create_app(engine, "m", state_store=store)
    with BackgroundServer(app) as server, httpx.Client(base_url=server.base_url, timeout=600) as client:
        from tqdm import tqdm

        todo = [(p, False) for p in warm] + [(p, True) for p in prompts]
        for p, counted in tqdm(todo, desc=name, unit="req", disable=not progress):
            body = {"model": "m", "messages": p.messages, "max_tokens": max_tokens, "temperature": 0}
            t0 = time.perf_counter()
            r = client.post("/v1/chat/completions", json=body)
            dt = time.perf_counter() - t0
            r.raise_for_status()
            data = r.json()
            if not counted:
                continue
            stats = data["adaspec"]
            res.tokens += data["usage"]["completion_tokens"]
            res.seconds += dt
            res.draft_steps += stats.get("draft_steps", 0)
            res.emitted_on_draft_steps += stats.get("emitted_on_draft_steps", 0)
            res.outputs.append(data["choices"][0]["message"]["content"])
    return res


def run_restart_bench(model: str, dtype: str, speculator: str, phases: Sequence[str], learn: int, replay: int,
                      max_tokens: int, state_dir: Optional[str] = None, threads: Optional[int] = None,
                      seed: int = 0, progress: bool = True) -> list[ReplayResult]:
    """Run the three servers (see the module docstring) and return their replay results.

    Args:
        phases: prompt domains the learn and replay requests come from (split evenly).
        learn: requests the first server learns from before its replay.
        replay: requests replayed by every server (the last ``replay`` of the learn set).
        state_dir: the snapshot folder; default: a fresh temporary one.

    Raises:
        ValueError: ``replay > learn`` or an unknown domain / speculator.
    """
    from adaspec import config
    from adaspec.engine import Engine
    from adaspec.store import SnapshotStore

    if not 0 < replay <= learn:
        raise ValueError(f"need 0 < replay <= learn, got replay={replay}, learn={learn}")
    per = -(-learn // len(phases))
    prompts = [p for ph in build_phases(list(phases), per, seed=seed) for p in ph.prompts][:learn]
    repeat = prompts[-replay:]
    cfg = config.EngineConfig(model=model, dtype=dtype, speculator=speculator,
                              threads=config.THREADS_AUTO if threads is None else threads)
    target = config.load_config_target(cfg)
    tmp = None
    if state_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="adaspec-restart-")
        state_dir = tmp.name
    try:
        def engine() -> Engine:
            return config.build_engine(cfg, target)

        store = SnapshotStore(state_dir)
        before = _serve(engine(), store, repeat, max_tokens, "before restart", warm=prompts, progress=progress)
        after = _serve(engine(), SnapshotStore(state_dir), repeat, max_tokens, "after restart", progress=progress)
        cold = _serve(engine(), None, repeat, max_tokens, "cold (no state)", progress=progress)
    finally:
        if tmp is not None:
            tmp.cleanup()
    return [before, after, cold]


def format_restart(results: Sequence[ReplayResult], header: Sequence[str] = ()) -> str:
    """Markdown table of the replays, with ratios to the first (before restart)."""
    base = results[0]
    lines = list(header) + ["", "| server | tokens/s | vs before | mean acceptance length | outputs = before's |",
                            "|---|---|---|---|---|"]
    for r in results:
        mal = r.mean_acceptance_length
        same = sum(a == b for a, b in zip(r.outputs, base.outputs))
        lines.append(f"| {r.name} | {r.tokens_per_s:.1f} | {r.tokens_per_s / base.tokens_per_s:.2f}x | "
                     f"{'-' if mal is None else f'{mal:.2f}'} | {same}/{len(base.outputs)} |")
    return "\n".join(lines) + "\n"


def add_restart_arguments(p: argparse.ArgumentParser) -> None:
    from adaspec import config

    p.add_argument("--model", default=config.DEFAULT_MODEL, help="default: %(default)s")
    p.add_argument("--dtype", default=config.DEFAULT_DTYPE, choices=list(config.DTYPES), help="default: %(default)s")
    p.add_argument("--speculator", default="suffix", choices=["suffix", "atlas"], help="default: %(default)s")
    p.add_argument("--phases", default="sql,tools", help="prompt domains (default: %(default)s)")
    p.add_argument("--learn", type=int, default=30, help="requests learned before the replay (default: %(default)s)")
    p.add_argument("--replay", type=int, default=15, help="requests replayed by each server (default: %(default)s)")
    p.add_argument("--max-tokens", type=int, default=64, help="default: %(default)s")
    p.add_argument("--state-dir", default=None, help="snapshot folder (default: a temporary one)")
    config.add_threads_argument(p)
    p.add_argument("--seed", type=int, default=0, help="prompt sampling seed (default: %(default)s)")
    p.add_argument("--out", default=None, help="write the Markdown table here")


def restart_from_args(args: argparse.Namespace) -> int:
    results = run_restart_bench(args.model, args.dtype, args.speculator, args.phases.split(","), args.learn,
                                args.replay, args.max_tokens, args.state_dir, args.threads, args.seed)
    header = [f"model `{args.model}`, dtype {args.dtype}, speculator {args.speculator}, phases {args.phases}, "
              f"learn {args.learn}, replay {args.replay}, max_tokens {args.max_tokens}, greedy"]
    table = format_restart(results, header)
    print_table(table, args.out)
    return 0
