// Checks every PromQL expression of a Grafana dashboard with Prometheus's own Lezer
// grammar (@prometheus-io/lezer-promql): it parses, it names only metrics txq (or
// RabbitMQ, or Prometheus) exports, with labels and label values those metrics have,
// and every metric of txq's contract is on the dashboard. Also writes the expressions
// as a rules file so promtool can parse them a second time.
//   node promql.mjs DASHBOARD.json RULES_OUT.yml
import { readFileSync, writeFileSync } from "node:fs";
import { parser } from "@prometheus-io/lezer-promql";

// txq's metrics (issue 7) with their labels and, where fixed, the label values.
const TARGET = ["instance", "job", "database"]; // added by Prometheus / the scrape config
const METRICS = {
  txq_jobs_total: { type: null, outcome: ["ok", "rejected", "failed", "duplicate"] },
  txq_job_duration_seconds_bucket: { type: null, le: null },
  txq_job_duration_seconds_sum: { type: null },
  txq_job_duration_seconds_count: { type: null },
  txq_jobs_in_flight: {},
  txq_concurrency_limit: {},
  txq_retries_total: { type: null, kind: null },
  txq_dead_lettered_total: { type: null, kind: null },
  txq_duplicates_total: {},
  txq_replies_returned_total: {},
  txq_broker_reconnects_total: {},
  txq_db_pool_connections: { state: ["idle", "in_use", "max"] },
  txq_db_transaction_retries_total: { reason: null },
  txq_batches_open: {},
  txq_batch_completions_total: { kind: null },
  txq_batch_completions_published_total: { route: null },
  txq_batch_callbacks_total: { result: null },
  txq_batch_duration_seconds_bucket: { le: null },
  txq_batch_duration_seconds_sum: {},
  txq_batch_duration_seconds_count: {},
  // RabbitMQ's rabbitmq_prometheus plugin, /metrics/detailed?family=queue_coarse_metrics
  rabbitmq_detailed_queue_messages_ready: { queue: null, vhost: null },
  rabbitmq_detailed_queue_messages_unacked: { queue: null, vhost: null },
};
// Every metric of the contract must be shown somewhere (the histogram through _bucket).
const REQUIRED = Object.keys(METRICS).filter(
  (m) => m.startsWith("txq_") && !/_seconds_(sum|count)$/.test(m),
);

// Grafana's variables, replaced by values of the same shape before parsing.
const substitute = (e) =>
  e
    .replace(/\$__rate_interval|\$__interval|\$__range/g, "1m")
    .replace(/\$\{?(instance|type)\}?/g, ".*");

const [dashboardPath, rulesPath] = process.argv.slice(2);
const dashboard = JSON.parse(readFileSync(dashboardPath, "utf8"));
const panels = (dashboard.panels ?? []).flatMap((p) => [p, ...(p.panels ?? [])]);
const problems = [];
const used = new Set();
const exprs = [];

for (const panel of panels) {
  for (const t of panel.targets ?? []) {
    if (!t.expr) continue;
    const where = `panel "${panel.title}" ${t.refId}`;
    const expr = substitute(t.expr);
    exprs.push({ where, expr });
    const tree = parser.parse(expr);
    const metricsIn = new Map(); // node position -> metric names below it
    tree.iterate({
      enter(n) {
        if (n.type.isError) problems.push(`${where}: syntax error at ${n.from}: ${t.expr}`);
      },
    });
    // Vector selectors: metric name, matchers.
    const cursor = tree.cursor();
    const selectors = [];
    do {
      if (cursor.name === "VectorSelector") {
        const node = cursor.node;
        const id = node.getChild("Identifier");
        const name = id ? expr.slice(id.from, id.to) : null;
        const matchers = [];
        const lm = node.getChild("LabelMatchers");
        if (lm) {
          for (const m of lm.getChildren("UnquotedLabelMatcher")) {
            const ln = m.getChild("LabelName");
            const op = m.getChild("MatchOp");
            const val = m.getChild("StringLiteral");
            matchers.push({
              label: expr.slice(ln.from, ln.to),
              op: expr.slice(op.from, op.to),
              value: JSON.parse(expr.slice(val.from, val.to).replace(/^'|'$/g, '"')),
            });
          }
        }
        selectors.push({ name, matchers, from: node.from, to: node.to });
      }
    } while (cursor.next());
    for (const s of selectors) {
      if (!s.name || !(s.name in METRICS)) {
        problems.push(`${where}: unknown metric ${s.name}`);
        continue;
      }
      used.add(s.name);
      const labels = METRICS[s.name];
      for (const m of s.matchers) {
        if (!(m.label in labels) && !TARGET.includes(m.label)) {
          problems.push(`${where}: ${s.name} has no label ${m.label}`);
        } else if (labels[m.label] && (m.op === "=" || m.op === "!=") && !labels[m.label].includes(m.value)) {
          problems.push(`${where}: ${s.name}{${m.label}} is never "${m.value}"`);
        }
      }
    }
    // Grouping labels (by/without) must exist on a metric inside the aggregation.
    const c2 = tree.cursor();
    do {
      if (c2.name === "GroupingLabels" && c2.node.parent?.name === "AggregateModifier") {
        const agg = c2.node.parent.parent;
        const inside = selectors.filter((s) => s.from >= agg.from && s.to <= agg.to && s.name in METRICS);
        for (const ln of c2.node.getChildren("LabelName")) {
          const label = expr.slice(ln.from, ln.to);
          const ok = TARGET.includes(label) || inside.some((s) => label in METRICS[s.name]);
          if (!ok) problems.push(`${where}: grouping by ${label}, which no metric inside has`);
        }
      }
    } while (c2.next());
  }
}

for (const m of REQUIRED) if (!used.has(m)) problems.push(`dashboard does not show ${m}`);
const quantiles = new Set(
  exprs.flatMap(({ expr }) => [...expr.matchAll(/histogram_quantile\(\s*([0-9.]+)/g)].map((x) => x[1])),
);
for (const q of ["0.5", "0.95", "0.99"]) if (!quantiles.has(q)) problems.push(`no p${q.slice(2).padEnd(2, "0")} latency`);

// One recording rule per expression: `promtool check rules` parses each with Prometheus.
const rules = exprs
  .map(({ expr }, i) => `      - record: dashboard:expr_${i}\n        expr: ${JSON.stringify(expr)}`)
  .join("\n");
writeFileSync(rulesPath, `groups:\n  - name: dashboard\n    rules:\n${rules}\n`);

for (const p of problems) console.error(`  ${p}`);
console.log(`${exprs.length} expressions in ${panels.length} panels; metrics used: ${used.size}; problems: ${problems.length}`);
process.exit(problems.length ? 1 : 0);
