//! Three bank workers on quorum queues while the cluster loses nodes: the leader
//! of the request queue is killed (kill -9 of its Erlang VM) and restarted, then a
//! follower's broker is stopped and started again. Nothing may be lost, applied
//! twice or left unanswered, and the workers ride it out without a restart.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use lapin::{Connection, ConnectionProperties};
use txq::config::{QueueType, RetryConfig};

use crate::bank;
use crate::support::{
    BankConfig, BankWorker, Collector, NODES, Publisher, Queues, TestDb, Transfer, bank_bin,
    beam_pid, cluster_sh, ctl_ok, declare_quorum, eventually, process_gone, queue_info,
    require_cluster, signal, transfers, unique, urls_from, worker_connections,
};

const N: usize = 20_000;
const ACCOUNTS: i64 = 100;
const DELAYS: [Duration; 2] = [Duration::from_millis(100), Duration::from_millis(300)];
/// A guard against a hang in one phase of the test, not a measurement.
const PHASE: Duration = Duration::from_secs(240);
/// A node's restart and rejoin, by `scripts/cluster.sh up`.
const REJOIN: Duration = Duration::from_secs(120);

/// Waits until the request queue's member on `node` is back online.
async fn rejoined(queue: &str, node: &str) {
    eventually(
        &format!("{node} back online as a member of the request queue"),
        REJOIN,
        || async {
            queue_info(queue)
                .await
                .is_some_and(|q| q.online.iter().any(|n| n == node))
        },
    )
    .await;
}

