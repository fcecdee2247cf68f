//! `txq submit`, run as the real binary against the real broker and a worker
//! running in this process.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;

use lapin::types::{AMQPValue, FieldTable};
use serde::Deserialize;
use serde_json::{Value, json};
use txq::{Backend, Handler, JobError, JobMeta, Tx, Worker};

use crate::bank;
use crate::support::{
    Client, RunningWorker, TEST_DELAYS, TestDb, amqp_url, bank_env, config, unique,
};

/// A scratch directory of one test, removed pass or fail.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Scratch {
        let dir = std::env::temp_dir().join(unique("submit"));
        std::fs::create_dir_all(&dir).expect("scratch dir");
        Scratch(dir)
    }

    /// Writes `lines` as a JSON-lines file and returns its path.
    fn file(&self, name: &str, lines: &[Value]) -> PathBuf {
        let path = self.0.join(name);
        let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
        std::fs::write(&path, text).expect("write input");
        path
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// How one `txq submit` run ended.
#[derive(Debug)]
struct Run {
    code: i32,
    /// The records on stdout (or read back from `--output`).
    records: Vec<Value>,
    /// The `--json` summary: the object of the last stdout line
    /// `{"summary":…}`, or that line itself if it is `{"error":…}`.
    summary: Value,
    stdout: String,
    stderr: String,
}

impl Run {
    fn lines(&self) -> Vec<u64> {
        self.records
            .iter()
            .map(|r| r["line"].as_u64().expect("line"))
            .collect()
    }

    fn statuses(&self) -> HashMap<u64, String> {
        self.records
            .iter()
            .map(|r| {
                let line = r["line"].as_u64().expect("line");
                (line, r["status"].as_str().expect("status").to_owned())
            })
            .collect()
    }
}

/// Runs `txq submit --json ARGS` with the worker's queues from `TXQ_*` variables.
async fn submit(requests: &str, replies: &str, args: &[&str]) -> Run {
    submit_with(&amqp_url(), requests, replies, args).await
}

/// `txq submit --json ARGS` configured by `TXQ_*` variables as the test worker is.
fn submit_command(
    amqp: &str,
    requests: &str,
    replies: &str,
    args: &[&str],
) -> tokio::process::Command {
    let delays: Vec<String> = TEST_DELAYS
        .iter()
        .map(|d| format!("\"{}ms\"", d.as_millis()))
        .collect();
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_txq"));
    command
        .arg("submit")
        .arg("--json")
        .args(args)
        .env_remove("TXQ_CONFIG")
        .env("TXQ_AMQP_URL", amqp)
        .env("TXQ_QUEUE", requests)
        .env("TXQ_REPLY_QUEUE", replies)
        .env("TXQ_RETRY__DELAYS", format!("[{}]", delays.join(",")))
        .env("RUST_LOG", "warn")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    command
}

async fn submit_with(amqp: &str, requests: &str, replies: &str, args: &[&str]) -> Run {
    let out = submit_command(amqp, requests, replies, args)
        .output()
        .await
        .expect("running txq submit");
    let stdout = String::from_utf8(out.stdout).expect("UTF-8 stdout");
    let stderr = String::from_utf8(out.stderr).expect("UTF-8 stderr");
    let (records, summary) = split_json_output(&stdout);
    Run {
        code: out.status.code().expect("exited, not killed"),
        records,
        summary,
        stdout,
        stderr,
    }
}

/// `--json`'s stdout: every line JSON; the records, then one last line
/// `{"summary":…}` or `{"error":…}` (its object, or `Null` if there is none).
fn split_json_output(stdout: &str) -> (Vec<Value>, Value) {
    let mut records: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l:?}: {e}")))
        .collect();
    let last = records
        .last()
        .and_then(|l| match (l.get("summary"), l.get("error")) {
            (Some(summary), None) => Some(summary.clone()),
            (None, Some(_)) => Some(l.clone()),
            _ => None,
        });
    if last.is_some() {
        records.pop();
    }
    for r in &records {
        assert!(
            r.get("summary").is_none() && r.get("error").is_none(),
            "a summary or error before the last line: {stdout}"
        );
    }
    (records, last.unwrap_or(Value::Null))
}

