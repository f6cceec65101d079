"""Arguments of ``adaspec train-speculator`` (also ``python -m adaspec.train.draft_head``)."""

from __future__ import annotations

import argparse
import json

from adaspec.train.data import DataPlan
from adaspec.train.draft_head import TrainConfig, train_draft_head


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the training options to ``parser`` (defaults: the shipped head's run)."""
    d, p = TrainConfig(), DataPlan()
    parser.add_argument("--model", default=d.model, help="target model name or path (default: %(default)s)")
    parser.add_argument("--data", default=",".join(p.sources),
                        help="comma-separated sources: chat, humaneval, stdlib, or paths (.jsonl, folder, file) "
                             "(default: %(default)s)")
    parser.add_argument("--out", required=True, help="run folder: shards, resumable state, checkpoint, report")
    parser.add_argument("--time-budget-s", type=float, default=None,
                        help="most seconds in the training loop (data stages are sized by the options below)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out")
    parser.add_argument("--steps", type=int, default=d.steps, help="most optimizer steps (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument("--unroll", type=int, default=d.unroll, help="chained head steps trained per position")
    parser.add_argument("--lr", type=float, default=d.lr)
    parser.add_argument("--feature-loss-weight", type=float, default=d.feature_loss_weight)
    parser.add_argument("--label-top-k", type=int, default=d.label_top_k,
                        help="target probabilities kept per position for the KL (0 = exact)")
    parser.add_argument("--draft-vocab-size", type=int, default=d.draft_vocab_size)
    parser.add_argument("--intermediate-size", type=int, default=d.intermediate_size)
    parser.add_argument("--num-blocks", type=int, default=d.num_blocks)
    parser.add_argument("--context-ngram", type=int, default=d.context_ngram,
                        help="longest context suffix matched for the head's successor input")
    parser.add_argument("--eval-every", type=int, default=d.eval_every)
    parser.add_argument("--num-chat", type=int, default=p.num_chat, help="chat prompts the target answers")
    parser.add_argument("--num-humaneval", type=int, default=p.num_humaneval,
                        help="HumanEval training tasks (even index < 120) answered and used as code")
    parser.add_argument("--humaneval-samples", type=int, default=p.humaneval_samples,
                        help="extra sampled answers per HumanEval training task")
    parser.add_argument("--stdlib-tokens", type=int, default=p.stdlib_tokens,
                        help="tokens of standard-library (or path) text to teacher-force")
    parser.add_argument("--max-new-tokens", type=int, default=p.max_new_tokens, help="longest target answer")
    parser.add_argument("--chunk-len", type=int, default=p.chunk_len, help="teacher-forcing chunk length")
    parser.add_argument("--gen-batch-size", type=int, default=p.gen_batch_size)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    plan = DataPlan(
        sources=[s.strip() for s in args.data.split(",") if s.strip()],
        num_chat=args.num_chat,
        num_humaneval=args.num_humaneval,
        humaneval_samples=args.humaneval_samples,
        stdlib_tokens=args.stdlib_tokens,
        max_new_tokens=args.max_new_tokens,
        chunk_len=args.chunk_len,
        gen_batch_size=args.gen_batch_size,
        seed=args.seed,
    )
    return TrainConfig(
        model=args.model, out_dir=args.out, data=plan, draft_vocab_size=args.draft_vocab_size,
        intermediate_size=args.intermediate_size, num_blocks=args.num_blocks,
        context_ngram=args.context_ngram, steps=args.steps,
        time_budget_s=args.time_budget_s, batch_size=args.batch_size, unroll=args.unroll, lr=args.lr,
        feature_loss_weight=args.feature_loss_weight, label_top_k=args.label_top_k, eval_every=args.eval_every, seed=args.seed,
        threads=args.threads, resume=args.resume, progress=not args.no_progress,
    )


def train_from_args(args: argparse.Namespace) -> int:
    """Run training from parsed arguments; prints the held-out summary. Returns the exit code."""
    result = train_draft_head(config_from_args(args))
    print(json.dumps({"checkpoint": str(result.checkpoint),
                      "heldout": result.report.get("heldout", {}).get("overall", {})}, indent=2))
    return 0
