import sys, torch, pickle, time, copy
from adaspec.online.trainer import OnlineTrainer, OnlineConfig
from adaspec.speculators.draft_head import load_draft_head, shipped_checkpoint_path
from safetensors import safe_open
torch.set_num_threads(1)
docs = pickle.load(open("bench_results/issue15/docs.pkl","rb"))
base,_ = load_draft_head(shipped_checkpoint_path("smollm2-135m-instruct"))
import glob
f = glob.glob("/root/.cache/adaspec/models/smollm2-135m-instruct/**/model.safetensors", recursive=True)[0]
with safe_open(f, "pt") as g: embed = g.get_tensor("model.embed_tokens.weight").float()
dom = sys.argv[1]
for lr in [float(x) for x in sys.argv[2].split(",")]:
    cfg = OnlineConfig(lr=lr, steps_per_round=int(sys.argv[3]), min_new_positions=1, min_heldout_positions=1, heldout_every=1000000)
    tr = OnlineTrainer(base, embed, "/tmp/p15/root-exp", cfg)
    ds = docs[dom]
    st = tr.tenant("t")
    for d in ds[:24]: st.buffer.add(d)
    for d in ds[24:]: st.buffer.heldout.append(d)
    for r in range(int(sys.argv[4])):
        res = tr.train_round("t")
        print(dom, "lr", lr, "round", r, f"cand {res.candidate_acceptance_length:.3f} static {res.static_acceptance_length:.3f} serving {res.serving_acceptance_length:.3f} loss {res.loss:.3f} pub {res.published} {res.train_s:.1f}s", flush=True)
    import shutil; shutil.rmtree("/tmp/p15/root-exp", ignore_errors=True)