/// Until the worker consumes `queue` (it starts to in the background).
async fn wait_for_a_consumer(client: &Client, queue: &str) {
    crate::support::eventually("a consumer on the request queue", || async {
        let declared = client
            .channel
            .queue_declare(
                queue.into(),
                lapin::options::QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("passive declare");
        (declared.consumer_count() > 0).then_some(())
    })
    .await;
}

/// Records in an output file; unreadable lines are counted, not parsed.
fn read_output(path: &Path) -> (Vec<Value>, usize) {
    let text = std::fs::read_to_string(path).expect("output file");
    let mut records = Vec::new();
    let mut unreadable = 0;
    for line in text.lines() {
        match serde_json::from_str(line) {
            Ok(v) => records.push(v),
            Err(_) => unreadable += 1,
        }
    }
    (records, unreadable)
}

fn summary(total: usize, ok: usize, rejected: usize, failed: usize, timed_out: usize) -> Value {
    json!({
        "total": total, "skipped": 0, "published": total, "waited": true,
        "ok": ok, "rejected": rejected, "failed": failed, "timed_out": timed_out, "duplicate": 0,
    })
}

fn noops(range: std::ops::RangeInclusive<usize>) -> Vec<Value> {
    range
        .map(|i| json!({"type": "noop", "payload": {"i": i}}))
        .collect()
}

async fn bank_worker(test_db: &TestDb, requests: &str, replies: &str, n: u16) -> RunningWorker {
    RunningWorker::start(
        Worker::builder(config(&test_db.url, requests, replies, n))
            .handler("transfer", bank::Transfer)
            .handler("noop", bank::Noop)
            .database(test_db.db.clone()),
    )
    .await
}

#[tokio::test]
async fn ten_thousand_jobs_are_all_answered_and_counted() {
    const N: usize = 10_000;
    let (test_db, client, requests, replies) = bank_env(Backend::Postgres, 2).await;
    let worker = bank_worker(&test_db, &requests, &replies, 16).await;
    let scratch = Scratch::new();
    let input = scratch.file("jobs.jsonl", &noops(1..=N));

    let started = std::time::Instant::now();
    let run = submit(
        &requests,
        &replies,
        &["--wait", input.to_str().expect("path")],
    )
    .await;
    let took = started.elapsed();
    eprintln!("submit --wait of {N} noops took {took:?}");

    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(run.summary, summary(N, N, 0, 0, 0));
    let lines: BTreeSet<u64> = run.lines().into_iter().collect();
    assert_eq!(run.records.len(), N, "one record per request");
    assert_eq!(lines, (1..=N as u64).collect(), "every line answered once");
    for r in &run.records {
        assert_eq!(r["status"], "ok", "{r}");
        assert_eq!(r["reply"], json!({"status": "ok", "result": null}), "{r}");
        assert_eq!(r["correlation_id"], r["message_id"], "{r}");
    }
    worker.stop().await.expect("clean stop");
    let totals = bank::totals(&test_db.db).await.expect("totals");
    assert_eq!(totals.jobs_logged, N as i64, "each job ran once");
    assert_eq!(client.depth(&requests).await, 0);
}

#[tokio::test]
async fn rejected_and_failed_requests_are_counted_and_the_exit_code_says_so() {
    let (test_db, _client, requests, replies) = bank_env(Backend::MySql, 10).await;
    let worker = bank_worker(&test_db, &requests, &replies, 4).await;
    let scratch = Scratch::new();
    let mut lines = Vec::new();
    let mut expected = HashMap::new();
    for i in 0..40 {
        let (line, status) = match i % 8 {
            5 => (
                json!({"type": "transfer", "payload": {"from": 1, "to": 2, "amount": 10 * bank::INITIAL_BALANCE}}),
                "rejected",
            ),
            6 => (json!({"type": "no_such_type", "payload": {}}), "failed"),
            7 => (
                json!({"type": "transfer", "payload": {"from": "one", "to": 2}}),
                "failed",
            ),
            _ => (
                json!({"type": "transfer", "payload": {"from": 3, "to": 4, "amount": 1}}),
                "ok",
            ),
        };
        lines.push(line);
        expected.insert(i as u64 + 1, status.to_owned());
    }
    let input = scratch.file("mixed.jsonl", &lines);

    let run = submit(
        &requests,
        &replies,
        &["--wait", input.to_str().expect("path")],
    )
    .await;

    assert_eq!(run.code, 1, "{}", run.stderr);
    assert_eq!(run.summary, summary(40, 25, 5, 10, 0));
    assert_eq!(run.statuses(), expected);
    let kinds: BTreeSet<&str> = run
        .records
        .iter()
        .filter(|r| r["status"] == "failed")
        .map(|r| r["reply"]["error"]["kind"].as_str().expect("kind"))
        .collect();
    assert_eq!(kinds, BTreeSet::from(["invalid_payload", "unknown_type"]));
    worker.stop().await.expect("clean stop");
    let totals = bank::totals(&test_db.db).await.expect("totals");
    assert_eq!(totals.transfers, 25);
    assert_eq!(totals.balance_sum, 10 * bank::INITIAL_BALANCE);
}

#[tokio::test]
async fn a_second_run_of_the_same_file_is_answered_from_the_inbox() {
    const N: usize = 200;
    let (test_db, client, requests, replies) = bank_env(Backend::MySql, 20).await;
    let worker = bank_worker(&test_db, &requests, &replies, 8).await;
    let scratch = Scratch::new();
    // Bare payloads with --type: their message_ids are derived, not written.
    let payloads: Vec<Value> = (0..N)
        .map(|i| json!({"from": i % 20 + 1, "to": (i + 1) % 20 + 1, "amount": i + 1}))
        .collect();
    let input = scratch.file("transfers.jsonl", &payloads);
    let args = [
        "--type",
        "transfer",
        "--wait",
        input.to_str().expect("path"),
    ];

    let first = submit(&requests, &replies, &args).await;
    assert_eq!(first.code, 0, "{}", first.stderr);
    assert_eq!(first.summary, summary(N, N, 0, 0, 0));
    assert!(first.records.iter().all(|r| r["duplicate"] == false));

    let second = submit(&requests, &replies, &args).await;
    assert_eq!(
        second.code, 0,
        "answered ok, if by the first run: {}",
        second.stderr
    );
    assert_eq!(second.summary["ok"], N);
    assert_eq!(second.summary["duplicate"], N, "{}", second.summary);
    let ids = |run: &Run| -> HashMap<u64, (String, Value)> {
        run.records
            .iter()
            .map(|r| {
                let id = r["message_id"].as_str().expect("message_id").to_owned();
                (r["line"].as_u64().expect("line"), (id, r["reply"].clone()))
            })
            .collect()
    };
    assert_eq!(
        ids(&first),
        ids(&second),
        "the same message_ids, and the first run's replies"
    );
    assert!(second.records.iter().all(|r| r["duplicate"] == true));

    worker.stop().await.expect("clean stop");
    let totals = bank::totals(&test_db.db).await.expect("totals");
    assert_eq!(totals.transfers, N as i64, "no transfer applied twice");
    assert_eq!(totals.balance_sum, 20 * bank::INITIAL_BALANCE);
    assert_eq!(client.depth(&requests).await, 0);
}

#[tokio::test]
async fn resume_skips_the_lines_already_answered_in_the_output() {
    let (test_db, _client, requests, replies) = bank_env(Backend::MySql, 2).await;
    let worker = bank_worker(&test_db, &requests, &replies, 4).await;
    let scratch = Scratch::new();
    let input = scratch.file("jobs.jsonl", &noops(1..=30));
    let output = scratch.path("replies.jsonl");
    let (input_arg, output_arg) = (
        input.to_str().expect("path"),
        output.to_str().expect("path"),
    );

    let first = submit(
        &requests,
        &replies,
        &["--wait", "-o", output_arg, input_arg],
    )
    .await;
    assert_eq!(first.code, 0, "{}", first.stderr);
    assert!(first.records.is_empty(), "the replies went to the file");
    let (written, _) = read_output(&output);
    assert_eq!(written.len(), 30);

    // As if that run had been killed after 10 replies, mid-way through the 11th;
    // meanwhile 5 lines were added to the input.
    let text = std::fs::read_to_string(&output).expect("output");
    let kept: Vec<&str> = text.lines().take(10).collect();
    let answered: BTreeSet<u64> = kept
        .iter()
        .map(|l| {
            serde_json::from_str::<Value>(l).expect("record")["line"]
                .as_u64()
                .expect("line")
        })
        .collect();
    std::fs::write(&output, format!("{}\n{{\"line\":", kept.join("\n"))).expect("truncate");
    scratch.file("jobs.jsonl", &noops(1..=35));

    let resumed = submit(
        &requests,
        &replies,
        &["--wait", "--resume", "-o", output_arg, input_arg],
    )
    .await;
    assert_eq!(resumed.code, 0, "{}", resumed.stderr);
    assert_eq!(resumed.summary["total"], 35);
    assert_eq!(resumed.summary["skipped"], 10);
    assert_eq!(resumed.summary["published"], 25);
    assert_eq!(resumed.summary["ok"], 35, "the skipped lines ended ok too");
    assert_eq!(
        resumed.summary["duplicate"], 20,
        "the unanswered old lines ran in the first run; the 5 new ones did not"
    );
    let (records, unreadable) = read_output(&output);
    assert_eq!(unreadable, 1, "the torn line stays, on a line of its own");
    let appended: BTreeSet<u64> = records[10..]
        .iter()
        .map(|r| r["line"].as_u64().expect("line"))
        .collect();
    assert_eq!(appended.len(), 25);
    assert!(
        appended.is_disjoint(&answered),
        "answered lines were skipped"
    );
    let all: BTreeSet<u64> = answered.union(&appended).copied().collect();
    assert_eq!(all, (1..=35).collect());

    // Once everything has a reply, there is nothing to do.
    let again = submit(
        &requests,
        &replies,
        &["--wait", "--resume", "-o", output_arg, input_arg],
    )
    .await;
    assert_eq!(again.code, 0, "{}", again.stderr);
    assert_eq!(again.summary["skipped"], 35);
    assert_eq!(again.summary["published"], 0);
    assert_eq!(again.summary["ok"], 35);

    worker.stop().await.expect("clean stop");
    let totals = bank::totals(&test_db.db).await.expect("totals");
    assert_eq!(totals.jobs_logged, 35, "each line ran once");
}

#[tokio::test]
async fn resume_with_ordered_output_writes_the_unanswered_lines_in_input_order() {
    let (test_db, _client, requests, replies) = bank_env(Backend::Postgres, 2).await;
    let worker = bank_worker(&test_db, &requests, &replies, 4).await;
    let scratch = Scratch::new();
    let input = scratch.file("jobs.jsonl", &noops(1..=20));
    let output = scratch.path("replies.jsonl");
    let args = [
        "--wait",
        "--ordered",
        "-o",
        output.to_str().expect("path"),
        input.to_str().expect("path"),
    ];
    let first = submit(&requests, &replies, &args).await;
    assert_eq!(first.code, 0, "{}", first.stderr);

    // As if only the odd lines had been answered: the skipped lines sit between
    // the ones to send, and `--ordered` must step over them.
    let text = std::fs::read_to_string(&output).expect("output");
    let odd: Vec<&str> = text.lines().step_by(2).collect();
    std::fs::write(&output, format!("{}\n", odd.join("\n"))).expect("rewrite");
    let mut resumed_args = vec!["--resume"];
    resumed_args.extend(args);
    let resumed = submit(&requests, &replies, &resumed_args).await;
    assert_eq!(resumed.code, 0, "{}", resumed.stderr);
    assert_eq!(resumed.summary["skipped"], 10);
    assert_eq!(resumed.summary["published"], 10);
    assert_eq!(resumed.summary["ok"], 20);
    assert_eq!(resumed.summary["duplicate"], 10, "the first run did them");
    let (records, unreadable) = read_output(&output);
    assert_eq!(unreadable, 0);
    let lines: Vec<u64> = records
        .iter()
        .map(|r| r["line"].as_u64().expect("line"))
        .collect();
    let expected: Vec<u64> = (1..=20).step_by(2).chain((2..=20).step_by(2)).collect();
    assert_eq!(
        lines, expected,
        "the kept odd lines, then the even ones in order"
    );
    worker.stop().await.expect("clean stop");
    let totals = bank::totals(&test_db.db).await.expect("totals");
    assert_eq!(totals.jobs_logged, 20, "each line ran once");
}

#[tokio::test]
async fn resume_counts_a_rejection_recorded_in_the_output() {
    let mut client = Client::new().await;
    let requests = client.queue(&unique("requests")).await;
    let replies = client.queue(&unique("replies")).await;
    let scratch = Scratch::new();
    let input = scratch.file(
        "jobs.jsonl",
        &[
            json!({"type": "noop", "payload": {}, "message_id": "m-1"}),
            json!({"type": "transfer", "payload": {}, "message_id": "m-2"}),
        ],
    );
    let output = scratch.path("replies.jsonl");
    // As a run that got both replies wrote them: line 2 was rejected.
    let record = |line: u64, id: &str, kind: &str, status: &str| {
        json!({"line": line, "message_id": id, "correlation_id": id, "type": kind,
               "status": status, "duplicate": false, "reply": {"status": status}})
    };
    let write = |second: &str| {
        let text = format!(
            "{}\n{}\n",
            record(1, "m-1", "noop", "ok"),
            record(2, "m-2", "transfer", second)
        );
        std::fs::write(&output, text).expect("write output");
    };
    let args = [
        "--wait",
        "--resume",
        "-o",
        output.to_str().expect("path"),
        input.to_str().expect("path"),
    ];

    write("rejected");
    let run = submit(&requests, &replies, &args).await;
    assert_eq!(run.code, 1, "line 2 did not end ok: {}", run.stderr);
    assert_eq!(
        run.summary,
        json!({
            "total": 2, "skipped": 2, "published": 0, "waited": true,
            "ok": 1, "rejected": 1, "failed": 0, "timed_out": 0, "duplicate": 0,
        })
    );

    write("failed");
    let run = submit(&requests, &replies, &args).await;
    assert_eq!(run.code, 1, "line 2 did not end ok: {}", run.stderr);
    assert_eq!(run.summary["failed"], 1, "{}", run.summary);

    write("ok");
    let run = submit(&requests, &replies, &args).await;
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(run.summary["ok"], 2, "{}", run.summary);
    assert_eq!(client.depth(&requests).await, 0, "nothing was sent again");
}

#[derive(Deserialize)]
struct Nap {
    ms: u64,
}

/// Sleeps as long as its payload says: replies that overtake each other.
struct Sleepy;

impl Handler for Sleepy {
    type Payload = Nap;
    type Output = u64;

    async fn handle(&self, _tx: &mut Tx, nap: Nap, _: &JobMeta) -> Result<u64, JobError> {
        tokio::time::sleep(Duration::from_millis(nap.ms)).await;
        Ok(nap.ms)
    }
}

#[tokio::test]
async fn ordered_output_follows_the_input_and_direct_reply_to_works() {
    // Row locks would not matter, but SQLite runs one job at a time.
    let test_db = TestDb::new(Backend::Postgres).await;
    let mut client = Client::new().await;
    let requests = client.queue(&unique("requests")).await;
    let replies = client.queue(&unique("replies")).await;
    let worker = RunningWorker::start(
        Worker::builder(config(&test_db.url, &requests, &replies, 4))
            .handler("nap", Sleepy)
            .database(test_db.db.clone()),
    )
    .await;
    wait_for_a_consumer(&client, &requests).await;
    let scratch = Scratch::new();
    // Line 1 takes a second, the others none: its reply comes last.
    let naps: Vec<Value> = (1..=20)
        .map(|i| json!({"ms": if i == 1 { 1000 } else { 0 }}))
        .collect();
    let input = scratch.file("naps.jsonl", &naps);
    let input = input.to_str().expect("path");

    let unordered = submit(
        &requests,
        &replies,
        &[
            "--type",
            "nap",
            "--wait",
            "--direct-reply-to",
            "--batch-id",
            "a",
            input,
        ],
    )
    .await;
    assert_eq!(unordered.code, 0, "{}", unordered.stderr);
    assert!(
        !unordered.stderr.contains("no consumer"),
        "a worker consumes: {}",
        unordered.stderr
    );
    assert_eq!(unordered.summary, summary(20, 20, 0, 0, 0));
    assert_eq!(
        unordered.lines().last(),
        Some(&1),
        "as they arrive: the slow line 1 last"
    );

    let ordered = submit(
        &requests,
        &replies,
        &[
            "--type",
            "nap",
            "--wait",
            "--ordered",
            "--batch-id",
            "b",
            input,
        ],
    )
    .await;
    assert_eq!(ordered.code, 0, "{}", ordered.stderr);
    assert_eq!(ordered.summary, summary(20, 20, 0, 0, 0));
    assert_eq!(ordered.lines(), (1..=20).collect::<Vec<u64>>());
    assert_eq!(
        ordered.records[0]["reply"],
        json!({"status": "ok", "result": 1000})
    );
    worker.stop().await.expect("clean stop");
}

#[tokio::test]
async fn without_a_worker_every_request_times_out() {
    let mut client = Client::new().await;
    let requests = client.queue(&unique("requests")).await;
    let replies = client.queue(&unique("replies")).await;
    let scratch = Scratch::new();
    let input = scratch.file("jobs.jsonl", &noops(1..=5));

    let started = std::time::Instant::now();
    let run = submit(
        &requests,
        &replies,
        &[
            "--wait",
            "--ordered",
            "--timeout",
            "500ms",
            input.to_str().expect("path"),
        ],
    )
    .await;
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "the timeout ended it"
    );
    assert!(
        run.stderr.contains(&format!(
            "no consumer on `{requests}`: the replies will wait for a worker"
        )),
        "{}",
        run.stderr
    );
    assert_eq!(run.summary, summary(5, 0, 0, 0, 5));
    assert_eq!(run.lines(), [1, 2, 3, 4, 5]);
    for r in &run.records {
        assert_eq!(r["status"], "timed_out");
        assert_eq!(r["reply"], Value::Null);
    }
    assert_eq!(
        client.depth(&requests).await,
        5,
        "published, waiting for a worker"
    );
}

