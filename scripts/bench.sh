#!/usr/bin/env bash
# Runs the benchmark matrix of BENCHMARKS.md (release build, MariaDB, transfer
# unless noted) and appends every result to bench/results.jsonl; the markdown
# tables go to bench/*.md. Takes about 30 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --bins --examples
B=./target/release/examples/bench
DB=${TXQ_BENCH_DB:-mysql://root@127.0.0.1:3306/test}
mkdir -p bench
run() { # name, args...
  local name=$1; shift
  echo "== $name" >&2
  "$B" --database-url "$DB" --json bench/results.jsonl --label "$name" "$@" > "bench/$name.md"
}
run headline
run noop --workload noop
for c in 1 4 64; do run "concurrency-$c" --concurrency "$c" --variants txq,bare --runs 1 --jobs 5000; done
run depth-200k --variants txq --runs 1 --jobs 200000
run payload-64k --variants txq,bare --runs 1 --jobs 5000 --payload-bytes 65536 --workload noop
run payload-100b --variants txq,bare --runs 1 --jobs 5000 --payload-bytes 100 --workload noop
run inbox-off --variants txq --no-inbox
run depth-20k --variants txq --runs 1 --jobs 20000
# p50/p99 request-to-reply at 50% and 90% of bare's sustained maximum (~12 min).
run latency --latency --variants bare,txq,ops
# The other backends, one run each.
DB=${TXQ_BENCH_PG:-postgres://postgres@127.0.0.1:5432/test} run postgres --variants txq,bare,ops --runs 1 --jobs 10000
DB=sqlite:///tmp/txq-bench.db run sqlite --variants txq,bare,ops --runs 1 --jobs 10000
