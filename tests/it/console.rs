//! `txq console`: every route over HTTP (bad input, escaping, the security rules),
//! and an operator's session in a real browser (headless Chromium over
//! WebDriver): a dead-letter group made by real failures, replayed after the
//! cause is fixed, its replies arriving and the group gone. The browser test
//! saves a screenshot of each page to `target/console-screenshots/`.

use std::collections::HashSet;
use std::process::Stdio;
use std::time::Duration;

use lapin::BasicProperties;
use lapin::options::BasicPublishOptions;
use lapin::types::{AMQPValue, FieldTable};
use serde_json::json;
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, BufReader};
use txq::{Backend, Worker};

use crate::bank;
use crate::support::{
    Client, Collector, RunningWorker, TestDb, amqp_url, bank_env, config, eventually, exec,
    transfers, unique,
};

/// A `txq console` process on a port of its own.
struct Console {
    child: tokio::process::Child,
    base: String,
}

impl Console {
    /// Starts `txq console --listen 127.0.0.1:0 <args>` for request queue `queue`
    /// on `db_url`, and waits for the line that says where it listens.
    async fn start(queue: &str, db_url: &str, env: &[(&str, &str)], args: &[&str]) -> Console {
        let mut child = console_command(queue, db_url, env, args)
            .spawn()
            .expect("spawning txq console");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        let line = tokio::time::timeout(Duration::from_secs(60), lines.next_line()).await;
        let Ok(Ok(Some(line))) = line else {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ =
                    tokio::time::timeout(Duration::from_secs(5), e.read_to_string(&mut err)).await;
            }
            panic!("txq console did not say where it listens: {line:?}; stderr: {err}");
        };
        let base = line
            .strip_prefix("txq console on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .trim_end_matches('/')
            .to_owned();
        Console { child, base }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Stops it (SIGTERM) and returns what it logged.
    async fn stop(mut self) -> String {
        if let Some(pid) = self.child.id() {
            let _ = tokio::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status()
                .await;
        }
        let mut err = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = tokio::time::timeout(Duration::from_secs(30), e.read_to_string(&mut err)).await;
        }
        let status = tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .expect("the console stops on SIGTERM")
            .expect("wait");
        assert!(status.success(), "console exit {status:?}: {err}");
        err
    }
}

fn console_command(
    queue: &str,
    db_url: &str,
    env: &[(&str, &str)],
    args: &[&str],
) -> tokio::process::Command {
    let mut cmd = crate::support::txq_command();
    cmd.arg("console")
        .args(args)
        .env("TXQ_CONSOLE__LISTEN", "127.0.0.1:0")
        .env("TXQ_AMQP_URL", amqp_url())
        .env("TXQ_QUEUE", queue)
        .env("TXQ_DATABASE_URL", db_url)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

/// An HTTP client that shows redirects instead of following them.
fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("HTTP client")
}

async fn get(url: &str) -> (u16, String) {
    let r = http().get(url).send().await.expect("GET");
    let status = r.status().as_u16();
    (status, r.text().await.expect("body"))
}

/// The value of a page's hidden field `name`.
fn field(page: &str, name: &str) -> String {
    let marker = format!("name=\"{name}\" value=\"");
    let at = page
        .find(&marker)
        .unwrap_or_else(|| panic!("no `{name}` field in {page}"));
    let rest = &page[at + marker.len()..];
    rest[..rest.find('"').expect("closing quote")].to_owned()
}

/// The CSRF token a page's forms carry.
fn csrf_of(page: &str) -> String {
    field(page, "csrf")
}

/// Dead letters as a worker writes them, with `error` and a body of our choosing.
async fn publish_dead(
    client: &Client,
    dlq: &str,
    id: &str,
    job_type: &str,
    error: &str,
    body: &[u8],
) {
    publish_dead_from(
        client,
        dlq,
        id,
        Some(job_type),
        Some("nowhere"),
        error,
        body,
    )
    .await;
}

