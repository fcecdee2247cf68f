//! The AMQP side of a test: a producer/requester client, its requests and the
//! replies it collects, and RabbitMQ users.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt as _;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicPublishOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use tokio::task::JoinHandle;

use super::process::NoWorker;
use super::services::{amqp_url, on_fresh_runtime, service_down};
use super::{Alive, REPLY_DEADLINE, TEST_DELAYS, unique};

pub async fn broker() -> Connection {
    let url = amqp_url();
    match Connection::connect(&url, ConnectionProperties::default()).await {
        Ok(c) => c,
        Err(e) => service_down("RabbitMQ", "TXQ_TEST_AMQP_URL", &url, e),
    }
}

/// A request to publish.
#[derive(Default, Clone)]
pub struct Request {
    pub job_type: Option<String>,
    pub body: Vec<u8>,
    pub message_id: Option<String>,
    pub correlation_id: Option<String>,
    pub reply_to: Option<String>,
    pub traceparent: Option<String>,
    /// Headers of the test's own (batch headers, say).
    pub headers: Vec<(String, AMQPValue)>,
}

impl Request {
    pub fn json(job_type: &str, body: serde_json::Value) -> Self {
        Request {
            job_type: Some(job_type.to_owned()),
            body: serde_json::to_vec(&body).expect("JSON"),
            ..Request::default()
        }
    }

    pub fn id(mut self, message_id: &str) -> Self {
        self.message_id = Some(message_id.to_owned());
        self
    }

    pub fn correlation(mut self, id: &str) -> Self {
        self.correlation_id = Some(id.to_owned());
        self
    }

    pub fn reply_to(mut self, queue: &str) -> Self {
        self.reply_to = Some(queue.to_owned());
        self
    }

    pub fn traceparent(mut self, tp: &str) -> Self {
        self.traceparent = Some(tp.to_owned());
        self
    }

    pub fn header(mut self, name: &str, value: AMQPValue) -> Self {
        self.headers.push((name.to_owned(), value));
        self
    }

    /// A member of batch `id` of `size` members.
    pub fn batch(self, id: &str, size: i64) -> Self {
        self.header("x-txq-batch-id", AMQPValue::LongString(id.into()))
            .header("x-txq-batch-size", AMQPValue::LongLongInt(size))
    }

    fn properties(&self) -> BasicProperties {
        let mut p = BasicProperties::default().with_delivery_mode(2);
        let mut headers = FieldTable::default();
        if let Some(tp) = &self.traceparent {
            headers.insert(
                "traceparent".into(),
                AMQPValue::LongString(tp.as_str().into()),
            );
        }
        for (name, value) in &self.headers {
            headers.insert(name.as_str().into(), value.clone());
        }
        if !headers.inner().is_empty() {
            p = p.with_headers(headers);
        }
        if let Some(t) = &self.job_type {
            p = p.with_type(t.as_str().into());
        }
        if let Some(m) = &self.message_id {
            p = p.with_message_id(m.as_str().into());
        }
        if let Some(c) = &self.correlation_id {
            p = p.with_correlation_id(c.as_str().into());
        }
        if let Some(r) = &self.reply_to {
            p = p.with_reply_to(r.as_str().into());
        }
        p
    }
}

/// A reply as the requester sees it.
#[derive(Debug, Clone)]
pub struct Reply {
    /// The body as JSON (`null` when it is not JSON, as for poison requests).
    pub body: serde_json::Value,
    pub data: Vec<u8>,
    pub props: BasicProperties,
}

impl From<&lapin::message::Delivery> for Reply {
    fn from(d: &lapin::message::Delivery) -> Reply {
        Reply {
            body: serde_json::from_slice(&d.data).unwrap_or(serde_json::Value::Null),
            data: d.data.clone(),
            props: d.properties.clone(),
        }
    }
}

impl Reply {
    pub fn status(&self) -> &str {
        self.body["status"].as_str().unwrap_or("<no status>")
    }

    pub fn correlation_id(&self) -> Option<&str> {
        self.props.correlation_id().as_ref().map(|c| c.as_str())
    }

