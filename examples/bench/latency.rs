//! `--latency`: time from a request's publish to its reply's receipt, under a
//! fixed offered load (open loop).
//!
//! The offered rate is a fraction (`--latency-loads`) of a maximum measured in the
//! same invocation: bare's, so that every variant gets the same load
//! (`--latency-basis own`: each its own). By default that maximum is *sustained*:
//! what a closed-loop run answers a second with 4×C requests always out, one more
//! published for each reply, so the broker takes publishes while the worker
//! consumes, as it does under an offered load. The pre-loaded throughput runs'
//! rate (`--latency-max preloaded`) leaves the publishing out of the timed part
//! and overstates what a variant can be offered.
//!
//! Each run starts the worker, waits until it consumes, then a publisher on its own
//! connection sends request `i` at `t0 + i / rate` whatever the replies do (the
//! confirms are awaited by another task). The reply's correlation_id (the
//! request's message_id echoed) names `i`, so its latency is counted from the
//! *scheduled* send time `t0 + i / rate`, not from when the publisher got to it:
//! a worker or broker that stalls the publisher does not hide the queueing it
//! causes (no coordinated omission). Requests scheduled in the first
//! `--latency-warmup` seconds are sent and checked but not counted. Every
//! latency is kept and sorted: the percentiles are exact. Every request must get
//! exactly one reply (a second one is waited for for a second after the last),
//! every publish a confirm, and the run passes the throughput runs' checks.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use futures_util::StreamExt as _;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use serde::Serialize;
use tokio::sync::Semaphore;

use super::{
    Args, Run, check, consume_replies, median, procstat, reply_status, request_body, setup,
    spawn_worker, steal_mark, stop_worker,
};

#[derive(Debug, Clone, Serialize)]
pub(crate) struct LatencyRun {
    variant: String,
    /// The offered rate as a fraction of the basis maximum
    load: f64,
    offered_jobs_per_sec: f64,
    /// Replies a second received from the end of the warm-up to the last
    /// scheduled send: the offered rate, unless the worker fell behind
    achieved_jobs_per_sec: f64,
    /// Seconds from the last scheduled send to the last reply
    drain_seconds: f64,
    requests: usize,
    /// Requests counted (those scheduled after the warm-up)
    measured: usize,
    p50_ms: f64,
    p90_ms: f64,
    p99_ms: f64,
    p999_ms: f64,
    max_ms: f64,
    /// How late the publisher sent, behind its schedule (part of the latencies)
    publish_lag_p99_ms: f64,
    publish_lag_max_ms: f64,
    worker_cpu_s_per_1k: f64,
    broker_cpu_s_per_1k: f64,
    db_cpu_s_per_1k: f64,
    retries: u64,
    steal_pct: f64,
}

/// The offered rate's basis: bare's median maximum, or each variant's own.
fn basis(args: &Args, max: &BTreeMap<String, f64>, variant: &str) -> anyhow::Result<f64> {
    let key = if args.latency_basis == "own" {
        variant
    } else {
        "bare"
    };
    max.get(key)
        .copied()
        .with_context(|| format!("no throughput run of {key} to take the maximum from"))
}

