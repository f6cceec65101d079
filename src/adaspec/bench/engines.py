"""``adaspec bench engines``: this engine against llama.cpp, same prompts, one run, interleaved.

Systems (each request runs on every system before the next request starts,
in an order rotated per request, so load on a shared machine falls on all of
them alike):

- ``plain``: this engine, ``speculator none``;
- ``atlas``: this engine, the confidence-aware controller (learns across the run);
- ``llama-plain``: llama.cpp (``llama-cpp-python``) on the GGUF the default
  model ships in, greedy;
- ``llama-lookup``: the same with its prompt-lookup decoding
  (``LlamaPromptLookupDecoding`` as ``draft_model``).

Two streams: the drift prompts (a few per domain, chat template, stop at EOS)
and a long-output stream (the shortest prompts, ``ignore_eos``, 256 new
tokens). llama.cpp gets the very prompt token ids this engine's tokenizer and
chat template produce. Two measures per request:

- decode-only tokens/s: ``(n - n_first) / (end - first_token)``, the tokens
  after the first step over the time after it;
- per-request tokens/s: ``n / (end - start)``, prefill included.

Without ``llama_cpp`` importable the run prints so and measures this engine's
systems only.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional, Protocol, Sequence

from adaspec.bench.common import print_table

ENGINE_SYSTEMS = ("plain", "atlas")
LLAMA_SYSTEMS = ("llama-plain", "llama-lookup")
DEFAULT_DOMAINS = "python,rust,chat,sql,tools"
DEFAULT_LOOKUP_TOKENS = 10  # llama.cpp's prompt lookup draft length (transformers' peer uses 10 too)
STREAMS = ("drift", "long")
LLAMA_N_CTX_SLACK = 32  # llama.cpp's context beyond the longest request (prompt + new tokens + drafts)


@dataclass
class RunTiming:
    """One request on one system.

    Attributes:
        token_ids: generated ids (an EOS that ended the request included).
        total_s: start of the request (prefill included) to its last token.
        first_s: start to the end of the step that emitted the first token.
        first_tokens: tokens emitted by that first step (1 unless it drafted).
    """

    token_ids: list[int]
    total_s: float
    first_s: float
    first_tokens: int = 1


@dataclass
class EngineRecord:
    """One line of ``engines.jsonl``.

    Attributes:
        stream / request / domain / prompt_id: which request.
        system: which system ran it; threads: at how many threads.
        prompt_tokens / new_tokens: lengths.
        total_s / first_s / first_tokens: see :class:`RunTiming`.
        decode_tokens_per_s: ``(new_tokens - first_tokens) / (total_s - first_s)`` (None below 2 tokens).
        request_tokens_per_s: ``new_tokens / total_s``.
        same_as_plain: output identical to ``plain`` on this request (None when plain did not run).
    """

    stream: str
    request: int
    domain: str
    prompt_id: str
    system: str
    threads: int
    prompt_tokens: int
    new_tokens: int
    total_s: float
    first_s: float
    first_tokens: int
    decode_tokens_per_s: Optional[float]
    request_tokens_per_s: float
    same_as_plain: Optional[bool] = None


class EngineBenchSystem(Protocol):
    name: str

    def run(self, prompt_ids: list[int], max_tokens: int, ignore_eos: bool) -> RunTiming: ...


class AdaspecSystem:
    """This engine, driven step by step so the first step's end is timed."""

    def __init__(self, name: str, engine) -> None:
        self.name = name
        self.engine = engine

    def run(self, prompt_ids: list[int], max_tokens: int, ignore_eos: bool) -> RunTiming:
        from adaspec.types import SamplingParams

        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=ignore_eos)
        t0 = time.perf_counter()
        state = self.engine.start(prompt_ids, params)
        first_s, first_tokens = None, 0
        try:
            while not state.finished:
                self.engine.step(state)
                if first_s is None and state.output_ids:
                    first_s, first_tokens = time.perf_counter() - t0, len(state.output_ids)
        except BaseException:
            self.engine.abort(state)
            raise
        total_s = time.perf_counter() - t0
        ids = self.engine.result(state).token_ids
        return RunTiming(ids, total_s, first_s if first_s is not None else total_s, first_tokens)


