"""`adaspec bench serve`: the real server on loopback under N concurrent streaming clients.

For each concurrency N (``--clients``, default 1,4,16), one fresh ``adaspec
serve`` process per speculation setting (``--speculators``, default
``none,atlas``; uvicorn, continuous batching, prefix cache per tenant) is
started on a free loopback port, side by side, and each phase goes to each
server in turn (order rotated per phase, so slow spells of a shared machine
hit every setting alike): N streaming clients (``/v1/chat/completions``,
``stream_options.include_usage``) send, phase by phase:

- the drift stream's prompts (``--phases``, default python, sql, tools; the
  same prompt loading as ``bench drift``: ``$ADASPEC_PROMPTS``, else
  ``../shared/data/prompts``, else the shipped subset), ``--phase-length``
  prompts each, greedy, ``--max-tokens`` new tokens;
- a multi-turn chat stream: ``--conversations`` chat prompts, each a
  conversation of ``--turns`` turns; every turn resends the conversation so
  far (the previous replies as assistant messages, then a follow-up);
  one client runs one conversation, turn after turn.

Per phase and overall: aggregate output tokens/s (completion tokens / wall
time of the phase), p50 / p99 time to first token (request sent -> first
content chunk), p50 / p99 inter-token latency (gap between content chunks
divided by the tokens they carry: with speculation a chunk holds every
token of a step), and the prefix cache's prompt tokens saved (from the
server's ``/metrics``: ``adaspec_prefix_cache_tokens_saved_total`` over
``adaspec_prefix_cache_lookup_tokens_total``), mean batch size and rows fed
per forward. Greedy outputs are compared across settings and concurrencies
(batch invariance end to end): ``same`` counts requests whose text equals
the first setting's at N = 1.

Peer servers may be measured the same way, on the GGUF the model ships in:
``--peer llama-server`` runs llama.cpp's own C++ server with ``--parallel N``
(continuous batching; ``make llama-server`` builds it into
``.peers/llama.cpp/build/bin``, or give ``--llama-server PATH``), and ``--peer
llama-cpp`` runs ``python -m llama_cpp.server`` (llama-cpp-python's server,
``make peers``: it serves one request at a time).

Outputs (``--out``): ``serve.jsonl`` (one record per request), ``summary.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from adaspec import config

DEFAULT_CLIENTS = (1, 4, 16)
DEFAULT_SPECULATORS = ("none", "atlas")
DEFAULT_PHASES = ("python", "sql", "tools")
DEFAULT_PHASE_LENGTH = 16
DEFAULT_MAX_TOKENS = 64
DEFAULT_CONVERSATIONS = 8
DEFAULT_TURNS = 3
DEFAULT_OUT = "bench_results/serve"
CHAT_PHASE = "multiturn"
# where `make llama-server` builds llama.cpp's server (a source checkout's .peers folder)
LLAMA_SERVER_BUILD = Path(__file__).resolve().parents[3] / ".peers" / "llama.cpp" / "build" / "bin" / "llama-server"
FOLLOW_UPS = ("Can you explain that in more detail?", "Give a short concrete example.",
              "Summarize the answer in one sentence.", "What is a common mistake here?")


@dataclass
class Record:
    """One request as a client saw it."""

    system: str
    clients: int
    phase: str
    key: str  # prompt id (+ turn): the same request across systems and concurrencies
    ok: bool
    status: int
    completion_tokens: int = 0
    ttft_s: Optional[float] = None
    e2e_s: float = 0.0
    gaps_per_token_s: list[float] = field(default_factory=list)
    text: str = ""
    error: str = ""


# ---------------------------------------------------------------- the client
async def stream_chat(client: Any, url: str, model: str, messages: list[dict], max_tokens: int,
                      abort_after_first: bool = False) -> dict:
    """One greedy streaming chat completion: text, usage, TTFT, per-token gaps (seconds).

    With ``abort_after_first`` the client leaves after the first content chunk (``"aborted": True``).
    An error event inside the stream is answered as status 500 with ``"stream_error": True``.
    """
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first = last = None
    gaps: list[float] = []
    text: list[str] = []
    usage = None
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            return {"status": r.status_code, "error": (await r.aread()).decode(errors="replace")[:300]}
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            d = json.loads(line[6:])
            if d.get("usage"):
                usage = d["usage"]
            if "error" in d:
                return {"status": 500, "stream_error": True, "error": json.dumps(d["error"])[:300]}
            for ch in d.get("choices") or []:
                piece = (ch.get("delta") or {}).get("content") or ""
                if not piece:
                    continue
                now = time.perf_counter()
                if first is None:
                    first = now
                else:
                    gaps.append(now - last)
                last = now
                text.append(piece)
            if abort_after_first and text:
                return {"status": 200, "aborted": True, "text": "".join(text)}
    # a server without include_usage: one token per content chunk (llama.cpp streams token by token)
    n = int((usage or {}).get("completion_tokens", 0)) or (len(gaps) + 1 if first is not None else 0)
    # a chunk carries every token of its step: spread each gap over the tokens after the first chunk
    per = (n - 1) / len(gaps) if gaps and n > 1 else 1.0
    return {"status": 200, "text": "".join(text), "tokens": n, "ttft": None if first is None else first - t0,
            "e2e": time.perf_counter() - t0, "gaps": [g / per for g in gaps]}


async def run_phase(url: str, model: str, system: str, clients: int, phase: str, jobs: list, max_tokens: int,
                    turns: int = 1) -> tuple[list[Record], float]:
    """``clients`` concurrent clients over ``jobs`` (``(key, messages)``); with ``turns > 1`` a job is a conversation."""
    import httpx

    queue: asyncio.Queue = asyncio.Queue()
    for j in jobs:
        queue.put_nowait(j)
    records: list[Record] = []

    async def worker() -> None:
        async with httpx.AsyncClient(timeout=httpx.Timeout(600.0)) as client:
            while True:
                try:
                    key, messages = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                convo = list(messages)
                for t in range(turns):
                    try:
                        out = await stream_chat(client, url, model, convo, max_tokens)
                    except Exception as e:  # noqa: BLE001 - a failed request is a record, not a crash
                        out = {"status": 0, "error": f"{type(e).__name__}: {e}"}
                    rec = Record(system, clients, phase, f"{key}#{t}" if turns > 1 else key,
                                 ok=out["status"] == 200, status=out["status"],
                                 completion_tokens=out.get("tokens", 0), ttft_s=out.get("ttft"),
                                 e2e_s=out.get("e2e", 0.0), gaps_per_token_s=out.get("gaps", []),
                                 text=out.get("text", ""), error=out.get("error", ""))
                    records.append(rec)
                    if not rec.ok:
                        break
                    convo = convo + [{"role": "assistant", "content": rec.text},
                                     {"role": "user", "content": FOLLOW_UPS[t % len(FOLLOW_UPS)]}]

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    return records, time.perf_counter() - t0


# ---------------------------------------------------------------- servers
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(url: str) -> dict[str, float]:
    """The server's Prometheus metrics as ``{name: value}`` (unlabelled series only)."""
    import httpx

    try:
        text = httpx.get(url + "/metrics", timeout=30).text
    except Exception:  # noqa: BLE001 - a peer without /metrics
        return {}
    out = {}
    for line in text.splitlines():
        m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*) ([0-9.eE+-]+)$", line)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


