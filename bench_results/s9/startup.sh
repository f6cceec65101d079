#!/bin/sh
# adaspec generate --max-tokens 1 (default speculator atlas, --threads auto), wall s and peak RSS,
# before (bfae3cf, worktree at /tmp/oldtree) and after, alternated; both trees use this checkout's .venv.
for i in 1 2; do
  for tree in /tmp/oldtree /work/main; do
    ( cd $tree && PYTHONPATH=$tree/src /usr/bin/time -f "$tree %e s %M KB" /work/main/.venv/bin/python -m adaspec.cli generate --max-tokens 1 --prompt Hi 2>&1 | grep ' KB$' )
  done
done
