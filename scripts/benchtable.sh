#!/usr/bin/env bash
# Prints `go test -bench` output as a small table: one row per benchmark,
# one column per unit it reported.
set -euo pipefail
awk '
/^Benchmark/ {
	name = $1; sub(/-[0-9]+$/, "", name)
	row = sprintf("%-36s", name)
	for (i = 3; i < NF; i += 2) row = row sprintf("  %10s %s", $i, $(i+1))
	print row
}' "$1"
