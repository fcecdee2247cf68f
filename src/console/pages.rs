//! The console's pages but the dead letters' (`dead_letters.rs`): the frame every
//! page shares, the overview, workers, inbox, batches, login and assets. Each
//! handler reads through the library (the fleet, inbox and batch tables) and
//! renders one template.

use std::collections::BTreeMap;

use askama::Template;
use axum::Extension;
use axum::extract::{Form, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use serde::Deserialize;

use super::State as AppState;
use super::auth::{Actor, COOKIE};
use crate::db::batch::{self, rfc3339};
use crate::db::{fleet, inbox};

/// The longest filter value or id accepted: longer ones are refused, not searched.
pub(super) const MAX_FIELD: usize = 1024;
/// Bytes of a body the message page shows.
const MAX_BODY_SHOWN: usize = 64 * 1024;
/// Bars of the overview's chart: one a minute.
const CHART_MINUTES: i64 = 60;

/// What every page's frame shows.
pub(super) struct Base {
    pub(super) title: &'static str,
    pub(super) actor: String,
    pub(super) read_only: bool,
    pub(super) csrf: String,
    pub(super) logout: bool,
    /// Reload every few seconds (the script does it; without it, nothing).
    pub(super) refresh: bool,
}

impl Base {
    pub(super) fn new(state: &AppState, actor: &Actor, title: &'static str) -> Self {
        Self {
            title,
            actor: actor.name.clone(),
            read_only: state.config.console.read_only,
            csrf: state.csrf(actor).to_owned(),
            logout: !state.config.console.tokens.is_empty(),
            refresh: false,
        }
    }
}

pub(super) fn render(t: &impl Template) -> Response {
    render_as(StatusCode::OK, t)
}

/// The page with `status`; a page that cannot be rendered is a 500 whatever the
/// status was to be.
pub(super) fn render_as(status: StatusCode, t: &impl Template) -> Response {
    match t.render() {
        Ok(html) => (status, Html(html)).into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("rendering the page: {e}\n"),
        )
            .into_response(),
    }
}

pub(super) fn bad_request(why: impl Into<String>) -> Response {
    (StatusCode::BAD_REQUEST, format!("{}\n", why.into())).into_response()
}

fn now_ms() -> i64 {
    crate::db::now_ms()
}

fn ago(ms: i64, now: i64) -> String {
    let s = (now - ms).max(0) / 1000;
    match s {
        0..60 => format!("{s}s ago"),
        60..3600 => format!("{}m ago", s / 60),
        3600..86_400 => format!("{}h ago", s / 3600),
        _ => format!("{}d ago", s / 86_400),
    }
}

// ---------------------------------------------------------------------------
// Overview and workers

struct WorkerView {
    id: String,
    host: String,
    pid: i64,
    version: String,
    queue: String,
    started: String,
    last_seen: String,
    in_flight: String,
    settled: i64,
    reconnects: i64,
    gone: bool,
}

impl WorkerView {
    fn new(w: &fleet::WorkerRow, now: i64) -> Self {
        Self {
            id: w.id.clone(),
            host: w.host.clone(),
            pid: w.pid,
            version: w.version.clone(),
            queue: w.queue.clone(),
            started: rfc3339(w.started_at_ms),
            last_seen: ago(w.last_seen_ms, now),
            in_flight: format!("{}/{}", w.in_flight, w.concurrency),
            settled: w.settled,
            reconnects: w.reconnects,
            gone: w.is_gone(now),
        }
    }
}

struct QueueRow {
    role: &'static str,
    name: String,
    messages: String,
    consumers: String,
    rates: String,
    problem: String,
    dead_letters: bool,
}

struct Bar {
    x: i64,
    ok_y: i64,
    ok_h: i64,
    rejected_y: i64,
    rejected_h: i64,
    dead_y: i64,
    dead_h: i64,
    title: String,
}

struct Chart {
    bars: Vec<Bar>,
    max: i64,
    ok: i64,
    rejected: i64,
    dead_lettered: i64,
    retried: i64,
}

const CHART_HEIGHT: i64 = 120;
const BAR_WIDTH: i64 = 10;

