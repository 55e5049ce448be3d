#!/usr/bin/env bash
# Run the README's two commands from a fresh clone, as a new user would: a new folder with a
# link to ../shared beside the clone, a new virtual environment, an empty model cache.
# Writes benchmarks/results/fresh_clone_cpu.md (exit codes, wall times, the tests' closing line).
set -uo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
git clone -q "$repo" "$work/repo"
ln -s "$(cd "$repo/../shared" && pwd)" "$work/shared"
cd "$work/repo"
export NOVA_CACHE_DIR="$work/cache"
blocks() { sed -n '/^```/,/^```/p' README.md | grep -v '^```'; }
cmd1=$(blocks | sed -n 1p)
cmd2=$(blocks | sed -n 2p)
t0=$(date +%s); bash -c "$cmd1" > "$work/cmd1.log" 2>&1; rc1=$?; t1=$(date +%s)
bash -c "$cmd2" > "$work/cmd2.log" 2>&1; rc2=$?; t2=$(date +%s)
out="$repo/benchmarks/results/fresh_clone_cpu.md"
{
  echo "# README commands from a fresh clone"
  echo
  echo "Machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores; $(date -u +%F)"
  echo
  echo "| command | exit code | wall s |"
  echo "|---|---:|---:|"
  echo "| \`$cmd1\` | $rc1 | $((t1 - t0)) |"
  echo "| \`$cmd2\` | $rc2 | $((t2 - t1)) |"
  echo
  echo "Demo's own lines (setup, model ready, burst done):"; echo; echo '```'
  grep -E "^setup: ready|ready in|all done in|^  answer: The capital" "$work/cmd1.log"; echo '```'
  echo; echo "Tests' closing line:"; echo; echo '```'; tail -1 "$work/cmd2.log"; echo '```'
} > "$out"
cat "$out"
if [ "$rc1" = 0 ] && [ "$rc2" = 0 ]; then
  rm -rf "$work"  # a clone with its venv and caches is ~3.6 GB: runs had filled the disk
else
  echo "logs and the clone kept in $work" >&2
  exit 1
fi
