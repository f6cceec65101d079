"""Trainer's cost to serving: paired runs of the same requests with the trainer busy vs stopped.

    PYTHONPATH=src .venv/bin/python bench_results/issue15/trainer_cost.py [rounds] [requests]

The trainer is kept busy the whole "on" run (worst case): it is fed captured
traffic documents (bench_results/issue15/docs.pkl, from collect_docs.py) with a
round threshold of one position, so it trains round after round. Serving is
atlas (1 torch thread); each pair runs on then off, alternating which comes first.
"""
import pickle, statistics, sys, time

import torch

from adaspec.config import EngineConfig, build_controller, load_config_target
from adaspec.engine import Engine
from adaspec.online.learned import load_learned_speculator
from adaspec.online.trainer import OnlineConfig
from adaspec.prompts import load_domain, shipped_prompts_root
from adaspec.types import SamplingParams

torch.set_num_threads(1)
rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 3
n = int(sys.argv[2]) if len(sys.argv) > 2 else 6
target = load_config_target(EngineConfig(speculator="atlas", threads=1))
engine = Engine(target, controller=build_controller(EngineConfig(speculator="atlas"), target))
prompts = [engine.apply_chat_template(p.messages) for p in load_domain("chat", shipped_prompts_root())[:n]]
docs = pickle.load(open("bench_results/issue15/docs.pkl", "rb"))
feed = [d for dom in ("sql", "rust", "tools") for d in docs[dom]]


def serve_s():
    t0 = time.perf_counter()
    tokens = 0
    for p in prompts:
        tokens += len(engine.generate(p, SamplingParams(max_tokens=64)).token_ids)
    return tokens / (time.perf_counter() - t0)


def busy_trainer():
    spec = load_learned_speculator(target, config=OnlineConfig(min_new_positions=1, min_heldout_positions=1,
                                                               steps_per_round=24))
    for i, d in enumerate(feed):
        spec.client.send(("doc", f"t{i % 3}", d))
    deadline = time.time() + 60
    while not spec.rounds and time.time() < deadline:  # wait until it is training
        spec.poll_trainer()
        time.sleep(0.5)
    return spec


serve_s()  # warm-up
ratios = []
for r in range(rounds):
    res = {}
    for mode in (("on", "off") if r % 2 == 0 else ("off", "on")):
        if mode == "on":
            spec = busy_trainer()
            res["on"] = serve_s()
            spec.poll_trainer()
            print(f"  trainer rounds during the run: {len(spec.rounds)}", flush=True)
            spec.close()
        else:
            res["off"] = serve_s()
    ratios.append(res["on"] / res["off"])
    print(f"pair {r}: trainer on {res['on']:.1f} tok/s, off {res['off']:.1f} tok/s, ratio {ratios[-1]:.3f}", flush=True)
print(f"median on/off ratio over {rounds} pairs: {statistics.median(ratios):.3f}")
