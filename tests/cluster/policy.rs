//! `management_url`: at start-up `txq run` reads the policies RabbitMQ applies to
//! its queues and refuses one that would lose messages, and warns about the rest.
//! The management API runs on txq1 (127.0.0.1:15681, see scripts/cluster.sh).

use std::time::Duration;

use crate::support::{NODES, Queues, ctl_ok, require_cluster, unique};

const MANAGEMENT: &str = "http://guest:guest@127.0.0.1:15681";

/// A policy of the test's own on one queue; cleared on drop.
struct Policy(String);

impl Policy {
    async fn set(queue: &str, definition: &str) -> Policy {
        let name = unique("policy");
        ctl_ok(
            NODES[0].name,
            &[
                "set_policy",
                &name,
                &format!("^{queue}$"),
                definition,
                "--apply-to",
                "queues",
            ],
        )
        .await;
        Policy(name)
    }
}

impl Drop for Policy {
    fn drop(&mut self) {
        let _ = crate::support::ctl_blocking(NODES[0].name, &["clear_policy", &self.0]);
    }
}

/// The delays of a worker with the default retry schedule, for cleanup.
const DELAYS: [Duration; 4] = [
    Duration::from_secs(1),
    Duration::from_secs(5),
    Duration::from_secs(30),
    Duration::from_secs(120),
];

fn txq_run(queue: &str, queue_type: &str, db: &std::path::Path) -> tokio::process::Child {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_txq"));
    for (key, _) in std::env::vars() {
        if key.starts_with("TXQ_") {
            command.env_remove(key);
        }
    }
    command
        .args(["run", "--queue", queue, "--amqp-url", &NODES[0].url()])
        .args(["--database-url", &format!("sqlite://{}", db.display())])
        .env("TXQ_MANAGEMENT_URL", MANAGEMENT)
        .env("TXQ_QUEUE_TYPE", queue_type)
        .env("TXQ_METRICS_ADDR", "")
        .env("TXQ_REPLY_QUEUE", "")
        .env("TXQ_CONNECT_ATTEMPTS", "3")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("txq run")
}

async fn consumers(queue: &str) -> u64 {
    let out = ctl_ok(
        NODES[0].name,
        &["list_queues", "name", "consumers", "--formatter", "json"],
    )
    .await;
    serde_json::from_str::<Vec<serde_json::Value>>(&out)
        .unwrap_or_default()
        .iter()
        .find(|r| r["name"] == queue)
        .and_then(|r| r["consumers"].as_u64())
        .unwrap_or(0)
}

fn remove_db(db: &std::path::Path) {
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", db.display()));
    }
}

#[tokio::test]
#[ignore = "needs a 3-node cluster: bash scripts/cluster.sh up; CI runs them as their own step"]
async fn a_policy_that_drops_requests_stops_the_start_naming_it() {
    require_cluster().await;
    let queue = unique("policed");
    let mut queues = Queues(Vec::new());
    queues.worker(&queue, &DELAYS);
    let _policy = Policy::set(&queue, r#"{"max-length": 10}"#).await;
    let db = std::env::temp_dir().join(format!("{queue}.db"));
    let child = txq_run(&queue, "classic", &db);
    let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("txq run refuses to start, and ends")
        .expect("output");
    remove_db(&db);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.contains("max-length") && last.contains(&queue) && last.contains("policy"),
        "{last}"
    );
}

#[tokio::test]
#[ignore = "needs a 3-node cluster: bash scripts/cluster.sh up; CI runs them as their own step"]
async fn a_harmless_policy_is_a_warning_and_the_worker_runs() {
    require_cluster().await;
    let queue = unique("policed");
    let mut queues = Queues(Vec::new());
    queues.worker(&queue, &DELAYS);
    let _policy = Policy::set(&queue, r#"{"delivery-limit": 2}"#).await;
    let db = std::env::temp_dir().join(format!("{queue}.db"));
    let child = txq_run(&queue, "quorum", &db);
    let pid = child.id().expect("pid");
    crate::support::eventually("the worker to consume", Duration::from_secs(60), || {
        let queue = queue.clone();
        async move { consumers(&queue).await >= 1 }
    })
    .await;
    crate::support::signal(pid, "-TERM");
    let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("txq run stops")
        .expect("output");
    remove_db(&db);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("delivery-limit") && stderr.contains("lower than txq's 20"),
        "{stderr}"
    );
}
