"""Engine-level: none vs atlas at concurrency C, time split (forward / propose / rest)."""
import sys, time, torch
from adaspec.config import EngineConfig, build_engine
from adaspec.bench.drift import build_phases
from adaspec.types import SamplingParams
torch.set_num_threads(1)
phase, conc, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
(ph,) = build_phases([phase], n, seed=0)
res = {}
for spec in ("none", "atlas"):
    eng = build_engine(EngineConfig(speculator=spec, threads=1))
    prompts = [eng.apply_chat_template(p.messages) for p in ph.prompts]
    params = SamplingParams(max_tokens=64, temperature=0.0)
    tf = {"fwd": 0.0, "n": 0, "rows": 0, "prop": 0.0}
    orig = eng.target.forward_batch
    def fb(reqs, orig=orig, tf=tf):
        t = time.perf_counter(); o = orig(reqs); tf["fwd"] += time.perf_counter() - t; tf["n"] += 1
        tf["rows"] += sum(len(r.token_ids) for r in reqs); return o
    eng.target.forward_batch = fb
    op = eng._propose
    def prop(*a, op=op, tf=tf, **k):
        t = time.perf_counter(); o = op(*a, **k); tf["prop"] += time.perf_counter() - t; return o
    eng._propose = prop
    for rep in range(2):  # second pass: learned state warm
        for key in tf: tf[key] = 0
        t0 = time.perf_counter(); ntok = 0
        for i in range(0, n, conc):
            states = [eng.start(p, params, prefill=False) for p in prompts[i:i+conc]]
            while any(not s.finished for s in states):
                eng.step_batch(states, max_prefill_tokens=256)
            ntok += sum(len(s.output_ids) for s in states)
        wall = time.perf_counter() - t0
        print(f"{spec} pass {rep} conc {conc}: {ntok} tok {wall:.2f}s {ntok/wall:.1f} tok/s fwd {tf['fwd']:.2f}s/{tf['n']} fwds/{tf['rows']} rows propose {tf['prop']:.2f}s other {wall-tf['fwd']-tf['prop']:.2f}s", flush=True)
    res[spec] = ntok / wall
    print("gate", eng.batch_gate.stats())
print("atlas/none", res["atlas"] / res["none"])