/// As [`publish_dead`], with or without a type and an original queue.
async fn publish_dead_from(
    client: &Client,
    dlq: &str,
    id: &str,
    job_type: Option<&str>,
    original_queue: Option<&str>,
    error: &str,
    body: &[u8],
) {
    let mut h = FieldTable::default();
    let text = |s: &str| AMQPValue::LongString(s.into());
    h.insert("x-txq-error-kind".into(), text("database_error"));
    h.insert("x-txq-error".into(), text(error));
    h.insert("x-txq-attempts".into(), AMQPValue::LongLongInt(3));
    h.insert("x-txq-failed-at".into(), text("2026-01-02T03:04:05.000Z"));
    if let Some(q) = original_queue {
        h.insert("x-txq-original-queue".into(), text(q));
    }
    let mut props = BasicProperties::default()
        .with_message_id(id.into())
        .with_delivery_mode(2)
        .with_headers(h);
    if let Some(t) = job_type {
        props = props.with_type(t.into());
    }
    let confirm = client
        .channel
        .basic_publish(
            "".into(),
            dlq.into(),
            BasicPublishOptions::default(),
            body,
            props,
        )
        .await
        .expect("publish");
    assert!(confirm.await.expect("confirm").is_ack());
}

/// A token of the console's, as long as one must be.
const ALICE: &str = "s3cret-alice-0123456789";

const EVIL: &str = "<script>alert('x')</script>";

/// Whether `page` shows a `<script` tag as text (either way of escaping it).
fn shows_escaped(page: &str, prefix: &str) -> bool {
    ["&lt;script&gt;", "&#60;script&#62;"]
        .iter()
        .any(|tag| page.contains(&format!("{prefix}{tag}")))
}