#[tokio::test]
async fn direct_reply_to_is_the_reply_to_of_the_requests() {
    let mut client = Client::new().await;
    let requests = client.queue(&unique("requests")).await;
    let replies = client.queue(&unique("replies")).await;
    let scratch = Scratch::new();
    let input = scratch.file("jobs.jsonl", &noops(1..=1));

    // No worker: the request stays in its queue, to be looked at.
    let run = submit(
        &requests,
        &replies,
        &[
            "--wait",
            "--direct-reply-to",
            "--timeout",
            "200ms",
            input.to_str().expect("path"),
        ],
    )
    .await;
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert_eq!(run.summary, summary(1, 0, 0, 0, 1));
    let request = client.replies(&requests, 1).await;
    let reply_to = request[0]
        .props
        .reply_to()
        .as_ref()
        .map(|r| r.to_string())
        .expect("a reply_to");
    assert!(
        reply_to.starts_with(txq::tools::submit::DIRECT_REPLY_TO),
        "{reply_to}"
    );
}

#[tokio::test]
async fn a_queue_the_broker_refuses_to_declare_is_a_configuration_error() {
    let mut client = Client::new().await;
    let requests = unique("requests");
    let replies = client.queue(&unique("replies")).await;
    // The request queue exists with an argument the worker's config does not have.
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("classic".into()),
    );
    args.insert("x-max-length".into(), AMQPValue::LongInt(10));
    client.declare(&requests, args).await;
    client.own(&requests);
    let scratch = Scratch::new();
    let input = scratch.file("jobs.jsonl", &noops(1..=1));

    let run = submit(
        &requests,
        &replies,
        &[
            "--wait",
            "--timeout",
            "200ms",
            input.to_str().expect("path"),
        ],
    )
    .await;
    assert_eq!(run.code, 2, "{}", run.stderr);
    let error = run.summary["error"].as_str().expect("an error message");
    assert!(error.contains(&requests), "{error}");
    assert!(error.contains("PRECONDITION_FAILED"), "{error}");
    assert!(error.contains("nothing was published"), "{error}");
    assert_eq!(client.depth(&requests).await, 0);
}

