//! The `txq` command as operators meet it: environment variables, start-up
//! failures, closed pipes, error text, logs, `txq config`, help and exit codes.
//! Each test runs the real binary.

use std::process::Stdio;
use std::time::Duration;

use serde_json::json;
use tokio::io::AsyncBufReadExt as _;

use crate::support::{Client, Request, TempFile, TestDb, amqp_url, pg_url, unique};

/// The exit codes of README's table.
const OK: i32 = 0;
const USAGE: i32 = 2;
const UNAVAILABLE: i32 = 3;

/// `txq` with a clean environment of `TXQ_*` variables.
fn txq(args: &[&str]) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_txq"));
    for (key, _) in std::env::vars() {
        if key.starts_with("TXQ_") || key == "RUST_LOG" || key == "NO_COLOR" {
            command.env_remove(key);
        }
    }
    command
        .args(args)
        .env("TXQ_METRICS_ADDR", "")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    command
}

struct Output {
    code: i32,
    stdout: String,
    stderr: String,
}

async fn output(mut command: tokio::process::Command) -> Output {
    let out = tokio::time::timeout(Duration::from_secs(60), command.output())
        .await
        .expect("txq ended within a minute")
        .expect("txq ran");
    Output {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

#[tokio::test]
async fn documented_and_injected_variables_never_stop_txq() {
    let mut command = txq(&["config", "--json"]);
    command
        // A flag's variable, not a config key.
        .env("TXQ_OPS", "ops.toml")
        // What Kubernetes injects for a Service named txq-metrics.
        .env("TXQ_METRICS_PORT", "tcp://10.0.0.1:9464")
        .env("TXQ_METRICS_PORT_9464_TCP", "tcp://10.0.0.1:9464")
        .env("TXQ_METRICS_PORT_9464_TCP_ADDR", "10.0.0.1")
        .env("TXQ_METRICS_PORT_9464_TCP_PROTO", "tcp")
        .env("TXQ_METRICS_SERVICE_HOST", "10.0.0.1")
        .env("TXQ_METRICS_SERVICE_PORT", "9464")
        .env("TXQ_METRICS_SERVICE_PORT_HTTP", "9464")
        // Documented nested keys.
        .env("TXQ_RETRY__MAX_ATTEMPTS", "7")
        .env("TXQ_INBOX__ENABLED", "false");
    let out = output(command).await;
    assert_eq!(out.code, OK, "{}", out.stderr);
    let config: serde_json::Value = serde_json::from_str(&out.stdout).expect("JSON");
    assert_eq!(config["retry"]["max_attempts"], 7);
    assert_eq!(config["inbox"]["enabled"], false);
}

#[tokio::test]
async fn a_misspelled_key_is_refused_with_a_suggestion() {
    let mut command = txq(&["config"]);
    command.env("TXQ_CONCURENCY", "4");
    let out = output(command).await;
    assert_eq!(out.code, USAGE);
    let lines: Vec<&str> = out.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line: {}", out.stderr);
    assert!(
        lines[0].contains("`concurency`")
            && lines[0].contains("TXQ_CONCURENCY")
            && lines[0].contains("did you mean `concurrency`?"),
        "{}",
        lines[0]
    );
}

#[tokio::test]
async fn config_prints_toml_or_json_with_secrets_redacted() {
    let url = "amqp://app:hunter2@127.0.0.1:5672/%2f";
    let toml_out = output(txq(&["config", "--amqp-url", url])).await;
    assert_eq!(toml_out.code, OK, "{}", toml_out.stderr);
    let parsed: toml::Value = toml::from_str(&toml_out.stdout).expect("TOML");
    assert_eq!(
        parsed["amqp_url"].as_str(),
        Some("amqp://app:***@127.0.0.1:5672/%2f")
    );
    assert_eq!(parsed["retry"]["delays"][0].as_str(), Some("1s"));
    let json_out = output(txq(&["config", "--json", "--amqp-url", url])).await;
    let parsed: serde_json::Value = serde_json::from_str(&json_out.stdout).expect("JSON");
    assert_eq!(parsed["concurrency"], 16);
    assert!(!json_out.stdout.contains("hunter2") && !toml_out.stdout.contains("hunter2"));
}

/// One key in the config file, a `TXQ_*` variable and a flag: the flag wins over
/// the variable, the variable over the file; a flag not given hides nothing.
#[tokio::test]
async fn flags_win_over_variables_which_win_over_the_file() {
    let file = TempFile::with(
        "txq.toml",
        "queue = \"from.file\"\nmetrics_addr = \"\"\nlog_format = \"json\"\n",
    );
    let path = file.0.to_str().expect("path");
    let effective = |flag: Option<&str>, env: Option<&str>| {
        let mut args = vec!["-c", path, "config", "--json"];
        args.extend(flag.map(|q| ["--queue", q]).into_iter().flatten());
        let mut command = txq(&args);
        command.env_remove("TXQ_METRICS_ADDR");
        if let Some(q) = env {
            command.env("TXQ_QUEUE", q);
        }
        async move {
            let out = output(command).await;
            assert_eq!(out.code, OK, "{}", out.stderr);
            serde_json::from_str::<serde_json::Value>(&out.stdout).expect("JSON")
        }
    };
    let config = effective(Some("from.flag"), Some("from.env")).await;
    assert_eq!(config["queue"], "from.flag");
    assert_eq!(
        (&config["metrics_addr"], &config["log_format"]),
        (&json!(""), &json!("json"))
    );
    assert_eq!(effective(None, Some("from.env")).await["queue"], "from.env");
    assert_eq!(effective(None, None).await["queue"], "from.file");
}

/// A closed stdout ends the command quietly with success, as ripgrep does.
#[tokio::test]
async fn a_closed_pipe_ends_the_command_quietly() {
    let ops = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/bank/ops.toml");
    let ops = ops.to_str().expect("path");
    for args in [vec!["config"], vec!["ops", "schema", ops]] {
        let mut command = txq(&args);
        command.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = command.spawn().expect("spawn");
        let stdout = child.stdout.take().expect("stdout");
        let mut first = String::new();
        tokio::io::BufReader::new(stdout)
            .read_line(&mut first)
            .await
            .expect("a first line");
        // The reader is gone: the rest meets a closed pipe.
        let out = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
            .await
            .expect("ends")
            .expect("output");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(OK), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}

#[tokio::test]
async fn a_refused_login_at_start_up_ends_at_once_with_one_line() {
    let test_db = TestDb::new(txq::Backend::Sqlite).await;
    let mut url = url::Url::parse(&amqp_url()).expect("URL");
    url.set_password(Some("wrong-password")).expect("password");
    let out = output(txq(&[
        "run",
        "--amqp-url",
        url.as_str(),
        "--database-url",
        &test_db.url,
        "--queue",
        &unique("requests"),
    ]))
    .await;
    assert_eq!(out.code, UNAVAILABLE, "{}", out.stderr);
    let last = out.stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("txq: ") && last.contains("ACCESS_REFUSED"),
        "{last}"
    );
    assert!(!out.stderr.contains("reconnecting"), "{}", out.stderr);
    assert!(!out.stderr.contains("wrong-password"));
}

#[tokio::test]
async fn an_unreachable_broker_at_start_up_is_tried_a_bounded_number_of_times() {
    let test_db = TestDb::new(txq::Backend::Sqlite).await;
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a port")
        .port();
    let mut command = txq(&[
        "run",
        "--amqp-url",
        &format!("amqp://guest:guest@127.0.0.1:{closed}/%2f"),
        "--database-url",
        &test_db.url,
    ]);
    command.env("TXQ_CONNECT_ATTEMPTS", "3");
    let out = output(command).await;
    assert_eq!(out.code, UNAVAILABLE, "{}", out.stderr);
    assert!(out.stderr.contains("attempt 1/3"), "{}", out.stderr);
    assert!(out.stderr.contains("attempt 2/3"), "{}", out.stderr);
    let last = out.stderr.lines().last().unwrap_or_default();
    assert!(last.contains("after 3 attempts"), "{last}");
}

/// The database's own words, once, at once: not a pool timing out in silence.
#[tokio::test]
async fn an_unreachable_or_unknown_database_is_reported_at_once_and_once() {
    let mut unknown = url::Url::parse(&pg_url()).expect("URL");
    unknown.set_path("no_such_database_txq");
    let started = std::time::Instant::now();
    let out = output(txq(&["run", "--database-url", unknown.as_str()])).await;
    assert_eq!(out.code, UNAVAILABLE, "{}", out.stderr);
    let last = out.stderr.lines().last().unwrap_or_default();
    assert_eq!(last.matches("does not exist").count(), 1, "{last}");
    assert!(!last.contains(" at line "), "{last}");
    let out = output(txq(&[
        "migrate",
        "--database-url",
        "postgres://postgres@127.0.0.1:1/test",
    ]))
    .await;
    assert_eq!(out.code, UNAVAILABLE, "{}", out.stderr);
    assert!(out.stderr.contains("Connection refused"), "{}", out.stderr);
    // Not the pool's 30 s acquire timeout.
    assert!(started.elapsed() < Duration::from_secs(25));
}

#[tokio::test]
async fn non_amqp_urls_are_usage_errors_before_connecting() {
    for url in [
        "http://127.0.0.1:5672/",
        "amqp://127.0.0.1/%2f?heartbeat=abc",
    ] {
        for args in [vec!["submit", "/dev/null"], vec!["dlq", "list"]] {
            let mut all = args.clone();
            all.extend(["--amqp-url", url]);
            let out = output(txq(&all)).await;
            assert_eq!(out.code, USAGE, "{all:?}: {}", out.stderr);
            assert!(out.stderr.contains("amqp_url"), "{}", out.stderr);
        }
    }
}

#[tokio::test]
async fn help_groups_connection_options_and_ends_with_examples() {
    let run = output(txq(&["run", "--help"])).await;
    assert!(run.stdout.contains("Connection:"), "{}", run.stdout);
    assert!(run.stdout.contains("--amqp-url"));
    assert!(run.stdout.trim_end().contains("EXAMPLES:"));
    let check = output(txq(&["ops", "check", "--help"])).await;
    assert!(!check.stdout.contains("--amqp-url"), "{}", check.stdout);
    assert!(check.stdout.contains("EXAMPLES:"));
    let top = output(txq(&["--help"])).await;
    assert!(top.stdout.contains("EXIT CODES"), "{}", top.stdout);
}

#[tokio::test]
async fn a_bad_operations_file_is_a_usage_error() {
    let dir = std::env::temp_dir().join(unique("ops"));
    std::fs::write(&dir, "[operations.x]\nsql = 1\n").expect("write");
    let out = output(txq(&["ops", "check", dir.to_str().expect("path")])).await;
    let _ = std::fs::remove_file(&dir);
    assert_eq!(out.code, USAGE, "{}", out.stderr);
}

/// Logs to a pipe carry no colour codes; `-v` adds a line per job.
#[tokio::test]
async fn logs_are_plain_off_a_terminal_and_v_shows_each_job() {
    let test_db = TestDb::new(txq::Backend::Sqlite).await;
    let mut client = Client::new().await;
    let requests = client.queue(&unique("requests")).await;
    let replies = client.queue(&unique("replies")).await;
    client
        .publish(
            &requests,
            &Request::json("echo", json!({"n": 1})).id("logged-job"),
        )
        .await;
    let mut command = txq(&[
        "run",
        "-v",
        "--amqp-url",
        &amqp_url(),
        "--database-url",
        &test_db.url,
        "--queue",
        &requests,
    ]);
    command
        .env("TXQ_REPLY_QUEUE", &replies)
        .stderr(Stdio::piped());
    let mut child = command.spawn().expect("spawn");
    let stderr = child.stderr.take().expect("stderr");
    let mut lines = tokio::io::BufReader::new(stderr).lines();
    let mut seen = Vec::new();
    let found = tokio::time::timeout(Duration::from_secs(60), async {
        while let Ok(Some(line)) = lines.next_line().await {
            let done = line.contains("job ok in") && line.contains("logged-job");
            seen.push(line);
            if done {
                return true;
            }
        }
        false
    })
    .await;
    let _ = child.kill().await;
    assert!(
        matches!(found, Ok(true)),
        "no per-job line: {}",
        seen.join("\n")
    );
    assert!(
        seen.iter().all(|l| !l.contains('\u{1b}')),
        "colour codes in a pipe: {seen:?}"
    );
    assert!(
        seen.iter()
            .any(|l| l.contains("starting") && l.contains("concurrency=16")),
        "the effective config as fields: {seen:?}"
    );
}

/// The README's quick start: the worker on SQLite with the bank operations, then
/// the shipped requests through `txq submit --wait`, all with the one binary.
#[tokio::test]
async fn the_quick_start_answers_every_shipped_request() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let test_db = TestDb::new(txq::Backend::Sqlite).await;
    let mut client = Client::new().await;
    let requests = client.queue(&unique("requests")).await;
    let ops = root.join("examples/bank/ops.toml");
    let schema = root.join("examples/bank/schema.sqlite.sql");
    let mut worker = txq(&[
        "run",
        "--ops",
        ops.to_str().expect("path"),
        "--init-sql",
        schema.to_str().expect("path"),
        "--database-url",
        &test_db.url,
        "--amqp-url",
        &amqp_url(),
        "--queue",
        &requests,
    ]);
    let _worker = worker.spawn().expect("txq run");
    let sample = root.join("examples/bank/requests.jsonl");
    let out = output(txq(&[
        "submit",
        sample.to_str().expect("path"),
        "--wait",
        "--amqp-url",
        &amqp_url(),
        "--queue",
        &requests,
    ]))
    .await;
    let replies: Vec<serde_json::Value> = out
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    let shipped = std::fs::read_to_string(&sample)
        .expect("sample")
        .lines()
        .count();
    assert_eq!(replies.len(), shipped, "{}", out.stderr);
    let status = |id: &str| {
        replies
            .iter()
            .find(|r| r["message_id"] == id)
            .map(|r| r["status"].as_str().unwrap_or_default().to_owned())
    };
    assert_eq!(status("quickstart-too-much").as_deref(), Some("rejected"));
    assert_eq!(status("quickstart-balance-1").as_deref(), Some("ok"));
    assert_eq!(
        replies.iter().filter(|r| r["status"] == "ok").count(),
        shipped - 1
    );
    // One rejection, on purpose: not every request ended ok.
    assert_eq!(out.code, 1, "{}", out.stderr);
}
