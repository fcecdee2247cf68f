//! One request through the whole pipeline on each backend.

use serde_json::json;
use txq::{Backend, Worker};

use crate::bank;
use crate::support::{Request, RunningWorker, bank_env, config};

async fn a_transfer_round_trips(backend: Backend) {
    let (test_db, client, requests, replies) = bank_env(backend, 10).await;

    let worker = RunningWorker::start(
        Worker::builder(config(&test_db.url, &requests, &replies, 4))
            .handler("transfer", bank::Transfer)
            .database(test_db.db.clone()),
    )
    .await;
    let request = Request::json("transfer", json!({"from": 1, "to": 2, "amount": 40}))
        .id("m-1")
        .correlation("c-1")
        .reply_to(&replies);
    client.publish(&requests, &request).await;

    let reply = client.replies(&replies, 1).await.remove(0);
    assert_eq!(
        reply.body,
        json!({"status": "ok", "result": {
            "from": {"id": 1, "balance": bank::INITIAL_BALANCE - 40},
            "to": {"id": 2, "balance": bank::INITIAL_BALANCE + 40}}})
    );
    assert_eq!(reply.correlation_id(), Some("c-1"));
    assert_eq!(reply.header_text("x-txq-status").as_deref(), Some("ok"));
    assert_eq!(
        reply.header_text("x-txq-request-id").as_deref(),
        Some("m-1")
    );
    assert_eq!(
        reply.header("x-txq-attempts"),
        Some(lapin::types::AMQPValue::LongLongInt(1))
    );
    assert_eq!(
        reply.props.content_type().as_ref().map(|c| c.as_str()),
        Some("application/json")
    );
    let reply_id = reply.props.message_id().as_ref().map(|m| m.to_string());
    assert!(
        reply_id.is_some_and(|id| id != "m-1"),
        "a reply has a fresh message_id"
    );

    worker.stop().await.expect("clean stop");
    let totals = bank::totals(&test_db.db).await.expect("totals");
    assert_eq!(totals.transfers, 1);
    assert_eq!(totals.balance_sum, 10 * bank::INITIAL_BALANCE);
    assert_eq!(client.depth(&requests).await, 0, "the request was acked");
}

#[tokio::test]
async fn a_transfer_round_trips_on_sqlite() {
    a_transfer_round_trips(Backend::Sqlite).await;
}

#[tokio::test]
async fn a_transfer_round_trips_on_mariadb() {
    a_transfer_round_trips(Backend::MySql).await;
}

#[tokio::test]
async fn a_transfer_round_trips_on_postgres() {
    a_transfer_round_trips(Backend::Postgres).await;
}