class ServerProcess:
    """A server in a child process on a free loopback port; a context manager that waits for ``/health``."""

    def __init__(self, cmd: list[str], port: int, health: str = "/health", startup_s: float = 600.0,
                 log_path: Optional[Path] = None) -> None:
        self.cmd, self.port, self.health, self.startup_s = cmd, port, health, startup_s
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        self.proc: Optional[subprocess.Popen] = None

    def __enter__(self) -> "ServerProcess":
        import httpx

        log = open(self.log_path, "w") if self.log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy())
        deadline = time.monotonic() + self.startup_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {shlex.join(self.cmd)} "
                                   f"(log: {self.log_path})")
            try:
                if httpx.get(self.url + self.health, timeout=5).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.__exit__()
        raise RuntimeError(f"server did not start in {self.startup_s:g} s: {shlex.join(self.cmd)}")

    def __exit__(self, *exc: Any) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def adaspec_server_cmd(args: argparse.Namespace, speculator: str, port: int, max_active: int) -> list[str]:
    cmd = [sys.executable, "-m", "adaspec.server.main", "--model", args.model, "--dtype", args.dtype,
           "--threads", str(args.threads), "--speculator", speculator, "--port", str(port),
           "--max-active", str(max_active), "--max-queue", "1024", "--request-timeout", "0",
           "--log-level", "warning", "--prefix-cache-tokens", str(args.prefix_cache_tokens),
           "--prefill-chunk", str(args.prefill_chunk), "--served-model-name", "bench"]
    if args.max_model_len:
        cmd += ["--max-model-len", str(args.max_model_len)]
    return cmd