#[tokio::test]
async fn a_bad_line_is_named_and_nothing_is_published() {
    let mut client = Client::new().await;
    let requests = client.queue(&unique("requests")).await;
    let replies = client.queue(&unique("replies")).await;
    let scratch = Scratch::new();
    let input = scratch.path("bad.jsonl");
    std::fs::write(
        &input,
        "{\"type\":\"noop\",\"payload\":{}}\n\n{\"type\":\"noop\",\"payload\":{}\n",
    )
    .expect("write");

    let run = submit(
        &requests,
        &replies,
        &["--wait", input.to_str().expect("path")],
    )
    .await;
    assert_eq!(run.code, 2, "{}", run.stderr);
    let error = run.summary["error"].as_str().expect("an error message");
    assert!(error.contains("line 3"), "{error}");
    assert!(error.contains("nothing was published"), "{error}");
    assert!(run.records.is_empty());
    assert_eq!(client.depth(&requests).await, 0);

    let good = scratch.file("good.jsonl", &noops(1..=1));
    let unwritable = submit(
        &requests,
        &replies,
        &[
            "--wait",
            "-o",
            "no/such/dir/out.jsonl",
            good.to_str().expect("path"),
        ],
    )
    .await;
    assert_eq!(unwritable.code, 2, "{}", unwritable.stderr);
    let error = unwritable.summary["error"].as_str().expect("an error");
    assert!(error.contains("no/such/dir/out.jsonl"), "{error}");
    assert!(unwritable.records.is_empty(), "{}", unwritable.stdout);
    assert_eq!(
        client.depth(&requests).await,
        0,
        "checked before publishing"
    );

    let missing = submit(&requests, &replies, &["no/such/file.jsonl"]).await;
    assert_eq!(missing.code, 2, "{}", missing.stderr);
    let error = missing.summary["error"].as_str().expect("an error");
    assert!(error.contains("no/such/file.jsonl"), "{error}");
    assert!(missing.records.is_empty(), "{}", missing.stdout);
}

