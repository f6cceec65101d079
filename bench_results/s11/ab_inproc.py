"""One-token decode at depth: float16 and float32 K/V pools in one process, alternated per forward."""
import sys, time, torch, random
torch.set_num_threads(1)
from adaspec.target import load_target
from adaspec.model.kv import BlockPool
t = load_target("smollm2-135m-instruct", dtype="int8", max_model_len=8192, runtime="lean")
dec = t.decoder
ctx, n = int(sys.argv[1]), int(sys.argv[2])
pools, caches = {}, {}
g = random.Random(0)
ids = [g.randrange(1000, 40000) for _ in range(ctx + 1)]
for dt in (torch.float16, torch.float32):
    p0 = dec.pool
    pools[dt] = BlockPool(dec.num_layers, dec.num_kv_heads, dec.head_dim, -(-(ctx + 64) // 64), 64, dt)
    dec.pool = pools[dt]
    kv = dec.new_cache()
    for i in range(0, ctx, 512):
        t.forward(kv, ids[i:min(ctx, i + 512)])
    caches[dt] = kv
ts = {dt: [] for dt in pools}
for it in range(n):
    for dt in (pools if it % 2 == 0 else list(pools)[::-1]):
        dec.pool = pools[dt]
        t0 = time.perf_counter(); t.forward(caches[dt], ids[ctx:ctx + 1]); ts[dt].append(time.perf_counter() - t0)
        caches[dt].truncate(ctx)
for dt, v in ts.items():
    v.sort()
    print(f"{sys.argv[3]} {dt} ctx={ctx} median {v[len(v)//2]*1e3:.2f} ms min {v[0]*1e3:.2f} p25 {v[len(v)//4]*1e3:.2f}")
