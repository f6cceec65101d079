"""GRPO with TRL training the policy and adaspec generating the rollouts (issue 16).

    pip install 'adaspec[trl]'   # trl 1.16 (pinned in requirements.lock)
    python scripts/trl_grpo.py --steps 10                  # default model, int8 rollouts, atlas
    python scripts/trl_grpo.py --model /path/to/hf --dtype float32 --steps 3

TRL's ``GRPOTrainer`` trains the fp32 policy on CPU; its experimental
``rollout_func`` is :class:`adaspec.trl_rollouts.AdaspecRollouts`, which pushes
the trainer's weights into adaspec's running target whenever
``trainer.state.global_step`` moved, then samples each prompt's group on the
engine (speculative decoding; exact draws). The task is ``bench rl``'s word problems with
a verifiable reward (the right last number, plus a bonus for the 'Answer: N' format), so
rewards vary within a group and the policy really moves.
"""

from __future__ import annotations

import argparse
import os
import re
import time

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--dtype", default="int8", choices=["int8", "float32"], help="rollout precision")
    p.add_argument("--speculator", default="atlas")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--prompts", type=int, default=1, help="prompts per step (B)")
    p.add_argument("--group-size", type=int, default=8, help="samples per prompt (G)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--threads", default="1")
    p.add_argument("--out", default="bench_out/trl_grpo")
    args = p.parse_args()

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from adaspec import config
    from adaspec.bench.rl import arithmetic_prompts, reward
    from adaspec.models import resolve_model
    from adaspec.trl_rollouts import AdaspecRollouts

    cfg = config.EngineConfig(model=args.model, dtype=args.dtype, speculator=args.speculator, threads=args.threads)
    engine = config.build_engine(cfg)
    path = str(resolve_model(args.model))
    tokenizer = AutoTokenizer.from_pretrained(path)
    policy = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tasks = arithmetic_prompts(args.prompts, seed=0)
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": q}], "answer": a} for q, a in tasks] * 1000)

    def arithmetic_reward(completions, answer, completion_ids, **_):
        out = []
        for c, a, ids in zip(completions, answer, completion_ids):
            text = c[0]["content"] if isinstance(c, list) else c
            out.append(reward(text, int(a))[0])
        return out

    rollouts = AdaspecRollouts(engine, max_tokens=args.max_tokens)
    gcfg = GRPOConfig(output_dir=args.out, use_cpu=True, bf16=False, fp16=False, learning_rate=args.lr,
                      per_device_train_batch_size=args.prompts * args.group_size, num_generations=args.group_size,
                      max_completion_length=args.max_tokens, max_steps=args.steps, logging_steps=1, report_to=[],
                      save_strategy="no", temperature=1.0, beta=0.0, dataloader_num_workers=0, seed=0)
    trainer = GRPOTrainer(model=policy, reward_funcs=arithmetic_reward, args=gcfg, train_dataset=data,
                          processing_class=tokenizer, rollout_func=rollouts)
    t0 = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - t0
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    print(f"steps {trainer.state.global_step} in {total:.0f} s; rollouts {sum(rollouts.rollout_s):.0f} s; "
          f"weight pushes {len(rollouts.updates)} ({sum(u[2] for u in rollouts.updates):.0f} s); "
          f"reward per step {[round(r, 3) for r in rewards]}; policy version {engine.policy_version}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