def llama_server_binary(args: argparse.Namespace) -> str:
    """llama.cpp's ``llama-server``: ``--llama-server``, else ``make llama-server``'s build, else on PATH.

    Raises:
        FileNotFoundError: none of them exists.
    """
    import shutil

    for cand in (args.llama_server, str(LLAMA_SERVER_BUILD), shutil.which("llama-server")):
        if cand and Path(cand).is_file():
            return cand
    raise FileNotFoundError("no llama-server binary: run `make llama-server` or give --llama-server PATH")


def llama_server_cmd(args: argparse.Namespace, port: int, parallel: int) -> list[str]:
    """llama.cpp's C++ server with ``parallel`` slots (continuous batching), each with a 2048-token context."""
    from adaspec.bench.engines import default_gguf

    gguf = args.gguf or default_gguf(args.model)
    if not gguf:
        raise ValueError(f"no GGUF file for {args.model} (give --gguf)")
    return [llama_server_binary(args), "--model", gguf, "--alias", "bench", "--threads", str(args.threads),
            "--threads-batch", str(args.threads), "--parallel", str(parallel), "--ctx-size", str(2048 * parallel),
            "--cont-batching", "--port", str(port), "--host", "127.0.0.1", "--no-webui"]


def llama_cpp_server_cmd(args: argparse.Namespace, port: int) -> list[str]:
    from adaspec.bench.engines import default_gguf

    gguf = args.gguf or default_gguf(args.model)
    if not gguf:
        raise ValueError(f"no GGUF file for {args.model} (give --gguf)")
    return [sys.executable, "-m", "llama_cpp.server", "--model", gguf, "--model_alias", "bench",
            "--n_threads", str(args.threads), "--n_ctx", str(args.max_model_len or 8192), "--port", str(port),
            "--host", "127.0.0.1"]


# ---------------------------------------------------------------- the run
def build_jobs(args: argparse.Namespace) -> dict[str, list]:
    """``{phase: [(key, messages)]}``: the drift phases' prompts and the multi-turn conversations' openers."""
    from adaspec.bench.drift import build_phases

    specs = [s.strip() for s in args.phases.split(",") if s.strip()]
    jobs: dict[str, list] = {}
    for ph in build_phases(specs, args.phase_length, seed=args.seed):
        jobs[ph.name] = [(p.prompt_id, p.messages) for p in ph.prompts]
        if ph.name == "sql" and args.sql_databases > 0:
            jobs[ph.name] = _sql_by_database(args.phase_length, args.sql_databases, args.seed)
    if args.conversations > 0 and args.turns > 0:
        (chat,) = build_phases(["chat"], args.conversations, seed=args.seed + 1)
        jobs[CHAT_PHASE] = [(p.prompt_id, p.messages) for p in chat.prompts]
    return jobs