    pub fn header(&self, name: &str) -> Option<AMQPValue> {
        self.props
            .headers()
            .as_ref()
            .and_then(|h| h.inner().get(name).cloned())
    }

    pub fn header_text(&self, name: &str) -> Option<String> {
        self.header(name)
            .as_ref()
            .and_then(txq::broker::header_text)
    }
}

/// A producer/requester: declares, publishes with confirms, collects replies, and
/// deletes its queues when dropped.
pub struct Client {
    pub conn: Arc<Connection>,
    pub channel: Channel,
    queues: Vec<String>,
}

impl Client {
    pub async fn new() -> Client {
        let conn = broker().await;
        let channel = conn.create_channel().await.expect("channel");
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirm mode");
        Client {
            conn: Arc::new(conn),
            channel,
            queues: Vec::new(),
        }
    }

    /// Declares a durable classic queue as the worker does, and owns it.
    pub async fn queue(&mut self, name: &str) -> String {
        let mut args = FieldTable::default();
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("classic".into()),
        );
        self.declare(name, args).await;
        // A worker on this queue declares its dead-letter and retry queues beside it.
        self.queues.push(name.to_owned());
        self.queues.push(format!("{name}.dlq"));
        for delay in TEST_DELAYS {
            self.queues.push(txq::broker::retry_queue_name(name, delay));
        }
        name.to_owned()
    }

    /// Declares a durable queue with `args` of the test's choosing; [`Client::own`]
    /// it for cleanup.
    pub async fn declare(&self, name: &str, args: FieldTable) {
        self.channel
            .queue_declare(
                name.into(),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                args,
            )
            .await
            .expect("queue.declare");
    }

    /// Deletes `name` with the client's other queues (for queues declared with
    /// arguments of their own).
    pub fn own(&mut self, name: &str) {
        self.queues.push(name.to_owned());
    }

    /// Publishes and waits for the broker's confirm.
    pub async fn publish(&self, queue: &str, request: &Request) {
        self.publish_all(queue, std::slice::from_ref(request)).await;
    }

    /// Publishes many, pipelining the confirms.
    pub async fn publish_all(&self, queue: &str, requests: &[Request]) {
        for chunk in requests.chunks(500) {
            let mut confirms = Vec::with_capacity(chunk.len());
            for r in chunk {
                let confirm = self
                    .channel
                    .basic_publish(
                        "".into(),
                        queue.into(),
                        BasicPublishOptions::default(),
                        &r.body,
                        r.properties(),
                    )
                    .await
                    .expect("basic.publish");
                confirms.push(confirm);
            }
            for c in confirms {
                assert!(
                    c.await.expect("confirm").is_ack(),
                    "broker nacked a request"
                );
            }
        }
    }

    /// Consumes `n` replies from `queue` (acking them), failing the test after
    /// [`REPLY_DEADLINE`].
    pub async fn replies(&self, queue: &str, n: usize) -> Vec<Reply> {
        self.replies_while(queue, n, &mut NoWorker).await
    }

    /// As [`Client::replies`], failing at once if `worker` dies meanwhile.
    pub async fn replies_while(
        &self,
        queue: &str,
        n: usize,
        worker: &mut impl Alive,
    ) -> Vec<Reply> {
        let channel = self.conn.create_channel().await.expect("channel");
        let tag = unique("collector");
        let mut consumer = channel
            .basic_consume(
                queue.into(),
                tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("basic.consume");
        let mut out = Vec::with_capacity(n);
        let deadline = tokio::time::Instant::now() + REPLY_DEADLINE;
        while out.len() < n {
            let tick = tokio::time::Instant::now() + Duration::from_millis(200);
            let delivery = match tokio::time::timeout_at(tick.min(deadline), consumer.next()).await
            {
                Ok(Some(Ok(d))) => d,
                Ok(other) => panic!("reply consumer ended: {other:?}"),
                Err(_) => {
                    if let Some(why) = worker.dead() {
                        panic!("{why} while waiting for replies ({} of {n})", out.len());
                    }
                    assert!(
                        tokio::time::Instant::now() < deadline,
                        "only {} of {n} replies arrived in {REPLY_DEADLINE:?}",
                        out.len()
                    );
                    continue;
                }
            };
            delivery.ack(BasicAckOptions::default()).await.expect("ack");
            out.push(Reply::from(&delivery));
        }
        channel
            .basic_cancel(tag.as_str().into(), BasicCancelOptions::default())
            .await
            .expect("basic.cancel");
        let _ = channel.close(200, "done".into()).await;
        out
    }

    /// Messages ready in `queue` (not counting unacked ones).
    pub async fn depth(&self, queue: &str) -> u32 {
        let channel = self.conn.create_channel().await.expect("channel");
        let q = channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("passive queue.declare");
        let _ = channel.close(200, "done".into()).await;
        q.message_count()
    }
}