class LlamaCppSystem:
    """llama.cpp through ``llama-cpp-python``, greedy, fed this engine's prompt token ids.

    Each request starts from an empty context (``reset()``), so llama.cpp does
    not reuse the chat template's prefix from the previous request (this
    engine does not either).

    Args:
        llm: a ``llama_cpp.Llama``.
        eos_token_ids: ids that end a request (unless ``ignore_eos``).
        lookup_tokens: prompt lookup draft length; 0 for plain decoding.
    """

    def __init__(self, name: str, model_path: str, threads: int, n_ctx: int, eos_token_ids: set[int],
                 lookup_tokens: int = 0) -> None:
        import llama_cpp

        kw = {}
        if lookup_tokens:
            from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

            kw["draft_model"] = LlamaPromptLookupDecoding(num_pred_tokens=lookup_tokens)
        self.name = name
        self.llm = llama_cpp.Llama(model_path=model_path, n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx,
                                   verbose=False, seed=0, **kw)
        self.eos_token_ids = set(eos_token_ids)

    def run(self, prompt_ids: list[int], max_tokens: int, ignore_eos: bool) -> RunTiming:
        self.llm.reset()
        t0 = time.perf_counter()
        first_s = None
        ids: list[int] = []
        for tok in self.llm.generate(list(prompt_ids), top_k=1, top_p=1.0, min_p=0.0, temp=0.0,
                                     repeat_penalty=1.0, reset=True):
            ids.append(int(tok))
            if first_s is None:
                first_s = time.perf_counter() - t0
            if len(ids) >= max_tokens or (not ignore_eos and tok in self.eos_token_ids):
                break
        total_s = time.perf_counter() - t0
        return RunTiming(ids, total_s, first_s if first_s is not None else total_s, 1)


def llama_cpp_missing() -> Optional[str]:
    """Why llama.cpp cannot run here (None if ``llama_cpp`` imports)."""
    try:
        import llama_cpp  # noqa: F401
    except Exception as exc:  # ImportError, or a broken shared library (OSError)
        return f"{type(exc).__name__}: {exc}"
    return None


def make_record(stream: str, request: int, domain: str, prompt_id: str, system: str, threads: int,
                prompt_tokens: int, timing: RunTiming, plain_ids: Optional[list[int]]) -> EngineRecord:
    """The record of one timed request (see :class:`EngineRecord` for the formulas)."""
    n = len(timing.token_ids)
    decode_s = timing.total_s - timing.first_s
    after_first = n - timing.first_tokens
    decode = after_first / decode_s if after_first > 0 and decode_s > 0 else None
    return EngineRecord(stream=stream, request=request, domain=domain, prompt_id=prompt_id, system=system,
                        threads=threads, prompt_tokens=prompt_tokens, new_tokens=n, total_s=timing.total_s,
                        first_s=timing.first_s, first_tokens=timing.first_tokens, decode_tokens_per_s=decode,
                        request_tokens_per_s=n / timing.total_s if timing.total_s > 0 else 0.0,
                        same_as_plain=None if plain_ids is None else timing.token_ids == plain_ids)


