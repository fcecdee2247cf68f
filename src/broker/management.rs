//! What AMQP cannot show: the policies RabbitMQ applies to txq's queues, read from
//! the management API (`management_url`) at start-up — the virtual host's policies,
//! matched as RabbitMQ matches them, so a queue not declared yet is covered — and
//! held against what txq relies on. A queue's own arguments are checked by the broker itself when txq
//! declares it (another value is refused, naming the queue); a policy is not.
//!
//! Arguments win over policies for the dead-letter settings and `x-overflow`;
//! for the numeric limits (`max-length`, `delivery-limit`) the lower value
//! applies. So a policy can make a queue drop messages txq relies on keeping —
//! that stops the start — or only change how it behaves — that is a warning.

use std::time::Duration;

use http_body_util::{BodyExt as _, Empty};
use hyper::body::Bytes;
use serde_json::Value;

use super::Topology;
use crate::config::{QueueType, SecretUrl};

/// How long the management API may take to answer.
const TIMEOUT: Duration = Duration::from_secs(10);

/// Why the check could not be made, or what it found that txq cannot run with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyError {
    /// The management API did not answer as expected.
    #[error("the RabbitMQ management API at {url}: {problem}")]
    Unreachable {
        /// `management_url`, redacted.
        url: String,
        /// What went wrong.
        problem: String,
    },
    /// A policy makes a queue lose messages txq relies on.
    #[error("{0}")]
    Dangerous(String),
}

/// What the check found, short of a reason to stop.
#[derive(Debug, Default)]
pub struct PolicyReport {
    /// Policies that change behaviour without losing anything; log them.
    pub warnings: Vec<String>,
}

/// Finds the policy that applies to each of txq's queues, from the virtual host's
/// policies (so that it is known before a queue exists), and judges it.
pub async fn check_policies(
    management_url: &SecretUrl,
    vhost: &str,
    topology: &Topology,
) -> Result<PolicyReport, PolicyError> {
    let policies = get(management_url, &["api", "policies", vhost])
        .await?
        .unwrap_or(Value::Null);
    let policies = policies.as_array().cloned().unwrap_or_default();
    let mut report = PolicyReport::default();
    let mut dangers = Vec::new();
    let queues = [
        (&topology.request_queue, Role::Requests),
        (&topology.dead_letter_queue, Role::DeadLetters),
    ];
    for (queue, role) in queues {
        let Some(policy) = applying(&policies, queue, topology.queue_type) else {
            continue;
        };
        let name = policy["name"].as_str().unwrap_or("").to_owned();
        let (danger, warn) = judge(role, topology, &policy["definition"]);
        let named = |what: String| format!("queue `{queue}`, policy `{name}`: {what}");
        dangers.extend(danger.into_iter().map(named));
        report.warnings.extend(warn.into_iter().map(named));
    }
    if dangers.is_empty() {
        Ok(report)
    } else {
        Err(PolicyError::Dangerous(dangers.join("; ")))
    }
}

/// The policy RabbitMQ applies to `queue`: of those whose pattern matches its name
/// and that apply to its kind of queue, the one of highest priority.
fn applying(policies: &[Value], queue: &str, queue_type: QueueType) -> Option<Value> {
    let kinds: &[&str] = match queue_type {
        QueueType::Classic => &["all", "queues", "classic_queues"],
        QueueType::Quorum => &["all", "queues", "quorum_queues"],
    };
    policies
        .iter()
        .filter(|p| kinds.contains(&p["apply-to"].as_str().unwrap_or("all")))
        .filter(|p| {
            p["pattern"]
                .as_str()
                .and_then(|pattern| regex::Regex::new(pattern).ok())
                .is_some_and(|re| re.is_match(queue))
        })
        .max_by_key(|p| p["priority"].as_i64().unwrap_or(0))
        .cloned()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Requests,
    DeadLetters,
}

