#!/bin/sh
# Demo producer for docker-compose.yml: every DEMO_PAUSE_SECONDS, publish DEMO_BATCH bank
# requests to each queue of DEMO_QUEUES with `txq submit --wait` (persistent, confirmed,
# replies collected) and print the batch's summary. Most requests are good transfers;
# about 1 in 100 moves money to the same account (rejected: same_account) and 1 in 100
# has an unknown type (failed, dead-lettered), so every outcome shows on the dashboard.
set -eu

batch=${DEMO_BATCH:-100}
pause=${DEMO_PAUSE_SECONDS:-2}
queues=${DEMO_QUEUES:-txq.requests}
# message_ids must differ between runs of this container, or the inbox would answer
# the second run's requests as duplicates of the first's.
run=$(date +%s)
n=0

# One JSON line per request, in `txq submit`'s {"type", "payload", "message_id"} form.
requests() { # batch-number queue-index
  # mawk (Debian's awk) repeats itself with seeds above 2^31.
  seed=$(((run + $1 * 7919 + $2 * 104729) % 2147483647))
  awk -v batch="$batch" -v id="d$run-$2-$1" -v seed="$seed" 'BEGIN {
    srand(seed)
    for (i = 1; i <= batch; i++) {
      r = rand() * 100
      from = 1 + int(rand() * 1000); to = 1 + int(rand() * 1000); amount = 1 + int(rand() * 100)
      if (r < 1) {
        type = "transfer"; payload = sprintf("{\"from\":%d,\"to\":%d,\"amount\":%d}", from, from, amount)
      } else if (r < 2) {
        type = "refund"; payload = sprintf("{\"id\":%d}", from)
      } else if (r < 7) {
        type = "balance"; payload = sprintf("{\"id\":%d}", from)
      } else if (r < 10) {
        type = "noop"; payload = "{}"
      } else {
        if (to == from) to = from % 1000 + 1
        type = "transfer"; payload = sprintf("{\"from\":%d,\"to\":%d,\"amount\":%d}", from, to, amount)
      }
      printf "{\"type\":\"%s\",\"payload\":%s,\"message_id\":\"%s-%d\"}\n", type, payload, id, i
    }
  }'
}

echo "producer: $batch requests every ${pause}s to each of: $queues"
while :; do
  n=$((n + 1))
  q=0
  for queue in $queues; do
    q=$((q + 1))
    # A non-zero exit only says that some request did not end ok, which the bad ones
    # are meant to do; the summary on stderr says how many of each.
    requests "$n" "$q" | txq submit --queue "$queue" --wait - >/dev/null ||
      echo "producer: batch $n to $queue: not all ok (expected: some are bad on purpose)"
  done
  sleep "$pause"
done