def _sql_by_database(length: int, databases: int, seed: int) -> list:
    """``length`` Spider questions over ``databases`` databases (seeded): many questions share each schema.

    Real text-to-SQL traffic asks many questions of one database; the drift
    phase samples questions from every database at random, so few of its
    prompts share a schema.
    """
    import random

    from adaspec.prompts import load_domain

    groups: dict[str, list] = {}
    for p in load_domain("sql"):
        text = p.messages[-1]["content"]
        groups.setdefault(text.split("\n\nWrite one SQL query")[0], []).append(p)
    rng = random.Random(f"{seed}:sql-databases")
    names = sorted(g for g in groups if len(groups[g]) >= length // databases + 1)
    if len(names) < databases:  # a small prompt set (the shipped subset): its largest databases
        names = sorted(groups, key=lambda g: (-len(groups[g]), g))[:databases]
    picked = rng.sample(names, min(databases, len(names)))
    pool = [p for g in picked for p in groups[g]]
    rng.shuffle(pool)
    return [(p.prompt_id, p.messages) for p in pool[:length]]


def _pct(xs: Sequence[float], q: float) -> Optional[float]:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, int(round(q * (len(xs) - 1)))))]


@dataclass
class PhaseSummary:
    system: str
    clients: int
    phase: str
    requests: int
    failed: int
    tokens: int
    wall_s: float
    tok_s: float
    ttft_p50: Optional[float]
    ttft_p99: Optional[float]
    itl_p50: Optional[float]
    itl_p99: Optional[float]
    prefix_saved: Optional[float]  # fraction of prompt tokens not prefilled
    prefix_tokens_saved: Optional[int]
    mean_batch: Optional[float]
    mean_rows: Optional[float]


def summarize(system: str, clients: int, phase: str, recs: list[Record], wall_s: float,
              m0: dict[str, float], m1: dict[str, float]) -> PhaseSummary:
    ok = [r for r in recs if r.ok]
    tokens = sum(r.completion_tokens for r in ok)

    def delta(name: str) -> Optional[float]:
        return m1[name] - m0.get(name, 0.0) if name in m1 else None

    saved, looked = delta("adaspec_prefix_cache_tokens_saved_total"), delta("adaspec_prefix_cache_lookup_tokens_total")
    nb, sb, sr = delta("adaspec_batch_size_count"), delta("adaspec_batch_size_sum"), delta("adaspec_batch_rows_fed_sum")
    gaps = [g for r in ok for g in r.gaps_per_token_s]
    ttfts = [r.ttft_s for r in ok if r.ttft_s is not None]
    return PhaseSummary(system, clients, phase, len(recs), len(recs) - len(ok), tokens, wall_s,
                        tokens / wall_s if wall_s > 0 else 0.0, _pct(ttfts, 0.5), _pct(ttfts, 0.99),
                        _pct(gaps, 0.5), _pct(gaps, 0.99),
                        saved / looked if saved is not None and looked else None,
                        int(saved) if saved is not None else None,
                        sb / nb if nb else None, sr / nb if nb else None)


def _f(x: Optional[float], fmt: str = "{:.1f}", scale: float = 1.0) -> str:
    return "-" if x is None else fmt.format(x * scale)


def render(summaries: list[PhaseSummary], same: dict[tuple[str, int], tuple[int, int]], header: list[str]) -> str:
    lines = header + ["", "| system | clients | phase | requests | failed | output tokens | wall s | output tok/s | "
                      "TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms | prefix tokens saved | mean batch | "
                      "rows/forward |", "|" + "---|" * 15]
    for s in summaries:
        saved = "-" if s.prefix_saved is None else f"{100 * s.prefix_saved:.0f}% ({s.prefix_tokens_saved})"
        lines.append(f"| {s.system} | {s.clients} | {s.phase} | {s.requests} | {s.failed} | {s.tokens} | "
                     f"{s.wall_s:.1f} | {s.tok_s:.1f} | {_f(s.ttft_p50, '{:.0f}', 1000)} | "
                     f"{_f(s.ttft_p99, '{:.0f}', 1000)} | {_f(s.itl_p50, '{:.1f}', 1000)} | "
                     f"{_f(s.itl_p99, '{:.1f}', 1000)} | {saved} | {_f(s.mean_batch)} | {_f(s.mean_rows)} |")
    lines += ["", "Greedy text equal to the first system's at 1 client (batch invariance, end to end):", ""]
    for (system, n), (eq, total) in sorted(same.items()):
        lines.append(f"- {system} at {n} clients: {eq}/{total}")
    return "\n".join(lines) + "\n"


