"""Build the replay file of broad data the online trainer mixes into every round.

The documents are the target's own answers to the static head's kind of
training prompts (MT-bench / Spec-Bench chat turns outside the held-out
tenth, HumanEval tasks with even index below 120), captured through the
serving path exactly as live traffic is (int8 features at committed
positions), so replay and traffic have one format and one feature
distribution. No Rust, SQL or tool-call prompts: drift stays a real test.

    python -m adaspec.online.replay --out src/adaspec/data/replay-smollm2-135m-instruct.safetensors
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Optional, Sequence

from adaspec.online.buffer import TrafficDoc


class _Collect:
    """Stands in for the trainer client: keeps the documents a speculator would send."""

    def __init__(self) -> None:
        self.docs: list[TrafficDoc] = []
        self.errors: list[str] = []
        self.alive = False

    def send(self, msg: tuple) -> None:
        if msg[0] == "doc":
            self.docs.append(msg[2])

    def poll(self) -> list:
        return []

    def close(self) -> None:
        pass


def broad_prompts(num_chat: int, num_python: int) -> list[list[dict]]:
    """Chat messages of the replay prompts (see the module docstring)."""
    from adaspec.prompts import load_chat, load_python, shipped_prompts_root
    from adaspec.train.data import HUMANEVAL_TRAIN_LIMIT, _spread

    root = shipped_prompts_root()
    chat = [p for i, p in enumerate(load_chat(root)) if i % 10 != 5]
    python = [p for i, p in enumerate(load_python(root)) if i % 2 == 0 and i < HUMANEVAL_TRAIN_LIMIT]
    return [p.messages for p in _spread(chat, num_chat)] + [p.messages for p in _spread(python, num_python)]


def build_replay(target: Any, prompts: Sequence[list[dict]], max_tokens: int = 96,
                 progress: bool = True) -> list[TrafficDoc]:
    """Let the target answer ``prompts`` greedily, capturing documents as the learned head does."""
    from tqdm import tqdm

    from adaspec.controller import FixedController
    from adaspec.engine import Engine
    from adaspec.online.learned import load_learned_speculator
    from adaspec.types import SamplingParams

    learned = load_learned_speculator(target, train=False)
    sink = _Collect()
    learned.client = sink  # capture, do not train
    engine = Engine(target, speculators=[learned], controller=FixedController(None, 0))
    for messages in tqdm(prompts, desc="replay answers", unit="prompt", disable=not progress):
        state = engine.start(engine.apply_chat_template(messages), SamplingParams(max_tokens=max_tokens))
        while not state.finished:
            engine.step(state)
        engine.result(state)
    learned.close()
    return sink.docs


def main(argv: Optional[list[str]] = None) -> int:
    from adaspec.config import EngineConfig, load_config_target
    from adaspec.online.trainer import save_replay

    p = argparse.ArgumentParser(prog="python -m adaspec.online.replay", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.add_argument("--model", default=None, help="target model (default: the default model)")
    p.add_argument("--num-chat", type=int, default=24, help="chat prompts (default: 24)")
    p.add_argument("--num-python", type=int, default=24, help="HumanEval training prompts (default: 24)")
    p.add_argument("--max-tokens", type=int, default=96, help="new tokens per answer (default: 96)")
    args = p.parse_args(argv)
    cfg = EngineConfig(speculator="none", threads=1, **({"model": args.model} if args.model else {}))
    target = load_config_target(cfg)
    docs = build_replay(target, broad_prompts(args.num_chat, args.num_python), args.max_tokens)
    path = save_replay(Path(args.out), docs, info={"model": str(target.name), "num_chat": args.num_chat,
                                                   "num_python": args.num_python, "max_tokens": args.max_tokens,
                                                   "positions": sum(d.num_labels for d in docs)})
    print(f"wrote {path}: {len(docs)} documents, {sum(d.num_labels for d in docs)} labelled positions, "
          f"{path.stat().st_size / 1e6:.1f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
