//! `txq console` with `management_url`: the overview shows each queue's rates, read
//! from the management API on txq1 (127.0.0.1:15681), beside the depths it reads
//! over AMQP.

use std::time::Duration;

use lapin::BasicProperties;
use lapin::options::{BasicPublishOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use tokio::io::AsyncBufReadExt as _;

use crate::support::{NODES, Queues, connect_any, require_cluster, unique};

const MANAGEMENT: &str = "http://guest:guest@127.0.0.1:15681";

/// The publish rate the overview shows for the request queue, if any.
fn shown_rate(page: &str) -> Option<f64> {
    let cell = page.split("in ").nth(1)?;
    cell.split("/s").next()?.trim().parse().ok()
}

#[tokio::test]
#[ignore = "needs a 3-node cluster: bash scripts/cluster.sh up; CI runs them as their own step"]
async fn the_overview_shows_queue_rates_from_the_management_api() {
    require_cluster().await;
    let queue = unique("console");
    let mut queues = Queues(Vec::new());
    queues.0.push(queue.clone());
    let (conn, _) = connect_any(0).await.expect("a cluster node");
    let channel = conn.create_channel().await.expect("channel");
    channel
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("declare");
    // A steady trickle, until the test ends.
    let publisher = {
        let (channel, queue) = (channel.clone(), queue.clone());
        tokio::spawn(async move {
            loop {
                let _ = channel
                    .basic_publish(
                        "".into(),
                        queue.as_str().into(),
                        BasicPublishOptions::default(),
                        b"{}",
                        BasicProperties::default(),
                    )
                    .await;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let db = std::env::temp_dir().join(format!("{queue}.db"));
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_txq"));
    for (key, _) in std::env::vars() {
        if key.starts_with("TXQ_") {
            command.env_remove(key);
        }
    }
    let mut console = command
        .arg("console")
        .env("TXQ_AMQP_URL", NODES[0].url())
        .env("TXQ_QUEUE", &queue)
        .env("TXQ_MANAGEMENT_URL", MANAGEMENT)
        .env(
            "TXQ_DATABASE_URL",
            format!("sqlite://{}?mode=rwc", db.display()),
        )
        .env("TXQ_CONSOLE__LISTEN", "127.0.0.1:0")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("txq console");
    let stdout = console.stdout.take().expect("stdout");
    let line = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::io::BufReader::new(stdout).lines().next_line(),
    )
    .await
    .expect("the console says where it listens")
    .expect("stdout")
    .expect("a line");
    let base = line
        .strip_prefix("txq console on ")
        .expect("the address line")
        .to_owned();
    // The management API samples every few seconds: wait for a non-zero rate.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    loop {
        let page = reqwest::get(&base)
            .await
            .expect("GET /")
            .text()
            .await
            .expect("body");
        if shown_rate(&page).is_some_and(|r| r > 0.0) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no publish rate shown for {queue}: {page}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    publisher.abort();
    let _ = console.start_kill();
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", db.display()));
    }
}