#[tokio::test]
async fn an_unreachable_broker_is_a_clear_error_without_the_password() {
    let scratch = Scratch::new();
    let input = scratch.file("jobs.jsonl", &noops(1..=1));
    // Port 1 on loopback: nothing listens there.
    let run = submit_with(
        "amqp://guest:hunter2@127.0.0.1:1/%2f",
        "q",
        "r",
        &[input.to_str().expect("path")],
    )
    .await;
    assert_eq!(run.code, 3, "{}", run.stderr);
    let error = run.summary["error"].as_str().expect("an error message");
    assert!(error.contains("127.0.0.1:1"), "{error}");
    assert!(!run.stderr.contains("hunter2"), "{}", run.stderr);
    assert!(!run.stdout.contains("hunter2"), "{}", run.stdout);
}

#[tokio::test]
async fn a_lost_connection_stops_the_run_and_running_again_answers_everything_once() {
    const N: usize = 50;
    let (test_db, client, requests, replies) = bank_env(Backend::MySql, 2).await;
    let scratch = Scratch::new();
    let input = scratch.file("jobs.jsonl", &noops(1..=N));
    let input = input.to_str().expect("path");
    let proxy = crate::support::Proxy::start().await;

    // No worker yet: the run publishes everything, then waits for replies.
    let args = ["--wait", "--timeout", "2m", input];
    // The default log filter: lapin's own lines would come before the JSON.
    let child = submit_command(&proxy.url(), &requests, &replies, &args)
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawning txq submit");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while client.depth(&requests).await < N as u32 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the requests never reached the queue"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    proxy.cut();
    let out = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .expect("submit ends when its connection is lost")
        .expect("submit output");
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).expect("UTF-8 stdout");
    let (records, error) = split_json_output(&stdout);
    assert!(records.is_empty(), "no request was answered: {stdout}");
    let error = error["error"].as_str().expect("an error line");
    assert!(error.starts_with("rabbitmq"), "{error}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stderr}");
    // No log line either: only the warning that no worker was there yet.
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "only the no-consumer warning: {stderr}");
    assert!(lines[0].contains("no consumer on"), "{stderr}");

    let worker = bank_worker(&test_db, &requests, &replies, 4).await;
    let again = submit(&requests, &replies, &["--wait", input]).await;
    assert_eq!(again.code, 0, "{}", again.stderr);
    assert_eq!(again.summary["ok"], N);
    worker.stop().await.expect("clean stop");
    let totals = bank::totals(&test_db.db).await.expect("totals");
    assert_eq!(totals.jobs_logged, N as i64, "each request ran once");
    assert_eq!(client.depth(&requests).await, 0);
}