impl Chart {
    fn new(minutes: &[fleet::Minute], now: i64) -> Self {
        let first = (now / 60_000 - (CHART_MINUTES - 1)) * 60_000;
        let mut by_minute = vec![(0i64, 0i64, 0i64); CHART_MINUTES as usize];
        let (mut ok, mut rejected, mut dead_lettered, mut retried) = (0, 0, 0, 0);
        for m in minutes {
            let i = (m.minute_ms - first) / 60_000;
            if let Some(slot) = usize::try_from(i).ok().and_then(|i| by_minute.get_mut(i)) {
                *slot = (m.ok, m.rejected, m.dead_lettered);
                ok += m.ok;
                rejected += m.rejected;
                dead_lettered += m.dead_lettered;
                retried += m.retried;
            }
        }
        let max = by_minute
            .iter()
            .map(|(a, b, c)| a + b + c)
            .max()
            .unwrap_or(0)
            .max(1);
        let scale = |n: i64| n * CHART_HEIGHT / max;
        let bars = by_minute
            .iter()
            .enumerate()
            .map(|(i, &(o, r, d))| {
                let (ok_h, rejected_h, dead_h) = (scale(o), scale(r), scale(d));
                let ok_y = CHART_HEIGHT - ok_h;
                let rejected_y = ok_y - rejected_h;
                let at = first + i as i64 * 60_000;
                Bar {
                    x: i as i64 * BAR_WIDTH,
                    ok_y,
                    ok_h,
                    rejected_y,
                    rejected_h,
                    dead_y: rejected_y - dead_h,
                    dead_h,
                    title: format!(
                        "{}: {o} ok, {r} rejected, {d} dead-lettered",
                        &rfc3339(at)[11..16]
                    ),
                }
            })
            .collect();
        Self {
            bars,
            max,
            ok,
            rejected,
            dead_lettered,
            retried,
        }
    }
}

#[derive(Template)]
#[template(path = "console/overview.html")]
struct OverviewPage {
    base: Base,
    queues: Vec<QueueRow>,
    workers: Vec<WorkerView>,
    chart: Chart,
    problems: Vec<String>,
}

pub(crate) async fn overview(
    State(state): State<AppState>,
    Extension(actor): Extension<Actor>,
) -> Response {
    let now = now_ms();
    let mut problems = Vec::new();
    let dlq = state.broker.topology().dead_letter_queue.clone();
    let (queues, workers, minutes) = tokio::join!(
        state.broker.queues(),
        fleet::workers(&state.db),
        fleet::throughput(&state.db, now - CHART_MINUTES * 60_000),
    );
    let workers = workers.unwrap_or_else(|e| {
        problems.push(format!("reading the workers: {e}"));
        Vec::new()
    });
    let minutes = minutes.unwrap_or_else(|e| {
        problems.push(format!("reading the throughput: {e}"));
        Vec::new()
    });
    let queues = queues
        .into_iter()
        .map(|q| QueueRow {
            role: q.role,
            dead_letters: q.name == dlq,
            messages: q.messages.map_or("?".into(), |n| n.to_string()),
            consumers: q.consumers.map_or("?".into(), |n| n.to_string()),
            rates: q.rates.map_or(String::new(), |r| {
                format!(
                    "in {:.1}/s · out {:.1}/s · acked {:.1}/s",
                    r.publish, r.deliver, r.ack
                )
            }),
            problem: q.problem.unwrap_or_default(),
            name: q.name,
        })
        .collect();
    let mut base = Base::new(&state, &actor, "Overview");
    base.refresh = true;
    render(&OverviewPage {
        base,
        queues,
        workers: workers
            .iter()
            .filter(|w| !w.is_gone(now))
            .map(|w| WorkerView::new(w, now))
            .collect(),
        chart: Chart::new(&minutes, now),
        problems,
    })
}

#[derive(Template)]
#[template(path = "console/workers.html")]
struct WorkersPage {
    base: Base,
    workers: Vec<WorkerView>,
    problem: String,
}

pub(crate) async fn workers(
    State(state): State<AppState>,
    Extension(actor): Extension<Actor>,
) -> Response {
    let now = now_ms();
    let (workers, problem) = match fleet::workers(&state.db).await {
        Ok(w) => (
            w.iter().map(|w| WorkerView::new(w, now)).collect(),
            String::new(),
        ),
        Err(e) => (Vec::new(), format!("reading the workers: {e}")),
    };
    let mut base = Base::new(&state, &actor, "Workers");
    base.refresh = true;
    render(&WorkersPage {
        base,
        workers,
        problem,
    })
}

