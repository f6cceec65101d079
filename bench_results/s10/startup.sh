#!/bin/sh
# adaspec generate --max-tokens 1 --prompt Hi, wall s and peak RSS, before (8b0ef28, worktree at
# /tmp/oldtree: git worktree add /tmp/oldtree 8b0ef28) and after (this checkout), plain and atlas,
# alternated; both trees use this checkout's .venv. Second run after set-up (caches written).
for i in 1 2 3; do
  for spec in none atlas; do
    for tree in /tmp/oldtree /work/main; do
      ( cd $tree && PYTHONPATH=$tree/src /usr/bin/time -f "$tree $spec %e s %M KB" /work/main/.venv/bin/python -m adaspec.cli generate --max-tokens 1 --speculator $spec --prompt Hi 2>&1 | grep ' KB$' )
    done
  done
done