/// The peak memory of `txq submit` reading and checking a big batch: near the
/// input's size, not 36 times it (issue 12 §5). The kernel's own figure (VmHWM,
/// the peak resident set) is read once the child connects to a listener of this
/// test's, which it does only after checking the whole input; nothing is
/// published, and nothing is timed.
#[cfg(target_os = "linux")]
#[tokio::test]
async fn checking_a_big_batch_takes_memory_near_its_size() {
    use std::fmt::Write as _;

    const N: usize = 1_000_000;
    let scratch = Scratch::new();
    let input = scratch.path("big.jsonl");
    let mut text = String::with_capacity(N * 16);
    for i in 0..N {
        writeln!(text, "{{\"id\":{}}}", i * 7919 % 10_000_000).expect("format");
    }
    std::fs::write(&input, &text).expect("write input");
    let size = text.len();
    drop(text);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("listen");
    let url = format!(
        "amqp://guest:guest@{}/%2f",
        listener.local_addr().expect("address")
    );
    let mut child = submit_command(
        &url,
        "q",
        "r",
        &["--type", "noop", input.to_str().expect("path")],
    )
    .stdout(std::process::Stdio::null())
    .stderr(std::process::Stdio::null())
    .spawn()
    .expect("spawning txq submit");
    let accepted = tokio::time::timeout(Duration::from_secs(120), listener.accept()).await;
    let pid = child.id().expect("still running");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    child.kill().await.expect("kill");
    let (_connection, _) = accepted
        .expect("txq submit connects after checking its input")
        .expect("accept");
    let peak_kib: usize = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmHWM in {status}"));
    let peak = peak_kib * 1024;
    eprintln!("peak RSS checking {N} lines ({size} bytes): {peak} bytes");
    // The input once, 12 bytes a request, and the program itself (about 15 MiB
    // with nothing to read). Owned strings per line took 36 times the input.
    let limit = size + 16 * N + 40 * 1024 * 1024;
    assert!(
        peak < limit,
        "peak RSS {peak} bytes for {size} bytes of input, {N} lines; at most {limit} expected"
    );
}