/// The latency runs, after the throughput runs in `results`: first, with
/// `--latency-max open`, the closed-loop runs that find the maximum a variant
/// sustains while requests are being published, then the open-loop runs at each
/// load. Each round runs every variant once, in turn.
pub(crate) async fn run_all(
    args: &Args,
    variants: &[String],
    results: &BTreeMap<String, Vec<Run>>,
) -> anyhow::Result<()> {
    let loads: Vec<f64> = args
        .latency_loads
        .split(',')
        .map(|l| l.trim().parse::<f64>().context("--latency-loads"))
        .collect::<anyhow::Result<_>>()?;
    ensure!(
        loads.iter().all(|l| *l > 0.0),
        "--latency-loads: fractions of the maximum, above 0"
    );
    let preloaded: BTreeMap<String, f64> = results
        .iter()
        .map(|(v, rs)| {
            (
                v.clone(),
                median(rs.iter().map(|r| r.jobs_per_sec).collect()),
            )
        })
        .collect();
    let mut sustained: Vec<LatencyRun> = Vec::new();
    let max = if args.latency_max == "sustained" {
        let whose: Vec<String> = if args.latency_basis == "own" {
            variants.to_vec()
        } else {
            vec!["bare".to_owned()]
        };
        let backlog = (4 * args.concurrency).max(32);
        for round in 0..args.runs {
            for v in &whose {
                // About --latency-seconds' worth at the pre-loaded rate.
                let rate = basis(args, &preloaded, v)?;
                let warmup = ((rate * args.latency_warmup) as usize).max(backlog);
                let requests = ((rate * args.latency_seconds) as usize).max(warmup + 4 * backlog);
                let pace = Pace::Backlog {
                    backlog,
                    requests,
                    warmup,
                };
                let r = one_run(args, v, 1.0, pace)
                    .await
                    .with_context(|| format!("{v}, maximum run {}", round + 1))?;
                eprintln!(
                    "{v:>7} maximum run {}: {:.0} jobs/s with {backlog} requests out, steal {:.1}%",
                    round + 1,
                    r.achieved_jobs_per_sec,
                    r.steal_pct
                );
                sustained.push(r);
            }
        }
        whose
            .iter()
            .map(|v| {
                let took = sustained
                    .iter()
                    .filter(|r| r.variant == *v)
                    .map(|r| r.achieved_jobs_per_sec)
                    .collect();
                (v.clone(), median(took))
            })
            .collect()
    } else {
        preloaded.clone()
    };
    let mut runs: Vec<LatencyRun> = Vec::new();
    for round in 0..args.runs {
        for &load in &loads {
            for v in variants {
                let rate = load * basis(args, &max, v)?;
                let r = one_run(args, v, load, Pace::Rate(rate))
                    .await
                    .with_context(|| {
                        format!("{v}, latency at {:.0}%, run {}", load * 100.0, round + 1)
                    })?;
                eprintln!(
                    "{v:>7} latency run {} at {:>3.0}% ({:.0}/s): p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms, took {:.0}/s, steal {:.1}%",
                    round + 1,
                    load * 100.0,
                    rate,
                    r.p50_ms,
                    r.p99_ms,
                    r.max_ms,
                    r.achieved_jobs_per_sec,
                    r.steal_pct
                );
                runs.push(r);
            }
        }
    }
    report(args, variants, &loads, &preloaded, &max, &sustained, &runs)
}

/// Nearest rank: the smallest sample with at least `p` of all at or below it.
fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1] as f64 / 1000.0
}