#[tokio::test]
async fn every_route_answers_escapes_what_it_shows_and_refuses_bad_input() {
    let test_db = TestDb::new(Backend::Sqlite).await;
    let mut client = Client::new().await;
    let requests = client.queue(&unique("requests")).await;
    let dlq = format!("{requests}.dlq");
    client.declare(&dlq, FieldTable::default()).await;
    let evil_id = format!("{EVIL}-{}", unique("id"));
    publish_dead(
        &client,
        &dlq,
        &evil_id,
        EVIL,
        &format!("boom {EVIL}"),
        EVIL.as_bytes(),
    )
    .await;
    publish_dead(
        &client,
        &dlq,
        "plain-1",
        "transfer",
        "no such table",
        b"{\"a\":1}",
    )
    .await;
    let console = Console::start(&requests, &test_db.url, &[], &[]).await;

    let (status, page) = get(&console.url("/")).await;
    assert_eq!(status, 200, "{page}");
    assert!(
        page.contains(&requests),
        "the request queue is listed: {page}"
    );
    assert!(page.contains(&dlq));
    let r = http().get(console.url("/")).send().await.expect("GET");
    let csp = r.headers().get("content-security-policy").expect("a CSP");
    assert!(
        csp.to_str()
            .expect("text")
            .contains("frame-ancestors 'none'")
    );

    for path in [
        "/workers",
        "/batches",
        "/batches?open=1",
        "/inbox",
        "/dead-letters/messages",
        "/static/console.css",
        "/static/console.js",
        "/metrics",
        "/login",
    ] {
        let (status, page) = get(&console.url(path)).await;
        assert_eq!(status, 200, "{path}: {page}");
    }
    // Script in a type, an error, a message_id and a payload is shown as text.
    let (status, page) = get(&console.url("/dead-letters")).await;
    assert_eq!(status, 200, "{page}");
    assert!(!page.contains(EVIL), "unescaped: {page}");
    assert!(shows_escaped(&page, ""), "{page}");
    assert!(page.contains("2 matching"), "{page}");
    let evil_url = console.url(&format!(
        "/dead-letters/message?id={}",
        url::form_urlencoded::byte_serialize(evil_id.as_bytes()).collect::<String>()
    ));
    let (status, page) = get(&evil_url).await;
    assert_eq!(status, 200, "{page}");
    assert!(!page.contains(EVIL), "unescaped: {page}");
    assert!(shows_escaped(&page, "boom "), "{page}");
    // Filters select.
    let (_, page) = get(&console.url("/dead-letters/messages?type=transfer")).await;
    assert!(
        page.contains("plain-1") && !shows_escaped(&page, ""),
        "{page}"
    );

    // Unknown ids.
    for path in [
        "/dead-letters/message?id=nope",
        "/inbox?id=nope",
        "/batches?id=nope",
        "/no/such/page",
    ] {
        let (status, _) = get(&console.url(path)).await;
        assert_eq!(status, 404, "{path}");
    }
    // Bad input: huge filters, a missing id, an unknown action, a bad number.
    let huge = "x".repeat(5000);
    for path in [
        format!("/dead-letters?grep={huge}"),
        format!("/dead-letters/messages?type={huge}"),
        format!("/inbox?id={huge}"),
        "/dead-letters/message".to_owned(),
        "/dead-letters/confirm?action=explode".to_owned(),
        "/dead-letters?sample=-1".to_owned(),
    ] {
        let (status, body) = get(&console.url(&path)).await;
        assert_eq!(status, 400, "{}: {body}", &path[..path.len().min(60)]);
    }
    // A replay the confirmation counted: nothing else is moved.
    let (status, page) =
        get(&console.url("/dead-letters/confirm?action=purge&type=transfer")).await;
    assert_eq!(status, 200, "{page}");
    assert!(page.contains("delete <strong>1</strong>"), "{page}");
    let (csrf, confirmation) = (csrf_of(&page), field(&page, "confirmation"));
    let purge = || {
        http().post(console.url("/dead-letters/purge")).form(&[
            ("csrf", csrf.as_str()),
            ("confirmation", confirmation.as_str()),
            ("expected", "1"),
            ("type", "transfer"),
        ])
    };
    let r = purge().send().await.expect("POST");
    assert_eq!(r.status().as_u16(), 200);
    assert!(
        r.text()
            .await
            .expect("body")
            .contains("<strong id=\"moved\">1</strong>")
    );
    assert_eq!(
        client.depth(&dlq).await,
        1,
        "only the confirmed message went"
    );
    // The same confirmation again (a reload of the result, a double click): refused.
    let r = purge().send().await.expect("POST");
    assert_eq!(r.status().as_u16(), 409);
    assert_eq!(client.depth(&dlq).await, 1);
    // A form posted from another site, with every field right, is refused.
    let (_, page) = get(&console.url("/dead-letters/confirm?action=purge")).await;
    let r = http()
        .post(console.url("/dead-letters/purge"))
        .header("origin", "http://evil.example")
        .form(&[
            ("csrf", csrf_of(&page).as_str()),
            ("confirmation", field(&page, "confirmation").as_str()),
            ("expected", "1"),
        ])
        .send()
        .await
        .expect("POST");
    assert_eq!(r.status().as_u16(), 403);
    assert_eq!(client.depth(&dlq).await, 1);
    // A page of another site whose name now points at 127.0.0.1 (DNS rebinding)
    // gets nothing from a console without tokens.
    let r = http()
        .get(console.url("/dead-letters"))
        .header("host", "evil.example")
        .send()
        .await
        .expect("GET");
    assert_eq!(r.status().as_u16(), 421);
    let log = console.stop().await;
    assert!(
        log.contains("console action") && log.contains("actor=local") && log.contains("moved=1"),
        "the action is logged with who and how many: {log}"
    );
}

