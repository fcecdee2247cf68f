#!/usr/bin/env bash
# User-space instructions a job, per variant, counted by callgrind: a figure a
# noisy host does not move (BENCHMARKS.md, round 7). Each variant's worker runs
# under valgrind twice, on SMALL and on LARGE pre-loaded requests; the difference
# over LARGE - SMALL jobs leaves out start-up and shutdown. Kernel time (system
# calls, wake-ups) is not in it: `perf stat` measures that.
#
#   scripts/instructions.sh [database-url] [variants] [workload]
#   scripts/instructions.sh postgres://postgres@127.0.0.1:5432/test txq,bare-inbox,ops
#
# Needs valgrind and a release build (cargo build --release --bins --examples).
# Takes about a minute per 1,000 jobs and variant.
set -euo pipefail
cd "$(dirname "$0")/.."
DB=${1:-mysql://root@127.0.0.1:3306/test}
VARIANTS=${2:-bare,bare-inbox,txq}
WORKLOAD=${3:-transfer}
SMALL=${SMALL:-1000}
LARGE=${LARGE:-3000}
command -v valgrind >/dev/null || { echo "valgrind is not installed (apt-get install valgrind)" >&2; exit 1; }
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
for n in "$SMALL" "$LARGE"; do
  BENCH_WORKER_WRAP="valgrind --tool=callgrind --callgrind-out-file=$OUT/cg.$n.%p" \
    ./target/release/examples/bench --database-url "$DB" --variants "$VARIANTS" \
    --workload "$WORKLOAD" --runs 1 --jobs "$n" >/dev/null
done
# Each profile names its command; the variant follows from it.
for f in "$OUT"/cg.*; do
  n=$(basename "$f" | cut -d. -f2)
  awk -v n="$n" '
    /^cmd:/ {
      v = "?"
      if ($0 ~ / run --ops/) v = "ops"
      else if ($0 ~ /examples\/bank/) v = "txq"
      else if ($0 ~ /--mode inbox --reply txq/) v = "bare-contract"
      else if ($0 ~ /--mode inbox/) v = "bare-inbox"
      else if ($0 ~ /--mode full/) v = "bare"
      else if ($0 ~ /--mode broker/) v = "broker"
    }
    /^summary:/ { print v, n, $2 }' "$f"
done | sort | awk -v small="$SMALL" -v large="$LARGE" '
  { total[$1, $2] = $3; seen[$1] = 1 }
  END {
    printf "| variant | instructions a job | start-up and %d jobs |\n|---|---|---|\n", small
    for (v in seen)
      printf "| %s | %.1fk | %.0fM |\n", v,
        (total[v, large] - total[v, small]) / (large - small) / 1000, total[v, small] / 1e6
  }'
