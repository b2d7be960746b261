#!/usr/bin/env bash
# Runs every fuzz target in the module for the given time each, and prints
# the executions per target. New crashers land in testdata/fuzz of the
# package, where they stay as seeds once fixed.
set -euo pipefail
cd "$(dirname "$0")/.."
fuzztime=${1:-30s}
printf '%-12s %-28s %s\n' package target executions
grep -rl --include='*_test.go' '^func Fuzz' . | sort | while read -r file; do
	pkg=./$(dirname "${file#./}")
	for target in $(grep -oE '^func Fuzz[A-Za-z0-9_]+' "$file" | cut -d' ' -f2); do
		# Minimising a new input can stall the fuzzer for a minute; a short
		# bound keeps the time spent on finding, not on shrinking.
		out=$(go test -run '^$' -fuzz "^${target}\$" -fuzztime "$fuzztime" -fuzzminimizetime 3s "$pkg" 2>&1) || {
			echo "$out" | tail -n 30
			echo "fuzz: $target in $pkg failed" >&2
			exit 1
		}
		execs=$(echo "$out" | grep -oE 'execs: [0-9]+' | tail -n 1 | cut -d' ' -f2)
		printf '%-12s %-28s %s\n' "${pkg#./}" "$target" "${execs:-?}"
	done
done