#[tokio::test]
async fn off_loopback_needs_a_token_posts_need_csrf_and_read_only_hides_actions() {
    let test_db = TestDb::new(Backend::Sqlite).await;
    let mut client = Client::new().await;
    let requests = client.queue(&unique("requests")).await;
    let dlq = format!("{requests}.dlq");
    client.declare(&dlq, FieldTable::default()).await;
    for i in 0..3 {
        publish_dead(
            &client,
            &dlq,
            &format!("m-{i}"),
            "transfer",
            "no such table",
            b"{}",
        )
        .await;
    }

    // No token, not loopback: it refuses to start, and says why.
    let anywhere = [("TXQ_CONSOLE__LISTEN", "0.0.0.0:0")];
    let out = console_command(&requests, &test_db.url, &anywhere, &[])
        .output()
        .await
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no access token is configured"), "{err}");

    // A token too short to withstand guessing: it refuses to start.
    let weak = [("TXQ_CONSOLE__TOKENS__BOB", "short")];
    let out = console_command(&requests, &test_db.url, &weak, &[])
        .output()
        .await
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("`bob` is shorter than 16 bytes"), "{err}");

    let tokens = [("TXQ_CONSOLE__TOKENS__ALICE", ALICE)];
    let console = Console::start(&requests, &test_db.url, &tokens, &[]).await;
    // No token, or a wrong one: to the login page; a POST is refused.
    let r = http().get(console.url("/")).send().await.expect("GET");
    assert_eq!(r.status().as_u16(), 303);
    assert_eq!(r.headers()["location"], "/login");
    let r = http()
        .get(console.url("/dead-letters"))
        .bearer_auth("wrong")
        .send()
        .await
        .expect("GET");
    assert_eq!(r.status().as_u16(), 401);
    let r = http()
        .post(console.url("/dead-letters/purge"))
        .form(&[("expected", "3")])
        .send()
        .await
        .expect("POST");
    assert_eq!(r.status().as_u16(), 401);
    // The bearer header.
    let r = http()
        .get(console.url("/dead-letters"))
        .bearer_auth(ALICE)
        .send()
        .await
        .expect("GET");
    assert_eq!(r.status().as_u16(), 200);
    let page = r.text().await.expect("body");
    assert!(page.contains("alice"), "who is shown: {page}");
    let csrf = csrf_of(&page);

    // Log in: the cookie then stands for the token.
    let (_, login) = get(&console.url("/login")).await;
    let r = http()
        .post(console.url("/login"))
        .form(&[("csrf", csrf_of(&login).as_str()), ("token", ALICE)])
        .send()
        .await
        .expect("POST");
    assert_eq!(r.status().as_u16(), 303);
    let cookie = r.headers()["set-cookie"].to_str().expect("text").to_owned();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    let cookie = cookie.split(';').next().expect("pair").to_owned();
    assert!(
        !cookie.contains(ALICE),
        "the cookie is a session, not the token"
    );
    let with_cookie = |req: reqwest::RequestBuilder| req.header("cookie", cookie.clone());
    let r = with_cookie(http().get(console.url("/")))
        .send()
        .await
        .expect("GET");
    assert_eq!(r.status().as_u16(), 200);
    // A POST with the cookie but without (or with a wrong) CSRF token is refused,
    // and moves nothing.
    for form in [
        vec![("expected", "3")],
        vec![("expected", "3"), ("csrf", "forged")],
    ] {
        let r = with_cookie(http().post(console.url("/dead-letters/purge")))
            .form(&form)
            .send()
            .await
            .expect("POST");
        assert_eq!(r.status().as_u16(), 403, "{form:?}");
    }
    assert_eq!(client.depth(&dlq).await, 3);
    // With the CSRF token and a confirmation it acts, as alice.
    let page = with_cookie(http().get(console.url("/dead-letters/confirm?action=purge&id=m-0")))
        .send()
        .await
        .expect("GET")
        .text()
        .await
        .expect("body");
    assert_eq!(csrf_of(&page), csrf, "one CSRF token a session's name");
    let r = with_cookie(http().post(console.url("/dead-letters/purge")))
        .form(&[
            ("expected", "1"),
            ("csrf", csrf.as_str()),
            ("id", "m-0"),
            ("confirmation", field(&page, "confirmation").as_str()),
        ])
        .send()
        .await
        .expect("POST");
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(client.depth(&dlq).await, 2);
    let metrics = http()
        .get(console.url("/metrics"))
        .bearer_auth(ALICE)
        .send()
        .await
        .expect("GET")
        .text()
        .await
        .expect("body");
    assert!(
        metrics.contains("txq_console_actions_total{action=\"purge\",actor=\"alice\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("txq_console_messages_moved_total{action=\"purge\"} 1"),
        "{metrics}"
    );
    // Log out: the cookie is cleared.
    let r = with_cookie(http().post(console.url("/logout")))
        .form(&[("csrf", csrf.as_str())])
        .send()
        .await
        .expect("POST");
    assert_eq!(r.status().as_u16(), 303);
    assert!(
        r.headers()["set-cookie"]
            .to_str()
            .expect("text")
            .contains("Max-Age=0")
    );
    // The session is closed on the server too: the old cookie no longer works.
    let r = with_cookie(http().get(console.url("/")))
        .send()
        .await
        .expect("GET");
    assert_eq!(r.status().as_u16(), 303);
    // Guessing: after 10 wrong tokens in a minute, logins are refused for a while,
    // the right token included.
    let (_, login) = get(&console.url("/login")).await;
    let login_with = |token: &'static str| {
        http()
            .post(console.url("/login"))
            .form(&[("csrf", csrf_of(&login)), ("token", token.to_owned())])
    };
    for _ in 0..10 {
        let r = login_with("not-a-token-at-all").send().await.expect("POST");
        assert_eq!(r.status().as_u16(), 401);
    }
    let r = login_with(ALICE).send().await.expect("POST");
    assert_eq!(r.status().as_u16(), 429);
    let log = console.stop().await;
    assert!(log.contains("actor=alice"), "{log}");

    // Read-only: no action is shown, and none is taken.
    let console = Console::start(&requests, &test_db.url, &[], &["--read-only"]).await;
    let (status, page) = get(&console.url("/dead-letters")).await;
    assert_eq!(status, 200);
    assert!(page.contains("2 matching"), "{page}");
    assert!(
        !page.contains("Replay") && !page.contains("Purge"),
        "{page}"
    );
    let (status, _) = get(&console.url("/dead-letters/confirm?action=purge")).await;
    assert_eq!(status, 403);
    assert!(!page.contains("name=\"csrf\""), "no form acts: {page}");
    let r = http()
        .post(console.url("/dead-letters/purge"))
        .form(&[("expected", "2")])
        .send()
        .await
        .expect("POST");
    assert_eq!(r.status().as_u16(), 403);
    assert!(r.text().await.expect("body").contains("read-only"));
    let r = http()
        .post(console.url("/dead-letters/replay"))
        .body("not a form")
        .send()
        .await
        .expect("POST");
    assert_eq!(r.status().as_u16(), 403, "read-only whatever the body");
    assert_eq!(client.depth(&dlq).await, 2);
    console.stop().await;
}

