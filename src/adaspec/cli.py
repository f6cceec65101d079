"""Command line: adaspec generate | models | bench | demo | serve | state | train-speculator."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Optional

from adaspec import config
from adaspec.models import DEFAULT_MODEL


_FAST_EXIT = {"ok": False}  # set once a command has written everything (see entry())


def _note(message: str) -> None:
    print(f"adaspec: {message}", file=sys.stderr)


def cmd_generate(args: argparse.Namespace) -> int:
    from adaspec.types import SamplingParams

    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed, stop=args.stop or [],
                            logprobs=args.logprobs)
    params.validate()
    cfg = config.config_from_args(args)
    engine = config.build_engine(cfg, log=_note)
    store = config.open_store(cfg.state_dir)
    if store is not None:
        config.restore_state(store, engine)
    final = None
    try:
        if args.json:
            r = engine.generate(args.prompt, params, chat=args.chat, tenant=cfg.tenant)
            out = r.to_dict()
            out["model"] = cfg.model
            print(json.dumps(out, ensure_ascii=False))
        else:
            for delta in engine.stream(args.prompt, params, chat=args.chat, tenant=cfg.tenant):
                sys.stdout.write(delta.text)
                sys.stdout.flush()
                final = delta.result or final
            sys.stdout.write("\n")
    finally:
        if store is not None:
            config.save_state(store, engine)
    _FAST_EXIT["ok"] = True  # everything is written: entry() may skip the interpreter's teardown
    if final is not None:
        s = final.speculation
        print(f"[{final.finish_reason}; {final.usage.completion_tokens} tokens in {final.elapsed_s:.2f} s "
              f"= {final.usage.completion_tokens / max(final.elapsed_s, 1e-9):.1f} tok/s; "
              f"acceptance rate {s.acceptance_rate:.2f}, mean acceptance length {s.mean_acceptance_length:.2f}, "
              f"{s.target_forwards} target forwards]", file=sys.stderr)
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from adaspec.models import list_models, resolve_model

    if args.action == "fetch":
        path = resolve_model(args.name)
        print(f"{args.name}: {path}")
        return 0
    rows = list_models()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for r in rows:
        print(f"{r['name']:32s} {r['status']:36s} {r['cache']}")
        print(f"{'':32s} {r['description']}")
        if r["status"] == "not installed":
            print(f"{'':32s} install: {r['install']}")
    return 0


def cmd_bench_step_cost(args: argparse.Namespace) -> int:
    from adaspec.bench.runtime_cost import cli_step_cost

    return cli_step_cost(args)


def _bench_prompts(domains: str, per_domain: int, prompts_file: Optional[str]):
    from adaspec.prompts import load_domain, load_jsonl_prompts

    if prompts_file:
        return load_jsonl_prompts(prompts_file, "custom")[:per_domain]
    out = []
    for d in domains.split(","):
        out += load_domain(d)[:per_domain]
    return out


def cmd_bench_generate(args: argparse.Namespace) -> int:
    from adaspec.bench.generate import run_generate_bench, summarize, write_jsonl

    prompts = _bench_prompts(args.domains, args.per_domain, args.prompts_file)
    target = config.load_config_target(config.config_from_args(args))
    records = run_generate_bench(target, prompts, max_tokens=args.max_tokens, lookahead=args.lookahead,
                                 systems=args.systems.split(",") if args.systems else None)
    table = summarize(records)
    print(f"\nmodel {args.model}, dtype {args.dtype}, {len(prompts)} prompts, max_tokens {args.max_tokens}, greedy\n")
    print(table)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        write_jsonl(records, os.path.join(args.out, "generate.jsonl"))
        Path(args.out, "generate.md").write_text(table + "\n")
        print(f"\nwrote {args.out}/generate.jsonl and generate.md")
    return 0


DEMO_SYSTEMS = "plain,hf-prompt-lookup,suffix,static,atlas"


def cmd_demo(args: argparse.Namespace) -> int:
    """The drift benchmark, short: five phases of real prompts, adaspec vs plain and transformers.

    About 10 minutes on a 2-core machine with the defaults; prints the summary
    and where the figure is (``<out>/drift.png``).
    """
    from adaspec.bench.drift import add_drift_arguments, drift_from_args

    p = argparse.ArgumentParser(prog="adaspec demo")
    add_drift_arguments(p)
    skip = min(3, args.phase_length // 2) if args.skip is None else args.skip
    argv = ["--model", args.model, "--dtype", args.dtype, "--phase-length", str(args.phase_length),
            "--skip", str(skip), "--systems", args.systems, "--max-tokens", str(args.max_tokens),
            "--out", args.out, "--threads", str(args.threads)]
    if args.max_model_len is not None:
        argv += ["--max-model-len", str(args.max_model_len)]
    ns = p.parse_args(argv)
    print(f"adaspec demo: a drifting request stream (Python -> Rust -> chat -> SQL -> tool calls), "
          f"{args.phase_length} requests per phase, greedy, {args.max_tokens} new tokens each; systems {args.systems}. "
          "Every speculative output is checked against plain decoding.", flush=True)
    return drift_from_args(ns)


def cmd_serve(args: argparse.Namespace) -> int:
    from adaspec.server.main import serve_from_args

    return serve_from_args(args) or 0


def cmd_state(args: argparse.Namespace) -> int:
    from adaspec.store import format_inspect

    if not Path(args.dir).is_dir():
        raise FileNotFoundError(f"{args.dir}: no such state directory")
    print(format_inspect(args.dir))
    return 0


def cmd_state_delete(args: argparse.Namespace) -> int:
    from adaspec.store import delete_tenant

    removed = delete_tenant(args.dir, args.tenant)
    if not removed:
        print(f"no learned state of tenant {args.tenant!r} in {args.dir}")
    for name, n in sorted(removed.items()):
        print(f"{name}: removed {n} entries of tenant {args.tenant!r}")
    return 0


# bench subcommands whose arguments live in their own module: (help, module, add-arguments, run)
_LAZY_BENCH: dict[str, tuple[str, str, str, str]] = {
    "drift": ("workload-drift stream: every system side by side, phase by phase",
              "adaspec.bench.drift", "add_drift_arguments", "drift_from_args"),
    "quality": ("perplexity per target precision on held-out text",
                "adaspec.bench.quality", "add_quality_arguments", "quality_from_args"),
    "engines": ("this engine (plain, atlas) vs llama.cpp (plain, prompt lookup), same prompts",
                "adaspec.bench.engines", "add_engines_arguments", "engines_from_args"),
    "restart": ("a restarted server vs before the restart vs a cold one, on repeated traffic",
                "adaspec.bench.restart", "add_restart_arguments", "restart_from_args"),
    "structured": ("agent traffic: BFCL tool calls forced by grammar, atlas vs constrained plain",
                   "adaspec.bench.structured", "add_structured_arguments", "structured_from_args"),
    "serve": ("the real server on loopback under N concurrent streaming clients "
              "(continuous batching, speculation on/off, prefix reuse)",
              "adaspec.bench.serve", "add_serve_bench_arguments", "serve_bench"),
    "soak": ("the real server under N streaming clients for minutes: no 5xx, no lost "
             "or duplicated token, flat memory",
             "adaspec.bench.soak", "add_soak_arguments", "soak_from_args"),
    "rl": ("GRPO rollouts, B prompts x G samples per round, a policy update every round",
           "adaspec.bench.rl", "add_rl_arguments", "rl_from_args"),
    "threads": ("--threads settings on a quiet machine and beside a busy core",
                "adaspec.bench.threads", "add_threads_bench_arguments", "threads_from_args"),
}


def build_parser(argv: Optional[list[str]] = None) -> argparse.ArgumentParser:
    """The command-line parser. With ``argv``, the subcommands whose arguments come from
    their own modules (bench, train-speculator, serve) are filled in only where ``argv``
    names them, so a plain ``generate`` imports none of them; without it, all are."""
    wanted = None if argv is None else set(argv)
    parser = argparse.ArgumentParser(prog="adaspec", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text for one prompt")
    config.add_model_arguments(g)
    g.add_argument("--prompt", required=True, help="the prompt text (raw, unless --chat)")
    g.add_argument("--chat", action="store_true", help="wrap the prompt as one user message in the chat template")
    g.add_argument("--max-tokens", type=int, default=64, help="new tokens at most (default: %(default)s)")
    g.add_argument("--temperature", type=float, default=0.0,
                   help="sampling temperature; 0 decodes greedily (default: %(default)s)")
    g.add_argument("--top-p", type=float, default=1.0,
                   help="nucleus sampling: keep the smallest set of tokens whose probability reaches this "
                        "(default: %(default)s, off)")
    g.add_argument("--top-k", type=int, default=0,
                   help="sample among the k most likely tokens only; 0 keeps all (default: %(default)s)")
    g.add_argument("--seed", type=int, default=None,
                   help="sampling seed: the same seed gives the same output under any speculator "
                        "(default: unseeded)")
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    g.add_argument("--logprobs", type=int, default=None, help="return logprobs with this many top alternatives")
    config.add_speculator_arguments(g, "folder of learned-state snapshots: restored at start, written at the end")
    g.add_argument("--tenant", default=config.DEFAULT_TENANT,
                   help="tenant whose learned state is used (default: %(default)s)")
    g.add_argument("--json", action="store_true", help="print one JSON object")
    g.set_defaults(func=cmd_generate)

    m = sub.add_parser("models", help="list models, or fetch (convert) one")
    m.add_argument("action", nargs="?", default="list", choices=["list", "fetch"])
    m.add_argument("name", nargs="?", default=DEFAULT_MODEL)
    m.add_argument("--json", action="store_true")
    m.set_defaults(func=cmd_models)

    b = sub.add_parser("bench", help="benchmarks")
    bsub = b.add_subparsers(dest="bench", required=True)
    sc = bsub.add_parser("step-cost", help="verify-forward cost for k = 1..K relative to k = 1")
    sc.add_argument("--model", default=DEFAULT_MODEL)
    sc.add_argument("--dtypes", default="float32,int8")
    sc.add_argument("--max-k", type=int, default=16)
    sc.add_argument("--repeats", type=int, default=7)
    config.add_threads_argument(sc, default=1)
    sc.add_argument("--out", default=None, help="write the Markdown table here")
    sc.add_argument("--runtimes", default="transformers,lean", help="comma list: transformers, lean")
    sc.add_argument("--contexts", default="128", help="cached context lengths, comma list (e.g. 128,1024,4096)")
    sc.set_defaults(func=cmd_bench_step_cost)
    bg = bsub.add_parser("generate", help="this engine vs transformers generate(), same prompts")
    config.add_model_arguments(bg)
    bg.add_argument("--domains", default="python,rust,chat,sql,tools")
    bg.add_argument("--per-domain", type=int, default=4)
    bg.add_argument("--prompts-file", default=None, help="JSONL with 'messages' or 'prompt' per line")
    bg.add_argument("--max-tokens", type=int, default=96)
    bg.add_argument("--lookahead", type=int, default=8)
    bg.add_argument("--systems", default=None, help="comma list (default: all)")
    bg.add_argument("--out", default=None, help="folder for generate.jsonl and generate.md")
    bg.set_defaults(func=cmd_bench_generate)

    for name, (helptext, module, add_name, run_name) in _LAZY_BENCH.items():
        sp = bsub.add_parser(name, help=helptext)
        if wanted is None or name in wanted:  # importing every bench module costs ~0.2 s of start-up
            mod = importlib.import_module(module)
            getattr(mod, add_name)(sp)
            sp.set_defaults(func=getattr(mod, run_name))

    d = sub.add_parser("demo", help="short drift benchmark on the default model (~10 min on 2 cores)")
    config.add_model_arguments(d)
    d.add_argument("--phase-length", type=int, default=8, help="requests per phase (default: %(default)s)")
    d.add_argument("--skip", type=int, default=None,
                   help="requests per phase left out of the 'after' columns (default: 3, or half the phase "
                        "length when that is shorter)")
    d.add_argument("--systems", default=DEMO_SYSTEMS, help="comma list (default: %(default)s)")
    d.add_argument("--max-tokens", type=int, default=64, help="new tokens per request (default: %(default)s)")
    d.add_argument("--out", default="bench_out/demo", help="output folder (default: %(default)s)")
    d.set_defaults(func=cmd_demo)

    ts = sub.add_parser("train-speculator", help="train a draft head (static speculator) for a model")
    if wanted is None or "train-speculator" in wanted:
        from adaspec.train.cli import add_train_arguments, train_from_args

        add_train_arguments(ts)
        ts.set_defaults(func=train_from_args)

    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    if wanted is None or "serve" in wanted:
        try:
            from adaspec.server.main import add_serve_arguments

            add_serve_arguments(s)
        except ImportError:
            pass
    s.set_defaults(func=cmd_serve)

    st = sub.add_parser("state", help="learned-state snapshots")
    stsub = st.add_subparsers(dest="state_cmd", required=True)
    si = stsub.add_parser("inspect", help="print what a snapshot folder holds")
    si.add_argument("dir")
    si.set_defaults(func=cmd_state)
    sd = stsub.add_parser("delete", help="delete one tenant's learned state from a snapshot folder "
                          "(for a running server use DELETE /admin/tenants/TENANT/state)")
    sd.add_argument("dir")
    sd.add_argument("--tenant", required=True, help="the tenant whose learned state is deleted")
    sd.set_defaults(func=cmd_state_delete)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as e:
        print(f"adaspec: error: {e}", file=sys.stderr)
        return 2


def entry() -> None:
    """The ``adaspec`` console command: :func:`main`, then exit with its status.

    After a ``generate`` whose output is flushed, with no child process and no other
    non-daemon thread left, the process ends with ``os._exit``: tearing the interpreter
    down after torch is loaded (its modules' and libraries' finalizers) costs more than
    the rest of a short generation's start-up here (BENCHMARKS.md, start-up). Snapshots are
    written before that point (:func:`cmd_generate`'s ``finally``).
    """
    try:
        rc = main()
    except BrokenPipeError:  # the reader went away (`adaspec generate ... | head`): no traceback
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        sys.exit(1)
    if _FAST_EXIT["ok"]:
        import multiprocessing
        import threading

        others = [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon]
        if not others and not multiprocessing.active_children():
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(rc)
    sys.exit(rc)


if __name__ == "__main__":
    entry()
