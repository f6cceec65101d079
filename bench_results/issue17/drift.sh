#!/usr/bin/env bash
# Issue 17: vLLM's systems beside this engine's on a drift stream (float32: vLLM's CPU precision here).
# Needs `make vllm` (or ADASPEC_VLLM_PYTHON pointing at a vLLM environment's python).
# Each vLLM engine holds ~3.5 GB here (1 GiB of it KV cache), and every system of a drift run stays
# up for the whole run, so the run is split in two to fit a 24 GB machine beside other work.
set -euo pipefail
adaspec bench drift --dtype float32 --phases sql,tools --phase-length 12 --skip 4 --max-tokens 64 --threads 1 \
  --systems plain,suffix,vllm-plain,vllm-ngram,vllm-adaspec-suffix \
  --out bench_results/issue17/drift --no-progress
adaspec bench drift --dtype float32 --phases sql,tools --phase-length 12 --skip 4 --max-tokens 64 --threads 1 \
  --systems plain,atlas,vllm-plain,vllm-suffix,vllm-adaspec-atlas \
  --out bench_results/issue17/drift2 --no-progress
