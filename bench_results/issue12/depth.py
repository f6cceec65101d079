"""One-token decoding at depth D: this engine (lean int8) vs llama.cpp (llama-cpp-python, Q4_1), 1 thread, interleaved."""
import sys, time, statistics
import torch
threads = int(sys.argv[1]) if len(sys.argv) > 1 else 1
depth = int(sys.argv[2]) if len(sys.argv) > 2 else 4096
torch.set_num_threads(threads)
from adaspec.target import load_target
from adaspec.bench.engines import default_gguf
import llama_cpp
t = load_target("smollm2-135m-instruct", dtype="int8")
ids = [(17 * i + 5) % 49000 + 100 for i in range(depth)]
llm = llama_cpp.Llama(model_path=default_gguf("smollm2-135m-instruct"), n_threads=threads, n_threads_batch=threads,
                      n_ctx=depth + 64, verbose=False, seed=0)
kv = t.new_cache(); t.forward(kv, ids, last_only=True)
llm.reset(); llm.eval(ids)
ours, theirs = [], []
for r in range(12):
    tok = [(31 * r + 7) % 49000 + 100]
    t0 = time.perf_counter(); t.forward(kv, tok); ours.append((time.perf_counter() - t0) * 1e3); t.truncate(kv, depth)
    t0 = time.perf_counter(); llm.eval(tok); theirs.append((time.perf_counter() - t0) * 1e3)
    llm.n_tokens = depth; llm._ctx.kv_cache_seq_rm(-1, depth, -1)
print(f"depth {depth}, {threads} thread(s): ours {statistics.median(ours[2:]):.2f} ms, llama.cpp {statistics.median(theirs[2:]):.2f} ms per 1-token decode")