def summarize(records: Sequence[EngineRecord]) -> list[dict]:
    """Per (stream, threads, system): pooled decode-only and per-request tokens/s.

    decode-only = sum of tokens after each first step / sum of time after it;
    per request = sum of new tokens / sum of request times (prefill included).
    Ratios are to ``llama-plain`` at the same stream and threads when it ran,
    else to ``plain``.
    """
    groups: dict[tuple[str, int, str], list[EngineRecord]] = {}
    for r in records:
        groups.setdefault((r.stream, r.threads, r.system), []).append(r)
    rows = []
    for (stream, threads, system), rs in groups.items():
        timed = [r for r in rs if r.decode_tokens_per_s is not None]
        dec_tok = sum(r.new_tokens - r.first_tokens for r in timed)
        dec_s = sum(r.total_s - r.first_s for r in timed)
        rows.append({"stream": stream, "threads": threads, "system": system, "requests": len(rs),
                     "new_tokens": sum(r.new_tokens for r in rs),
                     "decode_tokens_per_s": dec_tok / dec_s if dec_s > 0 else None,
                     "request_tokens_per_s": sum(r.new_tokens for r in rs) / sum(r.total_s for r in rs),
                     "same_as_plain": (sum(bool(r.same_as_plain) for r in rs), len(rs))
                     if all(r.same_as_plain is not None for r in rs) else None})
    for row in rows:
        ref_name = "llama-plain" if any(o["system"] == "llama-plain" and o["stream"] == row["stream"]
                                        and o["threads"] == row["threads"] for o in rows) else "plain"
        ref = next((o for o in rows if o["system"] == ref_name and o["stream"] == row["stream"]
                    and o["threads"] == row["threads"]), None)
        row["reference"] = ref_name
        for key in ("decode_tokens_per_s", "request_tokens_per_s"):
            good = ref is not None and ref[key] and row[key] is not None
            row[key.replace("tokens_per_s", "ratio")] = row[key] / ref[key] if good else None
    return rows


