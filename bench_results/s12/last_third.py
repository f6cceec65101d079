"""Mean acceptance length over the last third of each phase (pooled: tokens emitted on draft steps / draft
steps), per system, from a bench drift jsonl; also tok/s over the stream and exactness against plain.
Usage: python bench_results/s12/last_third.py DRIFT.jsonl"""
import json, sys
from collections import defaultdict
rows = [json.loads(l) for l in open(sys.argv[1])]
phases = list(dict.fromkeys(r["phase"] for r in rows))
systems = list(dict.fromkeys(r["system"] for r in rows))
n = max(r["index_in_phase"] for r in rows) + 1
lo = n - n // 3
mal = defaultdict(lambda: [0, 0])
tps = defaultdict(lambda: [0, 0.0])
for r in rows:
    tps[r["system"]][0] += r["tokens"]; tps[r["system"]][1] += r["seconds"]
    if r["index_in_phase"] >= lo:
        m = mal[(r["system"], r["phase"])]
        m[0] += r["emitted_on_draft_steps"] or 0; m[1] += r["draft_steps"] or 0
print(f"last third = requests {lo}..{n - 1} of each phase")
print("| system | " + " | ".join(phases) + " | tok/s (stream) |")
print("|---|" + "---|" * (len(phases) + 1))
for s in systems:
    cells = [f"{mal[(s, p)][0] / mal[(s, p)][1]:.2f}" if mal[(s, p)][1] else "-" for p in phases]
    print(f"| {s} | " + " | ".join(cells) + f" | {tps[s][0] / tps[s][1]:.1f} |")
if "static-fixed" in systems and "learned-fixed" in systems:
    print("learned/static:", ", ".join(f"{p} {mal[('learned-fixed', p)][0] / mal[('learned-fixed', p)][1] / (mal[('static-fixed', p)][0] / mal[('static-fixed', p)][1]):.3f}x" for p in phases))
ex = defaultdict(lambda: [0, 0])
for r in rows:
    if r.get("matches_plain") is not None:
        ex[r["system"]][0] += bool(r["matches_plain"]); ex[r["system"]][1] += 1
print("matches plain:", {s: f"{a}/{b}" for s, (a, b) in ex.items()})
