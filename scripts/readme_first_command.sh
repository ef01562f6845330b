#!/usr/bin/env bash
# Run README's first command exactly as printed (it is read from README.md), time it, and
# check that it wrote its report and nothing tracked. Its own exit code is 0 (every verdict
# PASS) or 1 (a verdict FAIL, a measured result README explains); anything else is an error.
set -euo pipefail
cd "$(dirname "$0")/.."
command=$(awk '/^```bash/ {inside=1; next} /^```/ {exit} inside && !/^ *#/ && NF {print; exit}' README.md)
echo "README's first command: $command"
start=$(date +%s)
set +e
bash -c "$command"
code=$?
set -e
echo "README's first command: exit $code after $(( $(date +%s) - start )) s on $(nproc) cores"
if [ "$code" -gt 1 ]; then
    exit "$code"
fi
report=$(ls -d sageserve-reports/*-quick | tail -1)
test -s "$report/report.json" && test -s "$report/report.md"
if [ -n "$(git status --porcelain --untracked-files=normal)" ]; then
    echo "README's first command changed files git tracks or does not ignore:" >&2
    git status --porcelain >&2
    exit 1
fi