/// A group's actions move exactly that group: a group without a type does not
/// widen to typed messages with the same error, and a replay moves as many as
/// its confirmation counted even when skipped messages (no original queue) come
/// first.
#[tokio::test]
async fn a_group_is_acted_on_exactly_as_confirmed() {
    let test_db = TestDb::new(Backend::Sqlite).await;
    let mut client = Client::new().await;
    let requests = client.queue(&unique("requests")).await;
    let target = client.queue(&unique("target")).await;
    let dlq = format!("{requests}.dlq");
    client.declare(&dlq, FieldTable::default()).await;
    let dead = |id: &'static str, t: Option<&'static str>, q: Option<&'static str>| (id, t, q);
    for (id, job_type, original) in [
        dead("skip-1", Some("transfer"), None),
        dead("skip-2", Some("transfer"), None),
        dead("go-1", Some("transfer"), Some("T")),
        dead("go-2", Some("transfer"), Some("T")),
        dead("untyped-1", None, Some("T")),
        dead("untyped-2", None, Some("T")),
    ] {
        let original = original.map(|_| target.as_str());
        publish_dead_from(
            &client,
            &dlq,
            id,
            job_type,
            original,
            "no such table",
            b"{}",
        )
        .await;
    }
    let console = Console::start(&requests, &test_db.url, &[], &[]).await;
    let (_, page) = get(&console.url("/dead-letters")).await;
    assert!(page.contains("6 matching"), "{page}");
    // The untyped group's purge counts its two, not the four typed ones too.
    let link = "/dead-letters/confirm?action=purge&amp;";
    let untyped = page
        .split(link)
        .map(|rest| {
            rest.split('"')
                .next()
                .unwrap_or_default()
                .replace("&#38;", "&")
        })
        .find(|q| q.contains("untyped=1"))
        .unwrap_or_else(|| panic!("no group without a type: {page}"));
    let (_, confirm) =
        get(&console.url(&format!("/dead-letters/confirm?action=purge&{untyped}"))).await;
    assert!(confirm.contains("delete <strong>2</strong>"), "{confirm}");
    // The typed group's replay: two would be replayed, two skipped; both move.
    let (_, confirm) = get(&console.url("/dead-letters/confirm?action=replay&type=transfer")).await;
    assert!(
        confirm.contains("republish <strong>2</strong>"),
        "{confirm}"
    );
    assert!(
        confirm.contains("2 more match but would be skipped"),
        "{confirm}"
    );
    let r = http()
        .post(console.url("/dead-letters/replay"))
        .form(&[
            ("csrf", csrf_of(&confirm).as_str()),
            ("confirmation", field(&confirm, "confirmation").as_str()),
            ("expected", "2"),
            ("type", "transfer"),
        ])
        .send()
        .await
        .expect("POST");
    assert_eq!(r.status().as_u16(), 200);
    assert!(
        r.text()
            .await
            .expect("body")
            .contains("<strong id=\"moved\">2</strong>")
    );
    assert_eq!(
        client.depth(&target).await,
        2,
        "the two replayable ones moved"
    );
    assert_eq!(client.depth(&dlq).await, 4);
    console.stop().await;
}