/// A body as text: JSON pretty-printed, other UTF-8 as is, anything else lossy;
/// cut at [`MAX_BODY_SHOWN`]. The note says what was done to it.
pub(super) fn show_body(body: &[u8]) -> (String, String) {
    let shown = &body[..body.len().min(MAX_BODY_SHOWN)];
    let cut = if body.len() > MAX_BODY_SHOWN {
        format!(", first {MAX_BODY_SHOWN} shown")
    } else {
        String::new()
    };
    if body.len() <= MAX_BODY_SHOWN
        && let Ok(v) = serde_json::from_slice::<serde_json::Value>(body)
    {
        let pretty = serde_json::to_string_pretty(&v).unwrap_or_default();
        return (pretty, format!("JSON, {} bytes", body.len()));
    }
    match std::str::from_utf8(shown) {
        Ok(s) => (s.to_owned(), format!("text, {} bytes{cut}", body.len())),
        Err(_) => (
            String::from_utf8_lossy(shown).into_owned(),
            format!(
                "{} bytes, not UTF-8 (shown with U+FFFD in place of bad bytes){cut}",
                body.len()
            ),
        ),
    }
}

/// `?id=…`.
#[derive(Debug, Deserialize)]
pub(crate) struct IdQuery {
    #[serde(default)]
    pub(super) id: String,
}

// ---------------------------------------------------------------------------
// Inbox and batches

#[derive(Template)]
#[template(path = "console/inbox.html")]
struct InboxPage {
    base: Base,
    id: String,
    looked: bool,
    found: bool,
    job_type: String,
    status: String,
    attempts: i64,
    created: String,
    reply: String,
    problem: String,
}

pub(crate) async fn inbox(
    State(state): State<AppState>,
    Extension(actor): Extension<Actor>,
    Query(q): Query<IdQuery>,
) -> Response {
    if q.id.len() > MAX_FIELD {
        return bad_request(format!("a message_id is at most {MAX_FIELD} bytes"));
    }
    let mut page = InboxPage {
        base: Base::new(&state, &actor, "Inbox"),
        looked: !q.id.is_empty(),
        id: q.id,
        found: false,
        job_type: String::new(),
        status: String::new(),
        attempts: 0,
        created: String::new(),
        reply: String::new(),
        problem: String::new(),
    };
    if page.looked {
        match inbox::find(&state.db, &page.id).await {
            Ok(Some(r)) => {
                page.found = true;
                page.job_type = r.job_type;
                page.status = r.status;
                page.attempts = r.attempts;
                page.created = rfc3339(r.created_at_ms);
                page.reply = r.reply.map(|b| show_body(&b).0).unwrap_or_default();
            }
            Ok(None) => {}
            Err(e) => page.problem = format!("reading the inbox: {e}"),
        }
    }
    let status = if page.looked && !page.found && page.problem.is_empty() {
        StatusCode::NOT_FOUND
    } else {
        StatusCode::OK
    };
    render_as(status, &page)
}

struct BatchRow {
    id: String,
    size: i64,
    ok: i64,
    rejected: i64,
    failed: i64,
    done: i64,
    percent: i64,
    revision: i64,
    opened: String,
    completed: String,
}

#[derive(Template)]
#[template(path = "console/batches.html")]
struct BatchesPage {
    base: Base,
    open_only: bool,
    id: String,
    rows: Vec<BatchRow>,
    problem: String,
}

#[derive(Debug, Deserialize)]
pub(crate) struct BatchQuery {
    #[serde(default)]
    id: String,
    #[serde(default)]
    open: Option<String>,
}

