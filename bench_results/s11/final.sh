#!/bin/bash
# Session 11 (Zen 1 EPYC): one-token decode at depth, base (e1067ee, float32 K/V) vs this session's kernel with
# float32 and float16 K/V, interleaved, 2 rounds; then bench step-cost base vs new. Base is a git worktree at /tmp/base.
cd /work/main
for r in 1 2; do
  (cd /tmp/base && PYTHONPATH=/tmp/base/src /work/main/.venv/bin/python /work/main/bench_results/s11/decode_depth.py 128,1024,4096 30 base 2>&1 | grep median)
  ADASPEC_KV_DTYPE=float32 PYTHONPATH=src .venv/bin/python bench_results/s11/decode_depth.py 128,1024,4096 30 new32 2>&1 | grep median
  ADASPEC_KV_DTYPE=float16 PYTHONPATH=src .venv/bin/python bench_results/s11/decode_depth.py 128,1024,4096 30 new16 2>&1 | grep median
done
(cd /tmp/base && PYTHONPATH=/tmp/base/src /work/main/.venv/bin/adaspec bench step-cost --dtypes int8 --runtimes lean --contexts 128,4096 --max-k 8 --repeats 3 --threads 1 --out /work/main/bench_results/s11/step_cost_base_t1.md > /dev/null 2>&1)
PYTHONPATH=src .venv/bin/adaspec bench step-cost --dtypes int8 --runtimes lean --contexts 128,4096 --max-k 8 --repeats 3 --threads 1 --out bench_results/s11/step_cost_new_t1.md > /dev/null 2>&1
