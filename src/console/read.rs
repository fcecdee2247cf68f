//! What the pages read from the broker: queue depths and consumers over AMQP (a
//! passive declare, which costs the broker nothing however long the queue), and
//! rates from the management API when `management_url` is set.

use std::time::Duration;

use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;

use crate::broker::{QueueRates, Topology, queue_rates, retry_queue_name};
use crate::config::{Config, SecretUrl};

/// How long one read from the broker may take before the page shows it as unknown.
const READ_TIMEOUT: Duration = Duration::from_secs(3);

/// One of txq's queues, as the overview shows it.
#[derive(Debug, Clone)]
pub(crate) struct QueueInfo {
    pub(crate) role: &'static str,
    pub(crate) name: String,
    pub(crate) messages: Option<u32>,
    pub(crate) consumers: Option<u32>,
    pub(crate) rates: Option<QueueRates>,
    /// Why the counts are missing (no such queue, broker down).
    pub(crate) problem: Option<String>,
}

/// One AMQP connection, opened on first use and again after it is lost.
pub(crate) struct Broker {
    url: SecretUrl,
    management: Option<SecretUrl>,
    vhost: String,
    topology: Topology,
    connection: tokio::sync::Mutex<Option<lapin::Connection>>,
}

impl Broker {
    pub(crate) fn new(config: &Config) -> Self {
        Self {
            url: config.amqp_url.clone(),
            management: config.management_url.clone(),
            vhost: config.vhost(),
            topology: Topology::from_config(config),
            connection: tokio::sync::Mutex::new(None),
        }
    }

    pub(crate) fn topology(&self) -> &Topology {
        &self.topology
    }

    /// txq's queues by role: requests, each retry delay's queue, dead letters,
    /// replies and batch completions.
    pub(crate) fn queue_names(&self) -> Vec<(&'static str, String)> {
        let t = &self.topology;
        let mut names = vec![("requests", t.request_queue.clone())];
        let mut delays = t.retry_delays.clone();
        delays.dedup();
        for d in delays {
            names.push(("retry", retry_queue_name(&t.request_queue, d)));
        }
        names.push(("dead letters", t.dead_letter_queue.clone()));
        if let Some(r) = &t.reply_queue {
            names.push(("replies", r.clone()));
        }
        if let Some(b) = &t.batch_completion_queue {
            names.push(("batch completions", b.clone()));
        }
        names
    }

    async fn channel(&self) -> Result<lapin::Channel, String> {
        let mut held = self.connection.lock().await;
        if held.as_ref().is_none_or(|c| !c.status().connected()) {
            let opened = tokio::time::timeout(
                READ_TIMEOUT,
                crate::broker::connect(self.url.expose(), "txq-console"),
            )
            .await
            .map_err(|_| "RabbitMQ did not answer in time".to_owned())?
            .map_err(|e| e.to_string())?;
            *held = Some(opened);
        }
        let connection = held.as_ref().ok_or("not connected")?;
        match tokio::time::timeout(READ_TIMEOUT, connection.create_channel()).await {
            Ok(Ok(channel)) => Ok(channel),
            Ok(Err(e)) => Err(format!("opening a channel: {e}")),
            Err(_) => {
                // A connection that does not answer is dropped, so the next
                // read opens a fresh one.
                *held = None;
                Err("RabbitMQ did not open a channel in time".into())
            }
        }
    }

    /// Depth and consumers of each queue (a missing queue or a broker that is down
    /// shows as a problem, not an error page), and rates when the management API
    /// is configured.
    pub(crate) async fn queues(&self) -> Vec<QueueInfo> {
        let mut out = Vec::new();
        let mut channel = None;
        let mut unreachable: Option<String> = None;
        for (role, name) in self.queue_names() {
            let mut info = QueueInfo {
                role,
                name,
                messages: None,
                consumers: None,
                rates: None,
                problem: None,
            };
            if let Some(why) = &unreachable {
                info.problem = Some(why.clone());
            } else if channel.is_none() {
                match self.channel().await {
                    Ok(c) => channel = Some(c),
                    Err(e) => {
                        // One wait per page, not one per queue.
                        unreachable = Some(e.clone());
                        info.problem = Some(e);
                    }
                }
            }
            if let Some(c) = &channel {
                let declared = tokio::time::timeout(
                    READ_TIMEOUT,
                    c.queue_declare(
                        info.name.as_str().into(),
                        QueueDeclareOptions {
                            passive: true,
                            ..QueueDeclareOptions::default()
                        },
                        FieldTable::default(),
                    ),
                )
                .await;
                match declared {
                    Ok(Ok(q)) => {
                        info.messages = Some(q.message_count());
                        info.consumers = Some(q.consumer_count());
                    }
                    Ok(Err(e)) => {
                        // A failed passive declare closes the channel.
                        info.problem = Some(not_found_or(&e));
                        channel = None;
                    }
                    Err(_) => {
                        info.problem = Some("RabbitMQ did not answer in time".into());
                        channel = None;
                    }
                }
            }
            out.push(info);
        }
        if let Some(c) = channel {
            let _ = c.close(200, "bye".into()).await;
        }
        if let Some(management) = &self.management {
            let rates = futures_util::future::join_all(out.iter().map(|q| {
                tokio::time::timeout(READ_TIMEOUT, queue_rates(management, &self.vhost, &q.name))
            }))
            .await;
            for (q, r) in out.iter_mut().zip(rates) {
                q.rates = r.ok().and_then(Result::ok).flatten();
            }
        }
        out
    }
}

fn not_found_or(e: &lapin::Error) -> String {
    let text = e.to_string();
    if text.contains("NOT_FOUND") || text.contains("404") {
        "not declared yet (no worker has started on it)".into()
    } else {
        text
    }
}
