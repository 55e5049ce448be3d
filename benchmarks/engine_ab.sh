#!/bin/bash
# A/B of the engine across two commits: benchmarks/engine_latency.py from a worktree of each,
# alternating processes (A B A B ...), so both see the same machine and minutes.
#   bash benchmarks/engine_ab.sh BEFORE_COMMIT AFTER_COMMIT OUT_DIR ROUNDS [engine_latency args...]
# e.g. bash benchmarks/engine_ab.sh 934e1f9 53fcc87 /tmp/ab 2 --dtype bfloat16 \
#        --policies "chunked_prefill[budget=2048]" sequential --skip-transformers --skip-one-at-a-time
# Results: OUT_DIR/engine_cpu_ab_{before,after}_r{N}.{md,json}.
set -euo pipefail
before=$1 after=$2 out=$3 rounds=$4
shift 4
repo=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-$repo/.venv/bin/python}
work=$(mktemp -d)
trap 'git -C "$repo" worktree remove --force "$work/before"; git -C "$repo" worktree remove --force "$work/after"' EXIT
git -C "$repo" worktree add -q --detach "$work/before" "$before"
git -C "$repo" worktree add -q --detach "$work/after" "$after"
mkdir -p "$out"
for ((round = 0; round < rounds; round++)); do
  for side in before after; do
    (cd "$work/$side" && PYTHONPATH="$work/$side" "$python" benchmarks/engine_latency.py "$@" \
      --tag "ab_${side}_r${round}" --out "$out")
  done
done
