"""Where does 16-client time go? Engine-level, speculation off, one thread."""
import sys, time, torch
sys.argv = sys.argv[:1]
from adaspec.config import EngineConfig, build_engine
from adaspec.bench.drift import build_phases
from adaspec.types import SamplingParams
import adaspec.engine as E

torch.set_num_threads(1)
spec = sys.argv[1] if len(sys.argv) > 1 else "none"
cfg = EngineConfig(speculator="none", threads=1)
eng = build_engine(cfg)
(ph,) = build_phases(["python"], 16, seed=0)
prompts = [eng.apply_chat_template(p.messages) for p in ph.prompts]
print("prompt lens", [len(p) for p in prompts])
params = SamplingParams(max_tokens=64, temperature=0.0)

# instrument
tf = {"fwd": 0.0, "n": 0, "rows": 0}
orig = eng.target.forward_batch
def fb(reqs):
    t = time.perf_counter(); o = orig(reqs); tf["fwd"] += time.perf_counter() - t; tf["n"] += 1
    tf["rows"] += sum(len(r.token_ids) for r in reqs); return o
eng.target.forward_batch = fb

def run(conc):
    for k in tf: tf[k] = 0
    t0 = time.perf_counter(); ntok = 0
    for i in range(0, 16, conc):
        states = [eng.start(p, params, prefill=False) for p in prompts[i:i+conc]]
        while any(not s.finished for s in states):
            eng.step_batch(states, max_prefill_tokens=256)
        ntok += sum(len(s.output_ids) for s in states)
        for s in states: eng._release(s) if not s.finished else None
    wall = time.perf_counter() - t0
    print(f"conc {conc}: {ntok} tok {wall:.2f}s {ntok/wall:.1f} tok/s  fwd {tf['fwd']:.2f}s in {tf['n']} forwards, {tf['rows']} rows; non-forward {wall-tf['fwd']:.2f}s")
    return ntok / wall
r1 = run(1); r16 = run(16); r1b = run(1); r16b = run(16)
print("ratio", r16 / r1, r16b / r1b)