// ---------------------------------------------------------------------------
// The browser

/// A chromedriver on a free port, stopped on drop.
struct Driver {
    child: tokio::process::Child,
    port: u16,
}

impl Driver {
    async fn start() -> Driver {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let child = tokio::process::Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "chromedriver could not be started ({e}): the browser tests need Chromium and its driver; install them with `apt-get install chromium chromium-driver` (.ci/run does)"
                )
            });
        eventually("chromedriver to listen", || async {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .ok()
                .map(|_| ())
        })
        .await;
        Driver { child, port }
    }

    async fn browser(&self) -> fantoccini::Client {
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            json!({"args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1000"]}),
        );
        fantoccini::ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(caps)
            .connect(&format!("http://127.0.0.1:{}", self.port))
            .await
            .expect("a WebDriver session")
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

/// Saves the page as `target/console-screenshots/NAME.png`; with
/// `TXQ_UPDATE_SCREENSHOTS=1`, also as the README's `docs/console/NAME.png`.
async fn screenshot(browser: &fantoccini::Client, name: &str) {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let png = browser.screenshot().await.expect("screenshot");
    let mut dirs = vec![root.join("target/console-screenshots")];
    if std::env::var_os("TXQ_UPDATE_SCREENSHOTS").is_some_and(|v| v == "1") {
        dirs.push(root.join("docs/console"));
    }
    for dir in dirs {
        std::fs::create_dir_all(&dir).expect("screenshot directory");
        std::fs::write(dir.join(format!("{name}.png")), &png).expect("writing the screenshot");
    }
}

/// The text of the element `css`, waiting for it to appear.
async fn text_of(browser: &fantoccini::Client, css: &str) -> String {
    browser
        .wait()
        .at_most(Duration::from_secs(30))
        .for_element(fantoccini::Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("no `{css}` on the page: {e}"))
        .text()
        .await
        .expect("text")
}

