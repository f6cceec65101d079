"""`adaspec bench soak`: a real server under N streaming clients for a fixed time.

One ``adaspec serve`` process (the same command line as ``bench serve``) on a
free loopback port; first every prompt of the pool is asked once without
streaming (the reference answer and its token count), then ``--clients``
clients stream greedy chat completions back to back for ``--minutes``, each
walking the pool from its own offset. Every ``--abort-every``-th request of a
client is dropped by the client after its first content chunk (a user who
closes the tab): the server must cancel it and free its KV blocks.

What it checks, and reports in ``summary.md``:

- no 5xx and no failed request (a 4xx is counted apart: the server said no);
- no lost or duplicated token: every completed stream's text equals the
  reference answer for its prompt and its ``usage.completion_tokens`` equals
  the reference's (greedy decoding is batch invariant, so the answer must not
  depend on what ran beside it);
- resident memory: the server's RSS, sampled every ``--rss-every`` seconds,
  at the end is within ``--rss-tolerance`` (default 10%) of its value after the
  first minute (the warm-up: caches fill, pools are touched). The samples are
  plotted to ``rss.png``.

Outputs (``--out``): ``soak.jsonl`` (one record per request), ``rss.csv``,
``rss.png``, ``summary.md``. The exit status is 1 when a check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from adaspec import config
from adaspec.bench.serve import ServerProcess, adaspec_server_cmd, add_server_arguments, free_port, stream_chat

DEFAULT_CLIENTS = 64
DEFAULT_MINUTES = 10.0
DEFAULT_PHASES = ("python", "rust", "chat", "sql", "tools")
DEFAULT_PER_PHASE = 12
DEFAULT_MAX_TOKENS = 48
DEFAULT_ABORT_EVERY = 10
DEFAULT_OUT = "bench_results/soak"


@dataclass
class SoakRecord:
    """One request as its client saw it (``t``: seconds since the load started)."""

    client: int
    key: str
    t: float
    status: int
    aborted: bool = False
    completion_tokens: int = 0
    text: str = ""
    error: str = ""


@dataclass
class SoakVerdict:
    """The soak's checks over its records and RSS samples."""

    requests: int
    completed: int
    aborted: int
    status_5xx: int
    status_4xx: int
    failed: int  # connection errors and error events inside a stream
    left_active: int = 0  # requests the server still ran or queued 30 s after the load ended
    mismatched: list[str] = field(default_factory=list)  # keys whose text or token count differ from the reference
    rss_warm_mb: Optional[float] = None
    rss_end_mb: Optional[float] = None
    rss_max_mb: Optional[float] = None
    rss_tolerance: float = 0.10

    @property
    def rss_ok(self) -> bool:
        if self.rss_warm_mb is None or self.rss_end_mb is None:
            return False
        return self.rss_end_mb <= self.rss_warm_mb * (1.0 + self.rss_tolerance)

    @property
    def ok(self) -> bool:
        return (self.status_5xx == 0 and self.failed == 0 and not self.mismatched and self.rss_ok
                and self.completed > 0 and self.left_active == 0)


# ---------------------------------------------------------------- the clients
async def reference_answer(client: Any, url: str, model: str, messages: list[dict], max_tokens: int) -> dict:
    """One greedy, non-streamed chat completion: ``{"text", "tokens"}``; raises on a non-200 answer."""
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0}
    r = await client.post(url + "/v1/chat/completions", json=body)
    if r.status_code != 200:
        raise RuntimeError(f"reference request failed with {r.status_code}: {r.text[:300]}")
    d = r.json()
    return {"text": d["choices"][0]["message"]["content"] or "", "tokens": int(d["usage"]["completion_tokens"])}


