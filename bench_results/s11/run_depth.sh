#!/bin/bash
# interleaved: base (HEAD before this change, fp32 K/V), new kernel fp32 K/V, new kernel fp16 K/V
cd /work/main
for r in 1 2 3; do
  (cd /tmp/base && PYTHONPATH=/tmp/base/src /work/main/.venv/bin/python /tmp/s11/decode_depth.py 128,1024,4096 30 base 2>&1 | grep median)
  ADASPEC_KV_DTYPE=float32 PYTHONPATH=src .venv/bin/python /tmp/s11/decode_depth.py 128,1024,4096 30 new32 2>&1 | grep median
  ADASPEC_KV_DTYPE=float16 PYTHONPATH=src .venv/bin/python /tmp/s11/decode_depth.py 128,1024,4096 30 new16 2>&1 | grep median
done