/// What in a queue's effective policy loses messages (first) or only changes
/// behaviour (second).
fn judge(role: Role, topology: &Topology, policy: &Value) -> (Vec<String>, Vec<String>) {
    let (mut danger, mut warn) = (Vec::new(), Vec::new());
    let quorum = topology.queue_type == QueueType::Quorum;
    let has = |key: &str| policy.get(key).is_some_and(|v| !v.is_null());
    if has("expires") {
        danger.push("`expires` deletes the queue, with what it holds, once unused".into());
    }
    match role {
        Role::Requests => {
            // On quorum, txq's own dead-letter route and reject-publish win.
            for key in ["max-length", "max-length-bytes"] {
                if has(key) && quorum {
                    warn.push(format!(
                        "`{key}` makes the broker refuse new requests when full"
                    ));
                } else if has(key) {
                    danger.push(format!(
                        "`{key}` drops the oldest requests when full (a classic queue has no \
                         dead-letter route from txq)"
                    ));
                }
            }
            if has("message-ttl") && quorum {
                warn.push("`message-ttl` sends requests not taken in time to the DLQ".into());
            } else if has("message-ttl") {
                danger.push("`message-ttl` drops requests not taken in time".into());
            }
            if let Some(limit) = policy.get("delivery-limit").and_then(Value::as_i64) {
                if quorum && limit >= 0 && limit < i64::from(topology.delivery_limit) {
                    warn.push(format!(
                        "`delivery-limit` {limit} is lower than txq's {}: requests reach the \
                         DLQ after fewer deliveries",
                        topology.delivery_limit
                    ));
                }
            }
        }
        Role::DeadLetters => {
            for key in ["max-length", "max-length-bytes", "message-ttl"] {
                if has(key) {
                    danger.push(format!("`{key}` discards dead letters"));
                }
            }
            if policy
                .get("delivery-limit")
                .and_then(Value::as_i64)
                .is_some_and(|n| n >= 0)
                && quorum
            {
                danger.push(
                    "`delivery-limit` drops dead letters that `txq dlq` read often enough".into(),
                );
            }
        }
    }
    (danger, warn)
}

/// `GET` of an API path, as JSON; `None` on 404.
/// A queue's message rates over the broker's last sampling interval, per second.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct QueueRates {
    /// Messages published into the queue.
    pub publish: f64,
    /// Messages delivered to consumers.
    pub deliver: f64,
    /// Messages acked by consumers.
    pub ack: f64,
}

/// `queue`'s rates from the management API; `None` when the queue does not exist.
pub async fn queue_rates(
    management_url: &SecretUrl,
    vhost: &str,
    queue: &str,
) -> Result<Option<QueueRates>, PolicyError> {
    let Some(q) = get(management_url, &["api", "queues", vhost, queue]).await? else {
        return Ok(None);
    };
    let rate = |key: &str| {
        q.pointer(&format!("/message_stats/{key}_details/rate"))
            .and_then(Value::as_f64)
            .unwrap_or(0.0)
    };
    Ok(Some(QueueRates {
        publish: rate("publish"),
        deliver: rate("deliver_get"),
        ack: rate("ack"),
    }))
}

async fn get(management_url: &SecretUrl, segments: &[&str]) -> Result<Option<Value>, PolicyError> {
    let failed = |problem: String| PolicyError::Unreachable {
        url: management_url.to_string(),
        problem,
    };
    let base = url::Url::parse(management_url.expose()).map_err(|e| failed(e.to_string()))?;
    let mut url = base.clone();
    url.set_username("")
        .map_err(|()| failed("not an http URL".into()))?;
    url.set_password(None)
        .map_err(|()| failed("not an http URL".into()))?;
    url.path_segments_mut()
        .map_err(|()| failed("not an http URL".into()))?
        .pop_if_empty()
        .extend(segments);
    let host = url.host_str().unwrap_or("127.0.0.1").to_owned();
    let port = url.port_or_known_default().unwrap_or(15672);
    let credentials = format!(
        "{}:{}",
        percent_decode(base.username()),
        percent_decode(base.password().unwrap_or(""))
    );
    let auth = format!(
        "Basic {}",
        base64::Engine::encode(&base64::engine::general_purpose::STANDARD, credentials)
    );
    let path = match url.query() {
        Some(q) => format!("{}?{q}", url.path()),
        None => url.path().to_owned(),
    };
    let request = hyper::Request::get(path)
        .header(hyper::header::HOST, format!("{host}:{port}"))
        .header(hyper::header::AUTHORIZATION, auth)
        .body(Empty::<Bytes>::new())
        .map_err(|e| failed(e.to_string()))?;
    let exchange = async {
        let stream = tokio::net::TcpStream::connect((host.as_str(), port))
            .await
            .map_err(|e| failed(e.to_string()))?;
        let io = hyper_util::rt::TokioIo::new(stream);
        let (mut sender, connection) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(|e| failed(e.to_string()))?;
        tokio::spawn(connection);
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| failed(e.to_string()))?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| failed(e.to_string()))?
            .to_bytes();
        Ok::<_, PolicyError>((status, body))
    };
    let (status, body) = tokio::time::timeout(TIMEOUT, exchange)
        .await
        .map_err(|_| failed(format!("no answer within {TIMEOUT:?}")))??;

    match status.as_u16() {
        200 => serde_json::from_slice(&body)
            .map(Some)
            .map_err(|e| failed(format!("not JSON: {e}"))),
        404 => Ok(None),
        other => Err(failed(format!(
            "HTTP {other}: {}",
            String::from_utf8_lossy(&body).trim()
        ))),
    }
}