/// Publishes `body` with `props` as they are (properties no [`Request`] sets) on a
/// confirm-mode `channel`, and requires the broker's ack.
pub async fn publish_raw(channel: &Channel, queue: &str, body: &[u8], props: BasicProperties) {
    let confirm = channel
        .basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions::default(),
            body,
            props,
        )
        .await
        .expect("basic.publish")
        .await
        .expect("confirm");
    assert!(confirm.is_ack(), "the broker nacked the message");
}

impl Drop for Client {
    fn drop(&mut self) {
        let queues = std::mem::take(&mut self.queues);
        on_fresh_runtime(async move {
            let url = amqp_url();
            if let Ok(conn) = Connection::connect(&url, ConnectionProperties::default()).await {
                if let Ok(ch) = conn.create_channel().await {
                    for q in queues {
                        let _ = ch
                            .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                            .await;
                    }
                }
                let _ = conn.close(200, "cleanup".into()).await;
            }
        });
    }
}

/// Groups replies by status.
pub fn by_status(replies: &[Reply]) -> HashMap<String, usize> {
    let mut m = HashMap::new();
    for r in replies {
        *m.entry(r.status().to_owned()).or_insert(0) += 1;
    }
    m
}

/// Collects replies in the background, so a test can act (kill, cut) while they
/// arrive and await progress instead of sleeping.
pub struct Collector {
    replies: Arc<std::sync::Mutex<Vec<Reply>>>,
    count: tokio::sync::watch::Receiver<usize>,
    task: JoinHandle<()>,
}

