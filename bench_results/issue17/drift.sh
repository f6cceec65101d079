#!/usr/bin/env bash
# Issue 17: vLLM's systems beside this engine's on a drift stream (float32: vLLM's CPU precision here).
# Needs `make vllm` (or ADASPEC_VLLM_PYTHON pointing at a vLLM environment's python).
set -euo pipefail
adaspec bench drift --dtype float32 --phases sql,tools --phase-length 12 --skip 4 --max-tokens 64 --threads 1 \
  --systems plain,suffix,atlas,vllm-plain,vllm-ngram,vllm-suffix,vllm-adaspec-suffix,vllm-adaspec-atlas \
  --out bench_results/issue17/drift --no-progress
