"""Offline: what draft-vocabulary adaptation adds to a round of online fine-tuning.

Traffic documents from bench_results/issue15/collect_docs.py (plain decoding of
36 prompts per domain through the serving path). Per domain: train on the first
24 documents, judge on the other 12 (other prompts), vocab_slots 0 vs 1024.
Usage: python bench_results/s12/vocab_offline.py DOCS.pkl DOMAINS ROUNDS SLOTS[,SLOTS]
"""
import glob, pickle, shutil, sys, tempfile
import torch
from safetensors import safe_open
from adaspec.online.trainer import OnlineConfig, OnlineTrainer
from adaspec.speculators.draft_head import load_draft_head, shipped_checkpoint_path

torch.set_num_threads(1)
docs = pickle.load(open(sys.argv[1], "rb"))
base, _ = load_draft_head(shipped_checkpoint_path("smollm2-135m-instruct"))
f = glob.glob("/root/.cache/adaspec/models/smollm2-135m-instruct/**/model.safetensors", recursive=True)[0]
with safe_open(f, "pt") as g:
    embed = g.get_tensor("model.embed_tokens.weight").float()
static_vocab = set(base.draft_to_target.tolist())
for dom in sys.argv[2].split(","):
    ds = docs[dom]
    held = torch.cat([d.target_argmax for d in ds[24:]])
    cov = sum(int(t) in static_vocab for t in held.tolist()) / held.numel()
    print(f"{dom}: {len(ds)} docs, held-out target tokens in the static draft vocabulary: {cov:.3f}", flush=True)
    for slots in [int(x) for x in sys.argv[4].split(",")]:
        root = tempfile.mkdtemp()
        cfg = OnlineConfig(min_new_positions=1, min_heldout_positions=1, heldout_every=1000000, vocab_slots=slots)
        tr = OnlineTrainer(base, embed, root, cfg)
        st = tr.tenant("t")
        for d in ds[:24]:
            st.buffer.add(d)
        for d in ds[24:]:
            st.buffer.heldout.append(d)
        for r in range(int(sys.argv[3])):
            res = tr.train_round("t")
            vocab = set(st.net.draft_to_target.tolist())
            cov2 = sum(int(t) in vocab for t in held.tolist()) / held.numel()
            print(f"  slots {slots} round {r}: candidate {res.candidate_acceptance_length:.3f} static "
                  f"{res.static_acceptance_length:.3f} (x{res.candidate_acceptance_length / res.static_acceptance_length:.3f}) "
                  f"changed {res.vocab_changed} adapted {res.vocab_adapted} held-out coverage {cov2:.3f} {res.train_s:.1f}s",
                  flush=True)
        shutil.rmtree(root, ignore_errors=True)
