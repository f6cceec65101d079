#!/bin/sh
# adaspec generate --max-tokens 1 --prompt Hi: wall seconds and peak RSS (KB), plain and atlas, N rounds
# (default 5), second run after set-up (int8 model, cost tables and thread timings cached).
# Usage: bench_results/s13/startup.sh [N] [TREE]   (TREE: a checkout, default this one)
N=${1:-5}; TREE=${2:-$(pwd)}
for i in $(seq "$N"); do
  for spec in none atlas; do
    ( cd "$TREE" && PYTHONPATH="$TREE/src" /usr/bin/time -f "$spec %e s %M KB" "$TREE/.venv/bin/python" -m adaspec.cli generate \
        --max-tokens 1 --speculator $spec --prompt Hi 2>&1 | grep ' KB$' )
  done
done
