"""One-token decode ms at several depths; saves the last logits of each depth (for bitwise checks)."""
import sys, time, torch, random
torch.set_num_threads(1)
from adaspec.target import load_target
t = load_target("smollm2-135m-instruct", dtype="int8", max_model_len=8192, runtime="lean")
out = {}
for ctx in [int(c) for c in sys.argv[1].split(",")]:
    n = int(sys.argv[2])
    g = random.Random(ctx)
    ids = [g.randrange(1000, 40000) for _ in range(ctx + 1)]
    kv = t.new_cache()
    for i in range(0, ctx, 256):
        t.forward(kv, ids[i:min(ctx, i + 256)])
    ts = []
    for _ in range(n):
        t0 = time.perf_counter(); o = t.forward(kv, ids[ctx:ctx + 1]); ts.append(time.perf_counter() - t0); kv.truncate(ctx)
    ts.sort(); out[ctx] = o.logits.clone()
    print(f"{sys.argv[3]} kv={t.decoder.pool.keys.dtype} ctx={ctx} median {ts[len(ts)//2]*1e3:.2f} ms", flush=True)
    kv.release()
torch.save(out, f"/tmp/s11/logits_{sys.argv[3]}.pt")
