#!/bin/sh
# Start-up before (the checkout in $1, default /tmp/wt: git worktree add /tmp/wt 0612915) and after
# (this checkout), alternated, N rounds (default 5): `generate --max-tokens 1 --prompt Hi`, wall s and
# peak RSS (KB = KiB), plain and atlas. Both trees run with this checkout's .venv; each tree's console
# entry point as `python -m adaspec.cli` runs it. Second run after set-up: run it twice, read the second.
OLD=${1:-/tmp/wt}; N=${2:-5}; NEW=$(pwd)
for i in $(seq "$N"); do
  for spec in none atlas; do
    for tree in "$OLD" "$NEW"; do
      ( cd "$tree" && PYTHONPATH="$tree/src" /usr/bin/time -f "$tree $spec %e s %M KB" "$NEW/.venv/bin/python" \
          -m adaspec.cli generate --max-tokens 1 --speculator $spec --prompt Hi 2>&1 | grep ' KB$' )
    done
  done
done
