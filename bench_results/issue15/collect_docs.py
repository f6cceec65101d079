import sys, torch, pickle
from adaspec.config import EngineConfig, load_config_target
from adaspec.engine import Engine
from adaspec.controller import FixedController
from adaspec.speculators.draft_head import load_static_speculator
from adaspec.online.learned import load_learned_speculator
from adaspec.prompts import load_domain, shipped_prompts_root, shared_prompts_root
from adaspec.types import SamplingParams
torch.set_num_threads(1)
target = load_config_target(EngineConfig(speculator="none", threads=1))
static = load_static_speculator(target)
learned = load_learned_speculator(target, train=False)
docs = []
class Sink:
    def send(self, msg): docs.append(msg)
    errors=[]; alive=True
    def poll(self): return []
    def close(self): pass
learned.client = Sink()
eng = Engine(target, speculators=[learned], controller=FixedController(static, 4))
root = shared_prompts_root() or shipped_prompts_root()
out = {}
for dom in sys.argv[1].split(","):
    ps = load_domain(dom, root)
    ps = ps[::max(1, len(ps)//int(sys.argv[2]))][:int(sys.argv[2])]
    docs.clear()
    for p in ps:
        st = eng.start(eng.apply_chat_template(p.messages), SamplingParams(max_tokens=64))
        while not st.finished: eng.step(st)
        eng.result(st)
    out[dom] = [m[2] for m in docs]
    print(dom, len(out[dom]), sum(d.num_labels for d in out[dom]), flush=True)
pickle.dump(out, open(sys.argv[3], "wb"))