impl Collector {
    pub async fn start(client: &Client, queue: &str) -> Collector {
        let channel = client.conn.create_channel().await.expect("channel");
        let mut consumer = channel
            .basic_consume(
                queue.into(),
                unique("collector").as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("basic.consume");
        let replies = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (tx, count) = tokio::sync::watch::channel(0);
        let sink = replies.clone();
        let task = tokio::spawn(async move {
            let _channel = channel;
            while let Some(Ok(d)) = consumer.next().await {
                let _ = d.ack(BasicAckOptions::default()).await;
                let n = {
                    let mut all = sink.lock().expect("replies");
                    all.push(Reply::from(&d));
                    all.len()
                };
                let _ = tx.send(n);
            }
        });
        Collector {
            replies,
            count,
            task,
        }
    }

    /// Waits until `n` replies (duplicates included) have arrived.
    pub async fn wait_for(&mut self, n: usize) {
        self.wait_while(n, &mut NoWorker).await;
    }

    /// As [`Collector::wait_for`], failing at once if `worker` dies meanwhile.
    pub async fn wait_while(&mut self, n: usize, worker: &mut impl Alive) {
        self.until(&format!("{n} replies"), |got| got.len() >= n, worker)
            .await;
    }

    /// Waits until `done(replies so far)`, named `what` in a failure.
    pub async fn wait_until(&mut self, what: &str, done: impl Fn(&[Reply]) -> bool) {
        self.until(what, done, &mut NoWorker).await;
    }

    /// Waits until a reply for every one of `ids` (correlation ids) has arrived.
    pub async fn wait_for_ids(&mut self, ids: &HashSet<String>) {
        self.wait_for_ids_while(ids, &mut NoWorker).await;
    }

    /// As [`Collector::wait_for_ids`], failing at once if `worker` dies meanwhile.
    pub async fn wait_for_ids_while(&mut self, ids: &HashSet<String>, worker: &mut impl Alive) {
        let all_seen = |got: &[Reply]| {
            let seen: HashSet<&str> = got.iter().filter_map(|r| r.correlation_id()).collect();
            ids.iter().all(|id| seen.contains(id.as_str()))
        };
        self.until(&format!("replies to {} ids", ids.len()), all_seen, worker)
            .await;
    }

    /// Waits, on each new reply, until `done(replies so far)`; checks `worker`
    /// between replies.
    async fn until(
        &mut self,
        what: &str,
        done: impl Fn(&[Reply]) -> bool,
        worker: &mut impl Alive,
    ) {
        let deadline = tokio::time::Instant::now() + REPLY_DEADLINE;
        loop {
            if done(&self.replies.lock().expect("replies")) {
                return;
            }
            let got = *self.count.borrow();
            if let Some(why) = worker.dead() {
                panic!("{why} while waiting for {what} ({got} replies so far)");
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out after {REPLY_DEADLINE:?} waiting for {what} ({got} replies so far)"
            );
            // The next reply, or a look at the worker now and then.
            let tick = Duration::from_millis(200);
            if let Ok(Err(_)) = tokio::time::timeout(tick, self.count.changed()).await {
                // The consumer ended: no event will come; keep to the deadline.
                tokio::time::sleep(tick).await;
            }
        }
    }

    pub fn snapshot(&self) -> Vec<Reply> {
        self.replies.lock().expect("replies").clone()
    }

    pub fn stop(self) -> Vec<Reply> {
        self.task.abort();
        self.snapshot()
    }
}

/// Runs `rabbitmqctl` against the test broker's node; panics with its output on failure.
pub async fn rabbitmqctl(args: &[&str]) -> String {
    let out = tokio::process::Command::new("rabbitmqctl")
        .args(args)
        .output()
        .await
        .unwrap_or_else(|e| {
            panic!("running rabbitmqctl {args:?}: {e} (is rabbitmq-server installed?)")
        });
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A RabbitMQ user of the test's own, with full rights on `/`; deleted on drop.
pub struct RabbitUser {
    pub name: String,
    pub password: String,
}

impl RabbitUser {
    pub async fn create() -> RabbitUser {
        let name = unique("user");
        let password = uuid::Uuid::new_v4().simple().to_string();
        rabbitmqctl(&["add_user", &name, &password]).await;
        rabbitmqctl(&["set_permissions", "-p", "/", &name, ".*", ".*", ".*"]).await;
        RabbitUser { name, password }
    }

    /// The test broker's URL, logged in as this user.
    pub fn url(&self) -> String {
        let mut url = url::Url::parse(&amqp_url()).expect("AMQP URL");
        url.set_username(&self.name).expect("user");
        url.set_password(Some(&self.password)).expect("password");
        url.to_string()
    }
}

impl Drop for RabbitUser {
    fn drop(&mut self) {
        let name = self.name.clone();
        on_fresh_runtime(async move {
            let _ = tokio::process::Command::new("rabbitmqctl")
                .args(["delete_user", &name])
                .output()
                .await;
        });
    }
}

/// Random transfers between `accounts` accounts, each with its own message_id
/// and correlation_id (`c-<i>`), replying to `replies`.
pub fn transfers(n: usize, accounts: i64, replies: &str) -> Vec<Request> {
    use rand::Rng as _;
    let mut rng = rand::rng();
    (0..n)
        .map(|i| {
            let from = rng.random_range(1..=accounts);
            let to = loop {
                let to = rng.random_range(1..=accounts);
                if to != from {
                    break to;
                }
            };
            Request::json(
                "transfer",
                serde_json::json!({"from": from, "to": to, "amount": rng.random_range(1..=100)}),
            )
            .id(&format!("m-{i}-{}", unique("x")))
            .correlation(&format!("c-{i}"))
            .reply_to(replies)
        })
        .collect()
}

pub fn correlation_ids(n: usize) -> HashSet<String> {
    (0..n).map(|i| format!("c-{i}")).collect()
}