async def run_soak(url: str, model: str, pool: Sequence[tuple[str, list[dict]]], clients: int, duration_s: float,
                   max_tokens: int, abort_every: int = 0,
                   progress: Optional[Callable[[int, float], None]] = None) -> list[SoakRecord]:
    """``clients`` clients streaming back to back for ``duration_s`` seconds; client c starts at pool[c % len]."""
    import httpx

    if not pool:
        raise ValueError("the soak needs at least one prompt")
    records: list[SoakRecord] = []
    t0 = time.perf_counter()
    end = t0 + duration_s

    async def worker(c: int) -> None:
        async with httpx.AsyncClient(timeout=httpx.Timeout(900.0)) as client:
            i, n = c, 0
            while time.perf_counter() < end:
                key, messages = pool[i % len(pool)]
                i += 1
                n += 1
                abort = abort_every > 0 and n % abort_every == 0
                t = time.perf_counter() - t0
                try:
                    out = await stream_chat(client, url, model, messages, max_tokens, abort_after_first=abort)
                except Exception as e:  # noqa: BLE001 - a failed request is a record, not a crash
                    out = {"status": 0, "stream_error": True, "error": f"{type(e).__name__}: {e}"}
                rec = SoakRecord(c, key, round(t, 3), out["status"], aborted=bool(out.get("aborted")),
                                 completion_tokens=out.get("tokens", 0), text=out.get("text", ""),
                                 error=out.get("error", ""))
                if out.get("stream_error"):  # an error event mid-stream or a broken connection: failed
                    rec.status = 0
                records.append(rec)
                if progress is not None:
                    progress(len(records), time.perf_counter() - t0)

    await asyncio.gather(*(worker(c) for c in range(clients)))
    return records


def judge(records: Sequence[SoakRecord], refs: dict[str, dict], rss: Sequence[tuple[float, float]],
          warm_s: float = 60.0, tolerance: float = 0.10) -> SoakVerdict:
    """The soak's checks. ``rss``: ``(seconds since the load started, MB)`` samples.

    The warm value is the first sample at or after ``warm_s``; the end value is the last sample.
    """
    v = SoakVerdict(requests=len(records), completed=0, aborted=0, status_5xx=0, status_4xx=0, failed=0,
                    rss_tolerance=tolerance)
    for r in records:
        if r.status >= 500:
            v.status_5xx += 1
        elif 400 <= r.status < 500:
            v.status_4xx += 1
        elif r.status != 200:
            v.failed += 1
        elif r.aborted:
            v.aborted += 1
        else:
            v.completed += 1
            ref = refs.get(r.key)
            if ref is None or r.text != ref["text"] or r.completion_tokens != ref["tokens"]:
                v.mismatched.append(r.key)
    warm = [mb for t, mb in rss if t >= warm_s]
    if warm:
        v.rss_warm_mb, v.rss_end_mb = warm[0], rss[-1][1]
        v.rss_max_mb = max(mb for _, mb in rss)
    return v


def idle_health(url: str, timeout_s: float) -> dict:
    """The server's ``/health`` once it reports no active and no queued request, or after ``timeout_s``."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while True:
        h = httpx.get(url + "/health", timeout=30).json()
        if (h.get("active_requests", 0) == 0 and h.get("queue_depth", 0) == 0) or time.monotonic() > deadline:
            return h
        time.sleep(0.2)


# ---------------------------------------------------------------- memory
def rss_mb(pid: int) -> float:
    """Resident set size of process ``pid`` in MB (``/proc/PID/status`` VmRSS; psutil elsewhere)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    import psutil

    return psutil.Process(pid).memory_info().rss / 2**20


class RssSampler(threading.Thread):
    """Samples a process's RSS every ``every_s`` seconds into ``samples`` as ``(seconds since start(), MB)``."""

    def __init__(self, pid: int, every_s: float) -> None:
        super().__init__(daemon=True)
        self.pid, self.every_s = pid, every_s
        self.samples: list[tuple[float, float]] = []
        self._halt = threading.Event()
        self._t0 = time.perf_counter()

    def run(self) -> None:
        self._t0 = time.perf_counter()
        while True:
            try:
                self.samples.append((time.perf_counter() - self._t0, rss_mb(self.pid)))
            except Exception:  # noqa: BLE001 - the process is gone
                return
            if self._halt.wait(self.every_s):
                self.samples.append((time.perf_counter() - self._t0, rss_mb(self.pid)))
                return

    def stop(self) -> None:
        self._halt.set()
        self.join(10)