#[tokio::test]
#[ignore = "needs a 3-node cluster: bash scripts/cluster.sh up; CI runs them as their own step"]
async fn quorum_queues_ride_out_a_killed_leader_and_a_stopped_follower() {
    require_cluster().await;
    bank_bin();
    let test_db = TestDb::new().await;
    bank::setup(&test_db.db, ACCOUNTS)
        .await
        .expect("bank schema");
    let queue = unique("requests");
    let replies = unique("replies");
    let mut queues = Queues::default();
    queues.worker(&queue, &DELAYS);
    queues.0.push(replies.clone());

    // The worker's own declarations (quorum: replicated on every node), so that
    // requests can be published before any worker runs; and a quorum reply queue.
    let topology = txq::broker::Topology::from_config(&txq::Config {
        queue: queue.clone(),
        queue_type: QueueType::Quorum,
        reply_queue: String::new(),
        retry: RetryConfig {
            delays: DELAYS.to_vec(),
            ..RetryConfig::default()
        },
        ..txq::Config::default()
    });
    let conn = Connection::connect(&NODES[0].url(), ConnectionProperties::default())
        .await
        .expect("connecting to txq1");
    let channel = conn.create_channel().await.expect("channel");
    txq::broker::declare(&channel, &topology)
        .await
        .expect("declaring the worker's queues");
    declare_quorum(&conn, &replies).await;
    let _ = conn.close(200, "declared".into()).await;
    for q in [&queue, &replies] {
        let info = queue_info(q).await.expect("the queue is listed");
        let mut members = info.members.clone();
        members.sort();
        assert_eq!(
            members,
            NODES.map(|n| n.name.to_owned()),
            "{q} is replicated on every node"
        );
    }

    let plan = transfers(N, ACCOUNTS, Some(&replies));
    let effects: HashMap<String, Transfer> = plan
        .iter()
        .map(|(t, r)| (r.message_id.clone(), *t))
        .collect();
    let by_cid: HashMap<String, String> = plan
        .iter()
        .map(|(_, r)| (r.correlation_id.clone(), r.message_id.clone()))
        .collect();
    let requests = plan.into_iter().map(|(_, r)| r).collect();
    // The publisher is held back by a budget, so that work is queued through each
    // fault however fast the workers are.
    let mut publisher = Publisher::start(&queue, requests, 6_000);
    // Replies are consumed from txq1 first, where the queues' leaders start: the
    // collector fails over too.
    let mut collector = Collector::start(&replies, 0);
    let started = tokio::time::Instant::now();
    let mut workers: Vec<BankWorker> = (0..NODES.len())
        .map(|i| {
            BankWorker::spawn(
                &format!("bank{}", i + 1),
                &BankConfig {
                    // All three nodes, each worker starting with a different one.
                    amqp_url: urls_from(i),
                    database_url: test_db.url.clone(),
                    queue: queue.clone(),
                    queue_type: "quorum",
                    // Each request names its reply queue.
                    reply_queue: String::new(),
                    concurrency: 16,
                    retry_delays: DELAYS.to_vec(),
                    shutdown_grace: Duration::from_secs(10),
                },
            )
        })
        .collect();

    // 1. kill -9 the node that leads the request queue, mid-run.
    collector.wait_answered(2_000, PHASE).await;
    let leader = queue_info(&queue).await.expect("request queue").leader;
    let pid = beam_pid(&leader).await;
    let at_kill = collector.answered();
    eprintln!(
        "{:?}: {at_kill} answered; kill -9 {leader} (leader, pid {pid})",
        started.elapsed()
    );
    signal(pid, "-9");
    eventually(
        &format!("{leader}'s VM gone"),
        Duration::from_secs(30),
        || std::future::ready(process_gone(pid)),
    )
    .await;
    publisher.allow(11_000);
    eventually("a new leader of the request queue", PHASE, || async {
        queue_info(&queue)
            .await
            .is_some_and(|q| !q.leader.is_empty() && q.leader != leader)
    })
    .await;
    // The work goes on with two nodes.
    collector.wait_answered(at_kill + 2_000, PHASE).await;
    eprintln!(
        "{:?}: {} answered with {leader} down; restarting it",
        started.elapsed(),
        collector.answered()
    );
    cluster_sh("up").await;
    rejoined(&queue, &leader).await;
    eprintln!(
        "{:?}: {leader} rejoined; {} answered",
        started.elapsed(),
        collector.answered()
    );

    // 2. Stop a follower's broker (its Erlang VM stays up), then start it again:
    // the follower most workers are connected to.
    let now_leader = queue_info(&queue).await.expect("request queue").leader;
    let ours: HashSet<u32> = workers.iter().map(|w| w.pid).collect();
    let connections = worker_connections().await;
    let follower = NODES
        .iter()
        .map(|n| n.name)
        .filter(|n| *n != now_leader)
        .max_by_key(|n| {
            connections
                .iter()
                .filter(|(pid, node)| ours.contains(pid) && node.name == *n)
                .count()
        })
        .expect("a follower");
    let at_stop = collector.answered();
    eprintln!(
        "{:?}: {at_stop} answered; stop_app {follower} (leader {now_leader}; workers on {:?})",
        started.elapsed(),
        connections
            .iter()
            .filter(|(pid, _)| ours.contains(pid))
            .map(|(pid, node)| (pid, node.name))
            .collect::<Vec<_>>()
    );
    ctl_ok(follower, &["stop_app"]).await;
    publisher.allow(16_000);
    collector.wait_answered(at_stop + 2_000, PHASE).await;
    eprintln!(
        "{:?}: {} answered with {follower} stopped; starting it",
        started.elapsed(),
        collector.answered()
    );
    cluster_sh("up").await;
    rejoined(&queue, follower).await;

    // 3. The rest, on the whole cluster again.
    publisher.allow(N);
    publisher.wait_published(N, PHASE).await;
    collector.wait_answered(N, PHASE).await;
    eprintln!("{:?}: all {N} answered", started.elapsed());

    for w in &mut workers {
        assert!(
            w.is_running(),
            "{} (pid {}) exited: a worker must ride out node losses without a restart",
            w.name,
            w.pid
        );
    }
    // And each is connected again (the processes of the start, same pids).
    eventually("every worker connected to the cluster", REJOIN, || async {
        let connected: HashSet<u32> = worker_connections()
            .await
            .into_iter()
            .map(|(pid, _)| pid)
            .collect();
        ours.is_subset(&connected)
    })
    .await;
    eventually(
        "the request queue empty (every request acked)",
        PHASE,
        || async { queue_info(&queue).await.is_some_and(|q| q.messages == 0) },
    )
    .await;
    let dead = queue_info(&format!("{queue}.dlq"))
        .await
        .map_or(0, |q| q.messages);
    assert_eq!(dead, 0, "nothing was dead-lettered");
    let mut reconnected = Vec::new();
    for w in &mut workers {
        let (took, status) = w.terminate(Duration::from_secs(60)).await;
        let status =
            status.unwrap_or_else(|| panic!("{} did not exit within 60 s of SIGTERM", w.name));
        assert!(
            status.success(),
            "{}: SIGTERM ends in exit 0, got {status}",
            w.name
        );
        let log = w.log();
        reconnected.push(format!(
            "{}: {} reconnect warnings, stopped in {took:?}",
            w.name,
            log.lines().filter(|l| l.contains("reconnect")).count()
        ));
    }

    // Every request answered, and only with `ok`.
    let got = collector.snapshot();
    let missing: Vec<&String> = by_cid.keys().filter(|c| !got.contains_key(*c)).collect();
    assert!(
        missing.is_empty(),
        "{} requests never answered, e.g. {:?}",
        missing.len(),
        missing.first()
    );
    let replies_in_all: usize = got.values().map(Vec::len).sum();
    let duplicates = got.values().flatten().filter(|r| r.duplicate).count();
    let not_ok: Vec<_> = got
        .values()
        .flatten()
        .filter(|r| r.status() != "ok")
        .collect();
    assert!(
        not_ok.is_empty(),
        "{} replies are not ok, e.g. {:?}",
        not_ok.len(),
        not_ok.first().map(|r| &r.body)
    );
    let unknown: Vec<&String> = got.keys().filter(|c| !by_cid.contains_key(*c)).collect();
    assert!(
        unknown.is_empty(),
        "replies to nothing we sent: {unknown:?}"
    );

    // Each ok transfer applied exactly once, as requested: the transfers table holds
    // one row per request, and every account's balance is what the ok replies' transfers make it.
    let ok: HashSet<&String> = got.keys().map(|c| &by_cid[c]).collect();
    let rows: Vec<(String, i64, i64, i64)> =
        txq::sqlx::query_as("SELECT message_id, from_id, to_id, amount FROM transfers")
            .fetch_all(test_db.pool())
            .await
            .expect("transfers");
    assert_eq!(
        rows.len(),
        ok.len(),
        "one transfers row per ok request (fewer: lost, more: applied twice)"
    );
    let mut seen = HashSet::new();
    for (message_id, from, to, amount) in &rows {
        assert!(seen.insert(message_id), "{message_id} applied twice");
        let t = effects
            .get(message_id)
            .unwrap_or_else(|| panic!("a transfer nobody sent: {message_id}"));
        assert_eq!(
            (t.from, t.to, t.amount),
            (*from, *to, *amount),
            "{message_id}"
        );
    }
    let mut expected: HashMap<i64, i64> = (1..=ACCOUNTS)
        .map(|id| (id, bank::INITIAL_BALANCE))
        .collect();
    for message_id in &ok {
        let t = effects[*message_id];
        *expected.get_mut(&t.from).expect("account") -= t.amount;
        *expected.get_mut(&t.to).expect("account") += t.amount;
    }
    let balances: Vec<(i64, i64)> =
        txq::sqlx::query_as("SELECT id, balance FROM accounts ORDER BY id")
            .fetch_all(test_db.pool())
            .await
            .expect("balances");
    assert_eq!(balances.len(), ACCOUNTS as usize);
    for (id, balance) in balances {
        assert_eq!(balance, expected[&id], "account {id}'s balance");
    }

    eprintln!(
        "{:?}: {N} requests, {replies_in_all} replies ({duplicates} marked duplicate), \
         {} republished by the test's publisher, {} collector reconnects; {}",
        started.elapsed(),
        *publisher.republished.lock().expect("count"),
        *collector.reconnects.lock().expect("count"),
        reconnected.join("; ")
    );
}
