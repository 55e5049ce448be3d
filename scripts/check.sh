#!/usr/bin/env bash
# The code checks, run by .ci/run before the tests and by the pre-commit hooks:
# ruff (format and lint, 100 columns), mypy (strict on the torch-free core), import contracts.
# Each prints what it found and the script stops at the first that fails.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${NOVA_CHECK_BIN:-.venv/bin}
echo "check: ruff format" && "$BIN/ruff" format --check --quiet .
echo "check: ruff lint" && "$BIN/ruff" check --quiet .
echo "check: mypy" && "$BIN/mypy" --no-error-summary
echo "check: import contracts"
if ! out=$("$BIN/lint-imports" --no-cache 2>&1); then
  echo "$out" | sed -n '/Contracts:/,$p'
  exit 1
fi
echo "$out" | grep "Contracts:"
echo "check: all passed"