/// Issue 14 §10: `--wait` with no worker on the queue says so at once, not
/// after its timeout; it still publishes and waits, and a worker started then
/// answers.
#[tokio::test]
async fn wait_without_a_consumer_says_so_at_once_and_still_waits() {
    use tokio::io::AsyncBufReadExt as _;
    let (test_db, client, requests, replies) = bank_env(Backend::Postgres, 2).await;
    let scratch = Scratch::new();
    let input = scratch.file("jobs.jsonl", &noops(1..=3));
    let mut child = submit_command(
        &amqp_url(),
        &requests,
        &replies,
        &["--wait", "--timeout", "5m", input.to_str().expect("path")],
    )
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::piped())
    .spawn()
    .expect("spawning txq submit");
    let mut stderr = tokio::io::BufReader::new(child.stderr.take().expect("stderr")).lines();
    let first = tokio::time::timeout(Duration::from_secs(60), stderr.next_line())
        .await
        .expect("a warning long before the 5 minute timeout")
        .expect("stderr")
        .expect("a line");
    assert_eq!(
        first,
        format!(
            "txq submit: warning: no consumer on `{requests}`: the replies will wait for a worker"
        )
    );
    assert!(
        child.try_wait().expect("child").is_none(),
        "still waiting for the replies"
    );
    // It published and waits: a worker started now answers this same run.
    let worker = bank_worker(&test_db, &requests, &replies, 2).await;
    let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("the run ends once answered")
        .expect("output");
    worker.stop().await.expect("clean stop");
    assert_eq!(out.status.code(), Some(0));
    let (records, summary) = split_json_output(&String::from_utf8(out.stdout).expect("UTF-8"));
    assert_eq!(records.len(), 3);
    assert_eq!(summary, self::summary(3, 3, 0, 0, 0));
    assert!(
        stderr.next_line().await.expect("stderr").is_none(),
        "nothing else on stderr"
    );
    drop(client);
}