def plot_rss(samples: Sequence[tuple[float, float]], warm_s: float, tolerance: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.2))
    ax.plot([t / 60 for t, _ in samples], [mb for _, mb in samples], lw=1.2)
    warm = [mb for t, mb in samples if t >= warm_s]
    if warm:
        ax.axhline(warm[0] * (1 + tolerance), color="tab:red", ls="--", lw=0.8,
                   label=f"after {warm_s:g} s + {tolerance:.0%}")
        ax.legend(loc="lower right")
    ax.set_xlabel("minutes under load")
    ax.set_ylabel("server RSS (MB)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- the run
def build_pool(phases: Sequence[str], per_phase: int, seed: int) -> list[tuple[str, list[dict]]]:
    """``per_phase`` prompts of each drift phase, interleaved phase by phase."""
    from adaspec.bench.drift import build_phases

    built = build_phases(list(phases), per_phase, seed=seed)
    pool = []
    for i in range(per_phase):
        for ph in built:
            if i < len(ph.prompts):
                pool.append((f"{ph.name}:{ph.prompts[i].prompt_id}", ph.prompts[i].messages))
    return pool


def render(v: SoakVerdict, header: list[str], clients: int, minutes: float, tok_s: float, warm_s: float) -> str:
    def mark(ok: bool) -> str:
        return "ok" if ok else "**FAILED**"

    rss = ("-" if v.rss_warm_mb is None else
           f"{v.rss_warm_mb:.0f} MB after {warm_s:g} s, {v.rss_end_mb:.0f} MB at the end "
           f"({v.rss_end_mb / v.rss_warm_mb - 1:+.1%}), max {v.rss_max_mb:.0f} MB")
    lines = header + ["", "| check | measured | |", "|---|---|---|",
                      f"| requests | {v.requests} ({v.completed} completed, {v.aborted} dropped by their client, "
                      f"{clients} clients, {minutes:g} min, {tok_s:.1f} completion tok/s) | |",
                      f"| no 5xx | {v.status_5xx} | {mark(v.status_5xx == 0)} |",
                      f"| no failed request | {v.failed} (4xx: {v.status_4xx}) | {mark(v.failed == 0)} |",
                      f"| no lost or duplicated token (text and token count = the reference) | "
                      f"{v.completed - len(v.mismatched)}/{v.completed} equal | {mark(not v.mismatched)} |",
                      f"| no request left running after the load | {v.left_active} | {mark(v.left_active == 0)} |",
                      f"| RSS within {v.rss_tolerance:.0%} of its value after {warm_s:g} s | {rss} | "
                      f"{mark(v.rss_ok)} |", "", f"verdict: {'PASSED' if v.ok else 'FAILED'}"]
    if v.mismatched:
        lines.append(f"mismatched prompts: {', '.join(sorted(set(v.mismatched))[:20])}")
    return "\n".join(lines) + "\n"


def soak_from_args(args: argparse.Namespace) -> int:
    if args.clients < 1:
        raise ValueError(f"--clients must be >= 1, got {args.clients}")
    if args.minutes <= 0:
        raise ValueError(f"--minutes must be > 0, got {args.minutes}")
    if args.speculator not in config.SPECULATORS:
        raise ValueError(f"unknown speculator {args.speculator!r}; choose from {', '.join(config.SPECULATORS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pool = build_pool([p.strip() for p in args.phases.split(",") if p.strip()], args.per_phase, args.seed)
    port = free_port()
    cmd = adaspec_server_cmd(args, args.speculator, port, args.clients)
    print(f"[soak] {shlex.join(cmd)}", flush=True)
    t_start = time.time()
    with ServerProcess(cmd, port, log_path=out / "server.log") as srv:
        import httpx
        from tqdm import tqdm

        async def refs_for_pool() -> dict[str, dict]:
            async with httpx.AsyncClient(timeout=httpx.Timeout(900.0)) as client:
                refs = {}
                for key, messages in tqdm(pool, desc="reference answers", unit="prompt"):
                    refs[key] = await reference_answer(client, srv.url, "bench", messages, args.max_tokens)
                return refs

        refs = asyncio.run(refs_for_pool())
        sampler = RssSampler(srv.proc.pid, args.rss_every)
        sampler.start()
        bar = tqdm(total=int(args.minutes * 60), desc=f"soak, {args.clients} clients", unit="s", mininterval=2.0)

        def progress(n: int, elapsed: float) -> None:
            step = min(int(elapsed), bar.total) - bar.n
            if step > 0:
                bar.set_postfix(requests=n, refresh=False)
                bar.update(step)

        t0 = time.perf_counter()
        records = asyncio.run(run_soak(srv.url, "bench", pool, args.clients, args.minutes * 60, args.max_tokens,
                                       args.abort_every, progress))
        wall = time.perf_counter() - t0
        bar.close()
        health = idle_health(srv.url, 30.0)
        sampler.stop()
    rss = sampler.samples
    warm_s = min(60.0, args.minutes * 60 / 10)
    v = judge(records, refs, rss, warm_s=warm_s, tolerance=args.rss_tolerance)
    v.left_active = int(health.get("active_requests", 0)) + int(health.get("queue_depth", 0))
    with open(out / "soak.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps(asdict(r)) + "\n")
    (out / "rss.csv").write_text("seconds,rss_mb\n" + "".join(f"{t:.1f},{mb:.1f}\n" for t, mb in rss))
    if rss:
        plot_rss(rss, warm_s, args.rss_tolerance, out / "rss.png")
    tokens = sum(r.completion_tokens for r in records if r.status == 200 and not r.aborted)
    header = [f"# bench soak ({time.strftime('%Y-%m-%d %H:%M', time.localtime(t_start))}, "
              f"{time.time() - t_start:.0f} s)", "",
              "command: `" + shlex.join(["adaspec", "bench", "soak", *sys.argv[3:]]) + "`",
              f"model {args.model} ({args.dtype}), {args.threads} thread(s), speculator {args.speculator}, "
              f"max_tokens {args.max_tokens}, {len(pool)} prompts ({args.phases}), every {args.abort_every}th "
              f"request of a client dropped after its first chunk"]
    md = render(v, header, args.clients, args.minutes, tokens / wall if wall > 0 else 0.0, warm_s)
    (out / "summary.md").write_text(md)
    print(md)
    print(f"wrote {out / 'summary.md'}, {out / 'soak.jsonl'}, {out / 'rss.csv'}, {out / 'rss.png'}")
    return 0 if v.ok else 1


def add_soak_arguments(p: argparse.ArgumentParser) -> None:
    add_server_arguments(p)
    p.add_argument("--clients", type=int, default=DEFAULT_CLIENTS, help="concurrent streaming clients")
    p.add_argument("--minutes", type=float, default=DEFAULT_MINUTES, help="how long the load lasts")
    p.add_argument("--speculator", default="atlas", help="the server's --speculator (default %(default)s)")
    p.add_argument("--phases", default=",".join(DEFAULT_PHASES), help="drift phases the prompts come from")
    p.add_argument("--per-phase", type=int, default=DEFAULT_PER_PHASE, help="prompts per phase in the pool")
    p.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS)
    p.add_argument("--abort-every", type=int, default=DEFAULT_ABORT_EVERY,
                   help="every Nth request of a client is dropped after its first chunk (0: none)")
    p.add_argument("--rss-every", type=float, default=5.0, help="seconds between RSS samples")
    p.add_argument("--rss-tolerance", type=float, default=0.10, help="allowed RSS growth after the first minute")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=DEFAULT_OUT)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="adaspec bench soak", description=__doc__.splitlines()[0])
    add_soak_arguments(p)
    return soak_from_args(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