pub(crate) async fn batches(
    State(state): State<AppState>,
    Extension(actor): Extension<Actor>,
    Query(q): Query<BatchQuery>,
) -> Response {
    if q.id.len() > MAX_FIELD {
        return bad_request(format!("a batch id is at most {MAX_FIELD} bytes"));
    }
    let open_only = q.open.is_some_and(|o| !o.is_empty());
    let read = if q.id.is_empty() {
        batch::list(&state.db, open_only, 200).await
    } else {
        batch::status(&state.db, &q.id)
            .await
            .map(|b| b.into_iter().collect())
    };
    let (rows, problem) = match read {
        Ok(list) => (
            list.into_iter()
                .map(|b| BatchRow {
                    done: b.done(),
                    percent: if b.size > 0 {
                        b.done() * 100 / b.size
                    } else {
                        0
                    },
                    id: b.batch_id,
                    size: b.size,
                    ok: b.ok,
                    rejected: b.rejected,
                    failed: b.failed,
                    revision: b.revision,
                    opened: rfc3339(b.opened_at_ms),
                    completed: b.completed_at_ms.map(rfc3339).unwrap_or_default(),
                })
                .collect(),
            String::new(),
        ),
        Err(e) => (Vec::new(), format!("reading the batches: {e}")),
    };
    let status = if !q.id.is_empty() && rows.is_empty() && problem.is_empty() {
        StatusCode::NOT_FOUND
    } else {
        StatusCode::OK
    };
    let mut base = Base::new(&state, &actor, "Batches");
    base.refresh = true;
    let page = BatchesPage {
        base,
        open_only,
        id: q.id,
        rows,
        problem,
    };
    render_as(status, &page)
}

// ---------------------------------------------------------------------------
// Login, assets, metrics

#[derive(Template)]
#[template(path = "console/login.html")]
struct LoginPage {
    csrf: String,
    failed: bool,
}

pub(crate) async fn login_form(State(state): State<AppState>) -> Response {
    render(&LoginPage {
        csrf: state.login_csrf().to_owned(),
        failed: false,
    })
}

#[derive(Debug, Deserialize)]
pub(crate) struct LoginForm {
    #[serde(default)]
    token: String,
    #[serde(default)]
    csrf: String,
}

pub(crate) async fn login(State(state): State<AppState>, Form(form): Form<LoginForm>) -> Response {
    if !super::auth::same(&form.csrf, state.login_csrf()) {
        return (StatusCode::FORBIDDEN, "the form's CSRF token is wrong\n").into_response();
    }
    if state.login_throttled() {
        return (
            StatusCode::TOO_MANY_REQUESTS,
            "too many failed logins in the last minute: wait, then try again\n",
        )
            .into_response();
    }
    let Some((session, name)) = state.log_in(&form.token) else {
        let page = LoginPage {
            csrf: state.login_csrf().to_owned(),
            failed: true,
        };
        return render_as(StatusCode::UNAUTHORIZED, &page);
    };
    crate::events::console_login(&name);
    let cookie = format!("{COOKIE}={session}; HttpOnly; SameSite=Strict; Path=/");
    ([(header::SET_COOKIE, cookie)], Redirect::to("/")).into_response()
}

pub(crate) async fn logout(
    State(state): State<AppState>,
    Extension(actor): Extension<Actor>,
    headers: axum::http::HeaderMap,
    Form(form): Form<BTreeMap<String, String>>,
) -> Response {
    let csrf = form.get("csrf").map_or("", String::as_str);
    if !actor.bearer && !super::auth::same(csrf, state.csrf(&actor)) {
        return (StatusCode::FORBIDDEN, "the form's CSRF token is wrong\n").into_response();
    }
    if let Some(session) = super::auth::session_cookie(&headers) {
        state.log_out(session);
    }
    let cookie = format!("{COOKIE}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0");
    ([(header::SET_COOKIE, cookie)], Redirect::to("/login")).into_response()
}

pub(crate) async fn css() -> Response {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
        include_str!("console.css"),
    )
        .into_response()
}

pub(crate) async fn js() -> Response {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        include_str!("console.js"),
    )
        .into_response()
}

pub(crate) async fn metrics(State(state): State<AppState>) -> Response {
    match &state.metrics {
        Some(m) => (
            [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
            m.render(),
        )
            .into_response(),
        None => (StatusCode::NOT_FOUND, "no metrics recorder\n").into_response(),
    }
}

pub(crate) async fn not_found() -> Response {
    (StatusCode::NOT_FOUND, "no such page\n").into_response()
}