def format_engines(rows: Sequence[dict]) -> str:
    """Markdown: one line per stream, threads and system, ratios to the reference system."""
    def num(x, fmt):
        return "-" if x is None else format(x, fmt)

    lines = ["| stream | threads | system | requests | new tokens | decode-only tok/s | (x ref) "
             "| per request tok/s | (x ref) | same as plain |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        same = "-" if r["same_as_plain"] is None else f"{r['same_as_plain'][0]}/{r['same_as_plain'][1]}"
        lines.append(f"| {r['stream']} | {r['threads']} | {r['system']} | {r['requests']} | {r['new_tokens']} "
                     f"| {num(r['decode_tokens_per_s'], '.1f')} | {num(r['decode_ratio'], '.2f')} "
                     f"| {num(r['request_tokens_per_s'], '.1f')} | {num(r['request_ratio'], '.2f')} | {same} |")
    refs = sorted({r["reference"] for r in rows})
    lines.append("")
    lines.append(f"ratios (x ref) are to {' / '.join(refs)} on the same stream and threads; "
                 "same as plain: requests whose output equals this engine's plain decoding")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------- the run
@dataclass
class BenchRequest:
    stream: str
    domain: str
    prompt_id: str
    prompt_ids: list[int]
    max_tokens: int
    ignore_eos: bool


def build_requests(target, domains: Sequence[str], per_domain: int, max_tokens: int, long_requests: int,
                   long_max_tokens: int, seed: int = 0) -> list[BenchRequest]:
    """The drift prompts (``per_domain`` of each domain) and the long-output stream.

    The long-output stream takes the ``long_requests`` shortest prompts (after the
    chat template) among the domains' sets, with ``ignore_eos`` so every request
    emits exactly ``long_max_tokens`` tokens.
    """
    from adaspec.bench.drift import build_phases, build_stream
    from adaspec.engine import Engine
    from adaspec.prompts import load_domain

    reqs = []
    if per_domain > 0:
        for r in build_stream(target, build_phases(list(domains), per_domain, seed=seed)):
            reqs.append(BenchRequest("drift", r.phase, r.prompt_id, r.prompt_ids, max_tokens, False))
    if long_requests > 0:
        templ = Engine(target)
        pool = [(p, templ.apply_chat_template(p.messages)) for d in domains for p in load_domain(d)]
        pool.sort(key=lambda pi: (len(pi[1]), pi[0].prompt_id))
        for p, ids in pool[:long_requests]:
            reqs.append(BenchRequest("long", p.domain, p.prompt_id, ids, long_max_tokens, True))
    return reqs


def run_engines(requests: Sequence[BenchRequest], systems: Sequence[EngineBenchSystem], threads: int,
                log: Callable[[str], None] = print, skipped: Optional[list] = None) -> list[EngineRecord]:
    """Every request on every system, interleaved (order rotated per request).

    ``same_as_plain`` compares each system's output to ``plain``'s on the same
    request when a system named ``plain`` runs. A request on which any system
    raises is logged, appended to ``skipped`` (stream, request, domain,
    threads, the errors) and left out for every system, so the systems are
    always compared on the same requests.
    """
    records: list[EngineRecord] = []
    names = [s.name for s in systems]
    for i, req in enumerate(requests):
        order = list(systems[i % len(systems):]) + list(systems[:i % len(systems)])
        timings, errors = {}, {}
        for s in order:
            try:
                timings[s.name] = s.run(req.prompt_ids, req.max_tokens, req.ignore_eos)
            except Exception as exc:  # a peer's bug must not end the run (llama-cpp-python's lookup did)
                errors[s.name] = f"{type(exc).__name__}: {exc}"
        if errors:
            log(f"[{req.stream} {i + 1}/{len(requests)} {req.domain}] left out for every system: "
                + "; ".join(f"{n} failed ({e})" for n, e in errors.items()))
            if skipped is not None:
                skipped.append({"stream": req.stream, "request": i, "domain": req.domain, "threads": threads,
                                "prompt_tokens": len(req.prompt_ids), "errors": errors})
            continue
        plain_ids = timings["plain"].token_ids if "plain" in timings else None
        for name in names:
            rec = make_record(req.stream, i, req.domain, req.prompt_id, name, threads, len(req.prompt_ids),
                              timings[name], plain_ids)
            records.append(rec)
        log(f"[{req.stream} {i + 1}/{len(requests)} {req.domain}] " + "  ".join(
            f"{r.system} {r.new_tokens} tok {r.request_tokens_per_s:.1f}/s" for r in records[-len(names):]))
    return records


def default_gguf(model: str) -> Optional[str]:
    """The GGUF file ``model`` is (a ``.gguf`` path) or ships in (registry name); None when there is none."""
    from adaspec.models import REGISTRY

    if model.endswith(".gguf") and Path(model).is_file():
        return model
    if model in REGISTRY:
        try:
            return str(REGISTRY[model].locate_gguf())
        except (FileNotFoundError, RuntimeError, ValueError):
            return None
    return None


def add_engines_arguments(p: argparse.ArgumentParser) -> None:
    from adaspec.models import DEFAULT_MODEL

    p.add_argument("--model", default=DEFAULT_MODEL, help="default: %(default)s")
    p.add_argument("--dtype", default="int8", help="this engine's precision (default: %(default)s)")
    p.add_argument("--gguf", default=None, help="llama.cpp's model file (default: the GGUF the model ships in)")
    p.add_argument("--threads", default="1", help="comma list of thread counts, each a separate pass (default: %(default)s)")
    p.add_argument("--domains", default=DEFAULT_DOMAINS, help="default: %(default)s")
    p.add_argument("--per-domain", type=int, default=3, help="drift prompts per domain (default: %(default)s)")
    p.add_argument("--max-tokens", type=int, default=64, help="new tokens per drift request (default: %(default)s)")
    p.add_argument("--long-requests", type=int, default=4, help="requests of the long-output stream (default: %(default)s)")
    p.add_argument("--long-max-tokens", type=int, default=256, help="new tokens per long request (default: %(default)s)")
    p.add_argument("--lookup-tokens", type=int, default=DEFAULT_LOOKUP_TOKENS,
                   help="llama.cpp prompt lookup draft length (default: %(default)s)")
    p.add_argument("--systems", default=",".join(ENGINE_SYSTEMS + LLAMA_SYSTEMS), help="comma list (default: %(default)s)")
    p.add_argument("--out", default=None, help="folder for engines.jsonl and engines.md")


def _build_systems(names: Sequence[str], target, threads: int, gguf: Optional[str], lookup_tokens: int,
                   log: Callable[[str], None], n_ctx: int = 2048) -> list[EngineBenchSystem]:
    from adaspec.config import EngineConfig, build_engine

    unknown = [n for n in names if n not in ENGINE_SYSTEMS + LLAMA_SYSTEMS]
    if unknown:
        raise ValueError(f"unknown system(s) {', '.join(unknown)}; choose from "
                         f"{', '.join(ENGINE_SYSTEMS + LLAMA_SYSTEMS)}")
    systems: list[EngineBenchSystem] = []
    for name in names:
        if name in ENGINE_SYSTEMS:
            cfg = EngineConfig(model=target.name, dtype=target.dtype, speculator="none" if name == "plain" else name,
                               threads=threads)
            systems.append(AdaspecSystem(name, build_engine(cfg, target=target)))
    llama = [n for n in names if n in LLAMA_SYSTEMS]
    if llama:
        why = llama_cpp_missing() or (None if gguf else f"no GGUF file for {target.name} (give --gguf)")
        if why:
            log(f"llama.cpp not run ({why}); measuring this engine's systems only")
        else:
            for name in llama:
                systems.append(LlamaCppSystem(name, gguf, threads, n_ctx, target.eos_token_ids,
                                              lookup_tokens if name == "llama-lookup" else 0))
    return systems


def engines_from_args(args: argparse.Namespace) -> int:
    from adaspec.bench.drift import machine_info
    from adaspec.target import load_target
    from adaspec.threads import apply_threads

    thread_counts = [int(t) for t in str(args.threads).split(",") if t]
    if not thread_counts or min(thread_counts) < 1:
        raise ValueError("--threads needs counts >= 1")
    names = [s for s in args.systems.split(",") if s]
    gguf = args.gguf or default_gguf(args.model)
    apply_threads(thread_counts[0])
    target = load_target(args.model, dtype=args.dtype)
    requests = build_requests(target, [d for d in args.domains.split(",") if d], args.per_domain, args.max_tokens,
                              args.long_requests, args.long_max_tokens)
    from adaspec.engine import Engine

    warm_ids = Engine(target).apply_chat_template([{"role": "user", "content": "Say hello."}])
    print(f"engines: {len(requests)} requests, target {target.name} {target.dtype} "
          f"({getattr(target, 'runtime', 'transformers')}), llama.cpp on {gguf}")
    records: list[EngineRecord] = []
    skipped: list[dict] = []
    for threads in thread_counts:
        apply_threads(threads)
        # llama.cpp's context must hold the longest request (with prompt lookup it keeps logits for all of it)
        n_ctx = min(target.max_model_len, max(len(r.prompt_ids) + r.max_tokens for r in requests)
                    + args.lookup_tokens + LLAMA_N_CTX_SLACK)
        systems = _build_systems(names, target, threads, gguf, args.lookup_tokens, print, n_ctx=n_ctx)
        for s in systems:  # first-call costs (allocator, llama.cpp's graph) out of the timings; not a bench prompt
            s.run(warm_ids, 8, False)
        records += run_engines(requests, systems, threads, skipped=skipped)
    rows = summarize(records)
    table = format_engines(rows)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "engines.jsonl", "w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(asdict(r)) + "\n")
        (out / "run.json").write_text(json.dumps({"machine": machine_info(), "args": vars(args) | {"func": None},
                                                  "gguf": gguf, "skipped": skipped}, indent=1, default=str))
    print_table(table, str(Path(args.out) / "engines.md") if args.out else None)
    return 0