/// Issue 14 §9: `--json` stdout is JSON lines only, the summary last as
/// `{"summary":…}`: with `--wait` after the replies, without it alone.
#[tokio::test]
async fn json_output_is_json_lines_with_the_summary_last() {
    let (test_db, client, requests, replies) = bank_env(Backend::Postgres, 2).await;
    let scratch = Scratch::new();
    let input = scratch.file("jobs.jsonl", &noops(1..=4));
    let input = input.to_str().expect("path");

    let published = submit(&requests, &replies, &[input]).await;
    assert_eq!(published.code, 0, "{}", published.stderr);
    let lines: Vec<Value> = published
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    let fire_and_forget = json!({
        "total": 4, "skipped": 0, "published": 4, "waited": false,
        "ok": 0, "rejected": 0, "failed": 0, "timed_out": 0, "duplicate": 0,
    });
    assert_eq!(lines, [json!({ "summary": fire_and_forget })]);
    assert_eq!(published.stderr, "", "nothing but JSON, and that on stdout");
    assert_eq!(client.depth(&requests).await, 4);

    let worker = bank_worker(&test_db, &requests, &replies, 2).await;
    let waited = submit(&requests, &replies, &["--wait", "--ordered", input]).await;
    worker.stop().await.expect("clean stop");
    assert_eq!(waited.code, 0, "{}", waited.stderr);
    let lines: Vec<Value> = waited
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    assert_eq!(
        lines.len(),
        5,
        "four replies and the summary: {}",
        waited.stdout
    );
    for (i, r) in lines[..4].iter().enumerate() {
        assert_eq!(r["line"], i + 1, "{r}");
        assert_eq!(r["status"], "ok", "{r}");
    }
    let summary = &lines[4]["summary"];
    assert_eq!(
        (
            &summary["total"],
            &summary["published"],
            &summary["ok"],
            &summary["waited"]
        ),
        (&json!(4), &json!(4), &json!(4), &json!(true)),
        "{summary}"
    );
}