def serve_bench(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    clients = [int(c) for c in str(args.clients).split(",") if c.strip()]
    if not clients or min(clients) < 1:
        raise ValueError(f"--clients must list counts >= 1, got {args.clients!r}")
    systems = [s.strip() for s in args.speculators.split(",") if s.strip()]
    for s in systems:
        if s not in config.SPECULATORS:
            raise ValueError(f"unknown speculator {s!r}; choose from {', '.join(config.SPECULATORS)}")
    peers = [p.strip() for p in (args.peer or "").split(",") if p.strip()]
    for p in peers:
        if p not in ("llama-cpp", "llama-server"):
            raise ValueError(f"unknown peer {p!r} (llama-server, llama-cpp)")
        if p == "llama-server":
            llama_server_binary(args)
    jobs = build_jobs(args)
    records: list[Record] = []
    summaries: list[PhaseSummary] = []
    jsonl = open(out / "serve.jsonl", "w")
    runs = [(s, "adaspec") for s in systems] + [(p, "peer") for p in peers]
    t_start = time.time()
    for n in clients:
        # every system's server runs side by side (an idle one costs nothing), and each phase is sent to
        # each system in turn, the order rotated per phase: slow spells of a shared machine hit all alike
        with contextlib.ExitStack() as stack:
            servers = {}
            for name, kind in runs:
                port = free_port()
                if kind == "adaspec":
                    cmd = adaspec_server_cmd(args, name, port, max(n, 1))
                elif name == "llama-server":
                    cmd = llama_server_cmd(args, port, max(n, 1))
                else:
                    cmd = llama_cpp_server_cmd(args, port)
                print(f"[serve] {name} x {n} clients: {shlex.join(cmd)}", flush=True)
                health = "/v1/models" if name == "llama-cpp" else "/health"
                srv = stack.enter_context(ServerProcess(cmd, port, health=health,
                                                        log_path=out / f"server_{name}_{n}.log"))
                # warm-up (untimed): one short request
                asyncio.run(run_phase(srv.url, "bench", name, 1, "warmup",
                                      [("warmup", [{"role": "user", "content": "Say hello."}])], 8))
                servers[name] = (srv, scrape(srv.url), [], [0.0])
            for pi, (phase, items) in enumerate(jobs.items()):
                turns = args.turns if phase == CHAT_PHASE else 1
                order = [r[0] for r in runs]
                order = order[pi % len(order):] + order[:pi % len(order)]
                for name in order:
                    srv, _, phase_recs, wall_all = servers[name]
                    m0 = scrape(srv.url)
                    recs, wall = asyncio.run(run_phase(srv.url, "bench", name, n, phase, items, args.max_tokens,
                                                       turns=turns))
                    m1 = scrape(srv.url)
                    s = summarize(name, n, phase, recs, wall, m0, m1)
                    summaries.append(s)
                    print(f"[serve]   {name} x {n} {phase}: {s.requests} requests ({s.failed} failed), "
                          f"{s.tok_s:.1f} tok/s, TTFT p50 {_f(s.ttft_p50, '{:.0f}', 1000)} ms, "
                          f"ITL p50 {_f(s.itl_p50, '{:.1f}', 1000)} ms, "
                          f"prefix saved {_f(s.prefix_saved, '{:.0f}', 100)}%, batch {_f(s.mean_batch)}", flush=True)
                    for r in recs:
                        jsonl.write(json.dumps(asdict(r)) + "\n")
                    jsonl.flush()
                    records.extend(recs)
                    phase_recs.extend(recs)
                    wall_all[0] += wall
            for name, _ in runs:
                srv, m_all0, phase_recs, wall_all = servers[name]
                summaries.append(summarize(name, n, "all", phase_recs, wall_all[0], m_all0, scrape(srv.url)))
    summaries.sort(key=lambda s: ([r[0] for r in runs].index(s.system), s.clients))
    jsonl.close()
    ref_sys = runs[0][0]
    ref = {r.key: r.text for r in records if r.system == ref_sys and r.clients == clients[0] and r.ok}
    same: dict[tuple[str, int], tuple[int, int]] = {}
    for r in records:
        if r.ok and r.key in ref and not (r.system == ref_sys and r.clients == clients[0]):
            eq, tot = same.get((r.system, r.clients), (0, 0))
            same[(r.system, r.clients)] = (eq + (r.text == ref[r.key]), tot + 1)
    header = [f"# bench serve ({time.strftime('%Y-%m-%d %H:%M', time.localtime(t_start))}, "
              f"{time.time() - t_start:.0f} s)", "",
              "command: `" + shlex.join(["adaspec", "bench", "serve", *sys.argv[3:]]) + "`",
              f"model {args.model} ({args.dtype}), {args.threads} thread(s), max_tokens {args.max_tokens}, "
              f"phases {', '.join(jobs)} ({args.phase_length} prompts, sql over {args.sql_databases} databases; "
              f"{CHAT_PHASE}: {args.conversations} "
              f"conversations x {args.turns} turns), prefix cache {args.prefix_cache_tokens} tokens per server"]
    md = render(summaries, same, header)
    (out / "summary.md").write_text(md)
    print(md)
    print(f"wrote {out / 'serve.jsonl'} and {out / 'summary.md'}")
    return 0


def add_server_arguments(p: argparse.ArgumentParser) -> None:
    """What :func:`adaspec_server_cmd` reads: the model, one thread by default, the prefix cache, prefill chunks."""
    config.add_model_arguments(p)
    p.set_defaults(threads="1")
    p.add_argument("--prefix-cache-tokens", type=int, default=8192)
    p.add_argument("--prefill-chunk", type=int, default=256)


def add_serve_bench_arguments(p: argparse.ArgumentParser) -> None:
    add_server_arguments(p)
    p.add_argument("--clients", default=",".join(map(str, DEFAULT_CLIENTS)),
                   help="concurrent streaming clients, comma-separated (default %(default)s)")
    p.add_argument("--speculators", default=",".join(DEFAULT_SPECULATORS),
                   help="speculation settings, one server each (default %(default)s: off and on)")
    p.add_argument("--phases", default=",".join(DEFAULT_PHASES), help="drift phases (default %(default)s)")
    p.add_argument("--phase-length", type=int, default=DEFAULT_PHASE_LENGTH, help="prompts per phase")
    p.add_argument("--conversations", type=int, default=DEFAULT_CONVERSATIONS,
                   help="multi-turn chat stream: conversations (0: none)")
    p.add_argument("--turns", type=int, default=DEFAULT_TURNS, help="turns per conversation")
    p.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS)
    p.add_argument("--sql-databases", type=int, default=2,
                   help="the sql phase asks its questions of this many Spider databases (they share a schema, "
                   "as text-to-SQL traffic does); 0: the drift phase's sample over all databases")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--peer", default="", help="peer servers to measure the same way, comma-separated: "
                   "llama-server (llama.cpp's C++ server, continuous batching), llama-cpp (llama-cpp-python's)")
    p.add_argument("--llama-server", default=None, help="llama.cpp's llama-server binary "
                   "(default: `make llama-server`'s build, else PATH)")
    p.add_argument("--gguf", default=None, help="llama.cpp's model file (default: the GGUF the model ships in)")
    p.add_argument("--out", default=DEFAULT_OUT)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="adaspec bench serve", description=__doc__.splitlines()[0])
    add_serve_bench_arguments(p)
    return serve_bench(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
