#!/bin/bash
# alternate before/after, plain and atlas: wall s and peak RSS MB of `generate --max-tokens 1`
cd /work/main
for r in 1 2 3; do
  for tree in /tmp/wt-before /work/main; do
    for s in none atlas; do
      out=$( { PYTHONPATH=$tree/src /usr/bin/time -f "%e %M" .venv/bin/python -m adaspec.cli generate --max-tokens 1 --speculator $s --prompt Hi >/dev/null 2>/tmp/adaspec-startup.err; } 2>&1; tail -1 /tmp/adaspec-startup.err)
      echo "$r $(basename $tree) $s $out"
    done
  done
done
