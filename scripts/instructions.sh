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
echo "| variant | instructions a job | start-up and $SMALL jobs |"
echo "|---|---|---|"
# One variant an invocation, so each profile is named by its variant.
for v in ${VARIANTS//,/ }; do
  for n in "$SMALL" "$LARGE"; do
    BENCH_WORKER_WRAP="valgrind --tool=callgrind --callgrind-out-file=$OUT/$v.$n" \
      ./target/release/examples/bench --database-url "$DB" --variants "$v" \
      --workload "$WORKLOAD" --runs 1 --jobs "$n" >/dev/null
  done
  small=$(awk '/^summary:/ { print $2 }' "$OUT/$v.$SMALL")
  large=$(awk '/^summary:/ { print $2 }' "$OUT/$v.$LARGE")
  awk -v v="$v" -v s="$small" -v l="$large" -v n="$((LARGE - SMALL))" \
    'BEGIN { printf "| %s | %.1fk | %.0fM |\n", v, (l - s) / n / 1000, s / 1e6 }'
done