fn percent_decode(s: &str) -> String {
    url::form_urlencoded::parse(format!("x={s}").as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn topology(queue_type: QueueType) -> Topology {
        Topology {
            request_queue: "q".into(),
            queue_type,
            reply_queue: None,
            batch_completion_queue: None,
            dead_letter_queue: "q.dlq".into(),
            retry_delays: vec![],
            delivery_limit: 20,
        }
    }

    #[test]
    fn the_matching_policy_of_highest_priority_applies() {
        let policies = vec![
            json!({"name": "low", "pattern": "^q", "apply-to": "all", "priority": 0,
                   "definition": {"max-length": 1}}),
            json!({"name": "high", "pattern": "^q$", "apply-to": "queues", "priority": 5,
                   "definition": {"expires": 1}}),
            json!({"name": "quorum-only", "pattern": ".*", "apply-to": "quorum_queues",
                   "priority": 9, "definition": {}}),
            json!({"name": "exchanges", "pattern": ".*", "apply-to": "exchanges",
                   "priority": 10, "definition": {}}),
        ];
        let name = |q, t| applying(&policies, q, t).map(|p| p["name"].clone());
        assert_eq!(name("q", QueueType::Classic), Some(json!("high")));
        assert_eq!(name("q.dlq", QueueType::Classic), Some(json!("low")));
        assert_eq!(name("q", QueueType::Quorum), Some(json!("quorum-only")));
        assert_eq!(name("other", QueueType::Classic), None);
    }

    #[test]
    fn policies_that_lose_messages_stop_and_the_rest_warn() {
        let classic = topology(QueueType::Classic);
        let quorum = topology(QueueType::Quorum);
        let (danger, _) = judge(Role::Requests, &classic, &json!({"max-length": 10}));
        assert_eq!(danger.len(), 1, "classic drops the oldest");
        let (danger, warn) = judge(Role::Requests, &quorum, &json!({"max-length": 10}));
        assert!(
            danger.is_empty() && warn.len() == 1,
            "quorum refuses new ones"
        );
        let (danger, warn) = judge(Role::Requests, &quorum, &json!({"delivery-limit": 2}));
        assert!(danger.is_empty() && warn.len() == 1);
        let (danger, warn) = judge(Role::Requests, &quorum, &json!({"delivery-limit": 50}));
        assert!(danger.is_empty() && warn.is_empty());
        let (danger, _) = judge(Role::Requests, &quorum, &json!({"expires": 1000}));
        assert_eq!(danger.len(), 1);
        let (danger, _) = judge(Role::DeadLetters, &quorum, &json!({"delivery-limit": 20}));
        assert_eq!(danger.len(), 1, "dead letters read by txq dlq would go");
        let (danger, _) = judge(Role::DeadLetters, &classic, &json!({"message-ttl": 60000}));
        assert_eq!(danger.len(), 1);
        let (danger, warn) = judge(Role::Requests, &classic, &json!({"ha-mode": "all"}));
        assert!(danger.is_empty() && warn.is_empty());
        assert_eq!(
            judge(Role::Requests, &classic, &Value::Null),
            (vec![], vec![])
        );
    }
}