/// Waits until a consumer is on `queue`: the worker is up.
async fn wait_for_consumer(
    channel: &lapin::Channel,
    queue: &str,
    child: &mut tokio::process::Child,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let q = channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        if q.consumer_count() > 0 {
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            bail!("the worker exited before consuming: {status}");
        }
        ensure!(
            Instant::now() < deadline,
            "the worker did not consume in 60 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// How a run publishes.
#[derive(Clone, Copy)]
enum Pace {
    /// Request `i` at `t0 + i / rate`, whatever the replies do: open loop.
    Rate(f64),
    /// `backlog` requests out at first, then one more for each reply, `requests`
    /// in all: the worker never waits for work, and requests are published as
    /// fast as it answers them (closed loop; for the maximum only). The rate is
    /// taken after the first `warmup` replies.
    Backlog {
        backlog: usize,
        requests: usize,
        warmup: usize,
    },
}

/// A run at `pace`; `load` is only recorded.
async fn one_run(args: &Args, variant: &str, load: f64, pace: Pace) -> anyhow::Result<LatencyRun> {
    let (requests, warmup) = match pace {
        Pace::Rate(rate) => {
            ensure!(rate > 0.0, "an offered rate of {rate}/s");
            let requests = (rate * args.latency_seconds).round() as usize;
            let warmup = ((rate * args.latency_warmup).round() as usize).min(requests);
            (requests, warmup)
        }
        Pace::Backlog {
            backlog,
            requests,
            warmup,
        } => {
            ensure!(
                warmup >= 1 && requests > warmup + 2 * backlog,
                "{requests} requests for a backlog of {backlog} after {warmup}"
            );
            (requests, warmup)
        }
    };
    ensure!(requests > warmup, "no request left after the warm-up");
    let s = setup(args).await?;
    let mut rng = rand::rng();
    let bodies: Vec<Vec<u8>> = (0..requests)
        .map(|_| request_body(args, &mut rng))
        .collect();

    let mut child = spawn_worker(args, variant, &s.queue, &s.replies)?;
    let pid = child.id().context("worker pid")?;
    wait_for_consumer(&s.channel, &s.queue, &mut child).await?;
    let mut consumer = consume_replies(&s.channel, &s.replies).await?;
    // The publisher has a connection of its own: replies arriving do not delay it.
    let publish_conn = Connection::connect(&args.amqp_url, ConnectionProperties::default()).await?;
    let publish = publish_conn.create_channel().await?;
    // Kept open here until every confirm is in: a dropped channel closes.
    let publish_keep = publish.clone();
    publish
        .confirm_select(ConfirmSelectOptions::default())
        .await?;

    let worker_before = procstat::process(pid).context("reading the worker's /proc")?;
    let services_before = procstat::services();
    let cpu_before = procstat::cpu_times();
    let t0 = Instant::now() + Duration::from_millis(20);
    // Open loop: when request i is due. Closed loop: no schedule.
    let scheduled = move |i: usize| match pace {
        Pace::Rate(rate) => Some(t0 + Duration::from_secs_f64(i as f64 / rate)),
        Pace::Backlog { .. } => None,
    };
    // Closed loop: one permit a request, `backlog` at first, one more a reply.
    let permits = Arc::new(Semaphore::new(match pace {
        Pace::Rate(_) => 0,
        Pace::Backlog { backlog, .. } => backlog,
    }));

    let (confirms_tx, mut confirms_rx) =
        tokio::sync::mpsc::unbounded_channel::<lapin::PublisherConfirm>();
    let confirmer = tokio::spawn(async move {
        let mut nacked = 0usize;
        while let Some(c) = confirms_rx.recv().await {
            if !c.await.is_ok_and(|c| c.is_ack()) {
                nacked += 1;
            }
        }
        nacked
    });
    let (queue, replies, workload, publish_permits) = (
        s.queue.clone(),
        s.replies.clone(),
        args.workload.clone(),
        permits.clone(),
    );
    let publisher = tokio::spawn(async move {
        let mut lags = Vec::with_capacity(bodies.len());
        for (i, body) in bodies.into_iter().enumerate() {
            if let Some(at) = scheduled(i) {
                tokio::time::sleep_until(at.into()).await;
                lags.push(at.elapsed().as_micros() as u64);
            } else {
                publish_permits.acquire().await?.forget();
            }
            let props = BasicProperties::default()
                .with_type(workload.as_str().into())
                .with_message_id(format!("{queue}-{i}").into())
                .with_reply_to(replies.as_str().into())
                .with_delivery_mode(2);
            let confirm = publish
                .basic_publish(
                    "".into(),
                    queue.as_str().into(),
                    BasicPublishOptions::default(),
                    &body,
                    props,
                )
                .await?;
            let _ = confirms_tx.send(confirm);
        }
        anyhow::Ok(lags)
    });

    // When each request's first reply came, and how many replies it got.
    let mut came: Vec<Option<Instant>> = vec![None; requests];
    let mut replies_to = vec![0u32; requests];
    let mut statuses: BTreeMap<String, usize> = BTreeMap::new();
    let prefix = format!("{}-", s.queue);
    let mut answered = 0;
    let mut strays = 0usize;
    let mut take = |d: lapin::message::Delivery, now: Instant| {
        let i = d
            .properties
            .correlation_id()
            .as_ref()
            .and_then(|c| c.as_str().strip_prefix(&prefix)?.parse::<usize>().ok())
            .filter(|i| *i < requests);
        let Some(i) = i else {
            strays += 1;
            return false;
        };
        replies_to[i] += 1;
        if replies_to[i] > 1 {
            return false;
        }
        came[i] = Some(now);
        *statuses.entry(reply_status(&d.data)).or_default() += 1;
        permits.add_permits(1);
        true
    };
    while answered < requests {
        let next = tokio::time::timeout(Duration::from_secs(120), consumer.next()).await;
        let Ok(Some(Ok(d))) = next else {
            let _ = child.start_kill();
            bail!("only {answered} of {requests} requests answered");
        };
        if take(d, Instant::now()) {
            answered += 1;
        }
    }
    let worker_after = procstat::process(pid).context("reading the worker's /proc")?;
    let services_after = procstat::services();
    let steal_pct = procstat::cpu_times().steal_pct_since(&cpu_before);
    // A second reply to any request would come soon after the first ones: wait a
    // little for it.
    let grace = Instant::now() + Duration::from_secs(1);
    while let Ok(Some(Ok(d))) = tokio::time::timeout_at(grace.into(), consumer.next()).await {
        take(d, Instant::now());
    }
    let mut lags = publisher.await??;
    let nacked = confirmer.await?;
    let retries = stop_worker(child, pid).await?;

    let twice = replies_to.iter().filter(|n| **n > 1).count();
    ensure!(
        twice == 0 && strays == 0,
        "{variant}: {twice} requests answered more than once, {strays} replies to no request"
    );
    ensure!(
        nacked == 0,
        "{variant}: {nacked} requests nacked by the broker"
    );
    check(args, variant, &s.db, &statuses, requests).await?;
    s.close().await;
    drop(publish_keep);
    let _ = publish_conn.close(200, "bye".into()).await;

    let came: Vec<Instant> = came.into_iter().map(|c| c.unwrap_or(t0)).collect();
    let last = came.iter().copied().max().unwrap_or(t0);
    let (offered, achieved, drain, mut measured) = match pace {
        Pace::Rate(rate) => {
            // Replies that came while publishing, after the warm-up.
            let (from, to) = (scheduled(warmup), scheduled(requests - 1));
            let (from, to) = (from.unwrap_or(t0), to.unwrap_or(t0));
            let during = came.iter().filter(|c| (from..to).contains(*c)).count();
            let achieved = during as f64 / (to - from).as_secs_f64();
            let latency: Vec<u64> = (warmup..requests)
                .map(|i| {
                    let due = scheduled(i).unwrap_or(t0);
                    came[i].saturating_duration_since(due).as_micros() as u64
                })
                .collect();
            if let Some(path) = &args.latency_trace {
                trace(path, variant, load, t0, warmup, &latency, |i| {
                    scheduled(i).unwrap_or(t0)
                })?;
            }
            (rate, achieved, last.saturating_duration_since(to), latency)
        }
        Pace::Backlog { backlog, .. } => {
            // Replies a second from the warm-up's to the last one that had a full
            // backlog behind it.
            let mut order = came.clone();
            order.sort_unstable();
            let (from, to) = (order[warmup - 1], order[requests - backlog - 1]);
            let achieved = (requests - backlog - warmup) as f64 / (to - from).as_secs_f64();
            (f64::NAN, achieved, Duration::ZERO, Vec::new())
        }
    };
    measured.sort_unstable();
    lags.sort_unstable();
    let per_1k = |s: f64| s * 1000.0 / requests as f64;
    Ok(LatencyRun {
        variant: variant.to_owned(),
        load,
        offered_jobs_per_sec: offered,
        achieved_jobs_per_sec: achieved,
        drain_seconds: drain.as_secs_f64(),
        requests,
        measured: measured.len(),
        p50_ms: percentile(&measured, 0.50),
        p90_ms: percentile(&measured, 0.90),
        p99_ms: percentile(&measured, 0.99),
        p999_ms: percentile(&measured, 0.999),
        max_ms: percentile(&measured, 1.0),
        publish_lag_p99_ms: percentile(&lags, 0.99),
        publish_lag_max_ms: percentile(&lags, 1.0),
        worker_cpu_s_per_1k: per_1k(worker_after.cpu_seconds - worker_before.cpu_seconds),
        broker_cpu_s_per_1k: per_1k(services_after.broker - services_before.broker),
        db_cpu_s_per_1k: per_1k(services_after.database - services_before.database),
        retries,
        steal_pct,
    })
}

/// Appends one CSV line a measured request (`latency[k]` is request
/// `warmup + k`'s), in the order they were due.
fn trace(
    path: &std::path::Path,
    variant: &str,
    load: f64,
    t0: Instant,
    warmup: usize,
    latency: &[u64],
    due: impl Fn(usize) -> Instant,
) -> anyhow::Result<()> {
    use std::io::Write as _;
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .saturating_sub(t0.elapsed())
        .as_millis();
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    let mut out = std::io::BufWriter::new(file);
    for (k, us) in latency.iter().enumerate() {
        let at = due(warmup + k).saturating_duration_since(t0).as_secs_f64() * 1000.0;
        writeln!(out, "{variant},{load},{started},{at:.3},{us}")?;
    }
    out.flush()?;
    Ok(())
}

fn report(
    args: &Args,
    variants: &[String],
    loads: &[f64],
    preloaded: &BTreeMap<String, f64>,
    max: &BTreeMap<String, f64>,
    sustained: &[LatencyRun],
    runs: &[LatencyRun],
) -> anyhow::Result<()> {
    let kind = if args.latency_max == "sustained" {
        "sustained (closed-loop)"
    } else {
        "pre-loaded"
    };
    let whose = if args.latency_basis == "own" {
        "each variant's own".to_owned()
    } else {
        format!(
            "bare's, {:.0} jobs/s, for every variant",
            max.get("bare").copied().unwrap_or(f64::NAN)
        )
    };
    println!(
        "\nlatency — request publish to reply receipt, open loop, {} s a run (the first {} s not counted), {} runs; load = share of the {kind} maximum: {whose}",
        args.latency_seconds, args.latency_warmup, args.runs
    );
    println!("\n| variant | pre-loaded jobs/s | sustained maximum jobs/s median (min–max) |");
    println!("|---|---|---|");
    let range = |xs: Vec<f64>, digits: usize| {
        let min = xs.iter().copied().fold(f64::INFINITY, f64::min);
        let max = xs.iter().copied().fold(0.0, f64::max);
        format!("{:.digits$} ({min:.digits$}–{max:.digits$})", median(xs))
    };
    for (v, p) in preloaded {
        let took: Vec<f64> = sustained
            .iter()
            .filter(|r| r.variant == *v)
            .map(|r| r.achieved_jobs_per_sec)
            .collect();
        let open = if took.is_empty() {
            "—".to_owned()
        } else {
            range(took, 0)
        };
        println!("| {v} | {p:.0} | {open} |");
    }
    println!(
        "\n| variant | load | offered jobs/s | replies/s while publishing | p50 ms median (min–max) | p99 ms median (min–max) | p99.9 ms | max ms | publish lag p99 ms | worker CPU s/1k | RabbitMQ CPU s/1k | DB CPU s/1k | steal % max |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for &load in loads {
        for v in variants {
            let rs: Vec<&LatencyRun> = runs
                .iter()
                .filter(|r| r.variant == *v && r.load == load)
                .collect();
            if rs.is_empty() {
                continue;
            }
            let m = |f: fn(&LatencyRun) -> f64| median(rs.iter().map(|r| f(r)).collect());
            let steal = rs.iter().map(|r| r.steal_pct).fold(0.0, f64::max);
            println!(
                "| {v} | {:.0}% | {:.0} | {:.0} | {} | {} | {:.1} | {:.1} | {:.2} | {:.3} | {:.3} | {:.3} | {steal:.1}{} |",
                load * 100.0,
                m(|r| r.offered_jobs_per_sec),
                m(|r| r.achieved_jobs_per_sec),
                range(rs.iter().map(|r| r.p50_ms).collect(), 1),
                range(rs.iter().map(|r| r.p99_ms).collect(), 1),
                m(|r| r.p999_ms),
                m(|r| r.max_ms),
                m(|r| r.publish_lag_p99_ms),
                m(|r| r.worker_cpu_s_per_1k),
                m(|r| r.broker_cpu_s_per_1k),
                m(|r| r.db_cpu_s_per_1k),
                steal_mark(steal),
            );
        }
    }
    let p = |v: &str, load: f64, f: fn(&LatencyRun) -> f64| {
        let xs: Vec<f64> = runs
            .iter()
            .filter(|r| r.variant == v && r.load == load)
            .map(f)
            .collect();
        (!xs.is_empty()).then(|| median(xs))
    };
    let mut ratios = serde_json::Map::new();
    println!();
    for &load in loads {
        for v in ["txq", "ops"] {
            for (name, f) in [
                ("p50", (|r: &LatencyRun| r.p50_ms) as fn(&LatencyRun) -> f64),
                ("p99", |r: &LatencyRun| r.p99_ms),
            ] {
                if let (Some(t), Some(b)) = (p(v, load, f), p("bare", load, f)) {
                    let pct = (load * 100.0).round();
                    println!("{v} ÷ bare ({name} at {pct}%): {:.2}", t / b);
                    ratios.insert(
                        format!("{v}_{name}_over_bare_at_{pct}"),
                        serde_json::json!(t / b),
                    );
                }
            }
        }
    }
    if runs
        .iter()
        .any(|r| r.achieved_jobs_per_sec < 0.95 * r.offered_jobs_per_sec)
    {
        println!(
            "\nA run that answered fewer replies a second than it was offered was overloaded: its queue grew for the whole run, and its latencies grow with the run's length."
        );
    }
    if let Some(path) = &args.json {
        use std::io::Write as _;
        let line = serde_json::json!({
            "label": args.label, "mode": "latency", "workload": args.workload,
            "concurrency": args.concurrency, "payload_bytes": args.payload_bytes,
            "inbox": !args.no_inbox, "basis": args.latency_basis, "max_from": args.latency_max,
            "preloaded_jobs_per_sec": preloaded, "max_jobs_per_sec": max,
            "seconds": args.latency_seconds, "warmup_seconds": args.latency_warmup,
            "max_runs": sustained, "runs": runs, "ratios": ratios,
        });
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        writeln!(f, "{line}")?;
    }
    Ok(())
}