#[tokio::test]
async fn an_operator_replays_a_dead_letter_group_in_a_real_browser() {
    const JOBS: usize = 12;
    const ACCOUNTS: i64 = 20;
    let (test_db, client, requests, replies) = bank_env(Backend::MySql, ACCOUNTS).await;
    // Real failures: the table the transfers write to is missing.
    exec(
        &test_db.db,
        "ALTER TABLE transfers RENAME TO transfers_parked",
    )
    .await;
    let mut cfg = config(&test_db.url, &requests, &replies, 4);
    cfg.heartbeat = Duration::from_millis(200);
    let worker = RunningWorker::start(
        Worker::builder(cfg)
            .handler("transfer", bank::Transfer)
            .database(test_db.db.clone()),
    )
    .await;
    let batch = transfers(JOBS, ACCOUNTS, &replies);
    client.publish_all(&requests, &batch).await;
    let failed = client.replies(&replies, JOBS).await;
    assert!(failed.iter().all(|r| r.status() == "failed"), "{failed:?}");
    let dlq = format!("{requests}.dlq");
    assert_eq!(client.depth(&dlq).await, JOBS as u32);

    // The worker's topology, so every queue the overview lists exists.
    let env = [
        ("TXQ_RETRY__DELAYS", "[100ms,300ms]"),
        ("TXQ_REPLY_QUEUE", replies.as_str()),
    ];
    let console = Console::start(&requests, &test_db.url, &env, &[]).await;
    let driver = Driver::start().await;
    let browser = driver.browser().await;

    // The overview: the queues, the live worker, the chart.
    browser.goto(&console.url("/")).await.expect("goto");
    let queues = text_of(&browser, "#queues").await;
    assert!(
        queues.contains(&requests) && queues.contains(&dlq),
        "{queues}"
    );
    let workers = text_of(&browser, "#workers").await;
    assert!(workers.contains(&requests), "the worker is live: {workers}");
    screenshot(&browser, "overview").await;
    browser.goto(&console.url("/workers")).await.expect("goto");
    text_of(&browser, "#workers").await;
    screenshot(&browser, "workers").await;

    // The dead letters, grouped: one cause, all twelve.
    browser
        .find(fantoccini::Locator::LinkText("Dead letters"))
        .await
        .expect("nav link")
        .click()
        .await
        .expect("click");
    let group = text_of(&browser, "#groups tr.group").await;
    assert!(
        group.starts_with(&JOBS.to_string())
            && group.contains("transfer")
            && group.contains("database_error"),
        "{group}"
    );
    screenshot(&browser, "dead-letters").await;
    browser
        .find(fantoccini::Locator::LinkText("Messages"))
        .await
        .expect("the group's messages")
        .click()
        .await
        .expect("click");
    let listed = text_of(&browser, "#messages").await;
    let first = batch[0].message_id.clone().expect("message_id");
    assert!(listed.contains(&first), "{listed}");
    screenshot(&browser, "messages").await;
    browser
        .find(fantoccini::Locator::Css("#messages tbody a"))
        .await
        .expect("a message link")
        .click()
        .await
        .expect("click");
    let payload = text_of(&browser, "#payload").await;
    assert!(payload.contains("\"amount\""), "{payload}");
    let error = text_of(&browser, "#error").await;
    assert!(!error.is_empty());
    screenshot(&browser, "message").await;

    // Fix the cause, then replay the group, through the confirmation step.
    exec(
        &test_db.db,
        "ALTER TABLE transfers_parked RENAME TO transfers",
    )
    .await;
    let mut collector = Collector::start(&client, &replies).await;
    browser
        .goto(&console.url("/dead-letters"))
        .await
        .expect("goto");
    browser
        .find(fantoccini::Locator::Css("#groups a.replay"))
        .await
        .expect("the replay link")
        .click()
        .await
        .expect("click");
    let count = text_of(&browser, "#count").await;
    assert!(
        count.contains(&format!("republish {JOBS} message")),
        "{count}"
    );
    screenshot(&browser, "confirm").await;
    browser
        .find(fantoccini::Locator::Id("confirm"))
        .await
        .expect("the confirm button")
        .click()
        .await
        .expect("click");
    let moved = text_of(&browser, "#moved").await;
    assert_eq!(moved, JOBS.to_string());
    screenshot(&browser, "replayed").await;

    // The replies arrive, each transfer applied once, and the group is gone.
    let ids: HashSet<String> = (0..JOBS).map(|i| format!("c-{i}")).collect();
    collector.wait_for_ids(&ids).await;
    assert!(collector.snapshot().iter().all(|r| r.status() == "ok"));
    let totals = bank::totals(&test_db.db).await.expect("totals");
    assert_eq!(totals.transfers, JOBS as i64);
    browser
        .goto(&console.url("/dead-letters"))
        .await
        .expect("goto");
    text_of(&browser, "#no-groups").await;
    screenshot(&browser, "dead-letters-empty").await;

    // The inbox answers for a replayed message.
    browser
        .goto(&console.url(&format!("/inbox?id={first}")))
        .await
        .expect("goto");
    assert_eq!(text_of(&browser, "#inbox-status").await, "ok");
    screenshot(&browser, "inbox").await;

    // A batch, open then complete, on its page.
    let batch_id = unique("batch");
    let members: Vec<_> = transfers(3, ACCOUNTS, &replies)
        .into_iter()
        .enumerate()
        .map(|(i, r)| r.batch(&batch_id, 3).correlation(&format!("b-{i}")))
        .collect();
    client.publish_all(&requests, &members).await;
    eventually("the batch to complete", || async {
        txq::db::batch::status(&test_db.db, &batch_id)
            .await
            .ok()
            .flatten()
            .filter(|b| b.complete())
    })
    .await;
    browser.goto(&console.url("/batches")).await.expect("goto");
    let batches = text_of(&browser, "#batches").await;
    assert!(batches.contains(&batch_id), "{batches}");
    screenshot(&browser, "batches").await;

    browser.close().await.expect("closing the browser");
    console.stop().await;
    worker.stop().await.expect("clean stop");
}
