import sys, torch, pickle, glob
from adaspec.online.trainer import OnlineTrainer, OnlineConfig, load_replay
from adaspec.speculators.draft_head import load_draft_head, shipped_checkpoint_path
from safetensors import safe_open
torch.set_num_threads(1)
docs = pickle.load(open("bench_results/issue15/docs.pkl","rb"))
base,_ = load_draft_head(shipped_checkpoint_path("smollm2-135m-instruct"))
f = glob.glob("/root/.cache/adaspec/models/smollm2-135m-instruct/**/model.safetensors", recursive=True)[0]
with safe_open(f, "pt") as g: embed = g.get_tensor("model.embed_tokens.weight").float()
replay = [d.to_feature_doc(source="replay") for d in load_replay("src/adaspec/data/replay-smollm2-135m-instruct.safetensors")] if sys.argv[1]=="replay" else []
cfg = OnlineConfig(min_new_positions=1, min_heldout_positions=1, heldout_every=1000000, min_gain=0.0)
tr = OnlineTrainer(base, embed, "/tmp/p15/root-exp2", cfg, replay=replay)
st = tr.tenant("t")
held = {}
for dom in ["python","sql","rust"]:
    held[dom] = docs[dom][24:]
def ev(net):
    out = {}
    for dom, hd in held.items():
        st.buffer.heldout.clear(); st.buffer.heldout.extend(hd)
        out[dom] = round(tr.evaluate(net, tr.heldout_packed("t")), 3)
    return out
print("static", ev(base))
for dom in ["sql","rust"]:
    for d in docs[dom][:24]: st.buffer.add(d)
    for r in range(4):
        st.buffer.heldout.clear(); st.buffer.heldout.extend(held[dom])
        tr.train_round("t")
    print("after", dom, ev(st.net), flush=True)
import shutil; shutil.rmtree("/tmp/p15/root-exp2", ignore_errors=True)
