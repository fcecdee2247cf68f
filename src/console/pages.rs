//! The console's pages and actions. Each handler reads through the library (the
//! fleet and inbox tables, [`crate::tools::dlq`]) and renders one template;
//! actions go through [`super::Console::may_act`] first and are logged and
//! counted as events ([`crate::events::console_action`]).

use std::collections::BTreeMap;

use askama::Template;
use axum::Extension;
use axum::extract::{Form, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use serde::Deserialize;

use super::State as AppState;
use super::auth::{Actor, COOKIE, Refusal};
use crate::db::batch::{self, rfc3339};
use crate::db::{fleet, inbox};
use crate::tools::dlq::{self, DeadLetter, Filter, Grouper, ReplayOptions, Target};

/// The longest filter value or id accepted: longer ones are refused, not searched.
const MAX_FIELD: usize = 1024;
/// Dead letters the groups page samples by default, and at most.
const SAMPLE: u64 = 1000;
const MAX_SAMPLE: u64 = 20_000;
/// Messages a confirmation, a list or a lookup reads at most from the head of
/// the queue: a long queue is sampled, never read whole for a page.
const MAX_SCAN: u64 = 20_000;
/// Messages a list page shows.
const PAGE: u64 = 50;
/// Bytes of a body the message page shows.
const MAX_BODY_SHOWN: usize = 64 * 1024;
/// Bars of the overview's chart: one a minute.
const CHART_MINUTES: i64 = 60;

/// What every page's frame shows.
struct Base {
    title: &'static str,
    actor: String,
    read_only: bool,
    csrf: String,
    logout: bool,
    /// Reload every few seconds (the script does it; without it, nothing).
    refresh: bool,
}

impl Base {
    fn new(state: &AppState, actor: &Actor, title: &'static str) -> Self {
        Self {
            title,
            actor: actor.name.clone(),
            read_only: state.read_only,
            csrf: state.csrf(actor).to_owned(),
            logout: !state.tokens.is_empty(),
            refresh: false,
        }
    }
}

fn render(t: &impl Template) -> Response {
    match t.render() {
        Ok(html) => Html(html).into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("rendering the page: {e}\n"),
        )
            .into_response(),
    }
}

fn bad_request(why: impl Into<String>) -> Response {
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

// ---------------------------------------------------------------------------
// Dead letters

/// The filters of `txq dlq`, as query or form fields. Empty fields are absent.
#[derive(Debug, Clone, Default, Deserialize)]
pub(crate) struct Selection {
    #[serde(rename = "type", default)]
    job_type: String,
    #[serde(default)]
    kind: String,
    #[serde(default)]
    grep: String,
    #[serde(default)]
    fingerprint: String,
    #[serde(default)]
    id: String,
    /// `1`: only messages without a type (a group of those).
    #[serde(default)]
    untyped: String,
}

impl Selection {
    fn check(&self) -> Result<(), Refusal> {
        for (name, v) in [
            ("type", &self.job_type),
            ("kind", &self.kind),
            ("grep", &self.grep),
            ("fingerprint", &self.fingerprint),
            ("id", &self.id),
        ] {
            if v.len() > MAX_FIELD {
                return Err((
                    StatusCode::BAD_REQUEST,
                    format!(
                        "the `{name}` filter is {} bytes long; at most {MAX_FIELD} are accepted\n",
                        v.len()
                    ),
                ));
            }
        }
        Ok(())
    }

    fn filter(&self) -> Filter {
        let some = |s: &String| (!s.is_empty()).then(|| s.clone());
        Filter {
            job_type: some(&self.job_type),
            error_kind: some(&self.kind),
            grep: some(&self.grep),
            ids: some(&self.id).into_iter().collect(),
            unreadable: false,
            fingerprint: some(&self.fingerprint),
            untyped: self.untyped == "1",
        }
    }

    /// The selection as a query string, for links.
    fn query(&self) -> String {
        let mut q = url::form_urlencoded::Serializer::new(String::new());
        for (k, v) in [
            ("type", &self.job_type),
            ("kind", &self.kind),
            ("grep", &self.grep),
            ("fingerprint", &self.fingerprint),
            ("id", &self.id),
            ("untyped", &self.untyped),
        ] {
            if !v.is_empty() {
                q.append_pair(k, v);
            }
        }
        q.finish()
    }

    fn describe(&self) -> String {
        let f = self.filter();
        if f.is_empty() {
            return "every message".into();
        }
        let mut parts = Vec::new();
        for (k, v) in [
            ("type", &self.job_type),
            ("kind", &self.kind),
            ("containing", &self.grep),
            ("fingerprint", &self.fingerprint),
            ("message_id", &self.id),
        ] {
            if !v.is_empty() {
                parts.push(format!("{k} = {v}"));
            }
        }
        if self.untyped == "1" {
            parts.push("no type".into());
        }
        parts.join(", ")
    }
}

fn target(state: &AppState) -> Target {
    Target {
        amqp_url: state.config.amqp_url.clone(),
        dlq: state.broker.topology().dead_letter_queue.clone(),
    }
}

struct GroupRow {
    count: u64,
    job_type: String,
    kind: String,
    fingerprint: String,
    first: String,
    last: String,
    example: String,
    /// The group as a selection's query string.
    query: String,
}

#[derive(Template)]
#[template(path = "console/dead_letters.html")]
struct DeadLettersPage {
    base: Base,
    selection: Selection,
    sample: u64,
    depth: u32,
    scanned: u64,
    matched: u64,
    groups: Vec<GroupRow>,
    problem: String,
}

#[derive(Debug, Deserialize)]
pub(crate) struct SampleQuery {
    #[serde(flatten)]
    selection: Selection,
    sample: Option<u64>,
}

pub(crate) async fn dead_letters(
    State(state): State<AppState>,
    Extension(actor): Extension<Actor>,
    Query(q): Query<SampleQuery>,
) -> Response {
    if let Err(r) = q.selection.check() {
        return r.into_response();
    }
    let sample = q.sample.unwrap_or(SAMPLE).clamp(1, MAX_SAMPLE);
    let filter = q.selection.filter();
    let mut grouper = Grouper::default();
    let mut matched = 0;
    let _one_reader = state.dlq.lock().await;
    // The whole sample is read with no filter, which bounds the scan; the filter
    // is applied here.
    let read = dlq::inspect_within(
        &target(&state),
        &Filter::default(),
        Some(sample),
        Some(sample),
        |m| {
            if filter.matches(m) {
                matched += 1;
                grouper.add(m);
            }
            Ok(())
        },
    )
    .await;
    let (depth, scanned, problem) = match read {
        Ok(c) => (c.depth, c.scanned, String::new()),
        Err(e) => (0, 0, e.to_string()),
    };
    let groups = grouper
        .into_groups()
        .into_iter()
        .map(|g| {
            // Exactly the group: a group without a type must not widen to
            // every type's messages with the same error.
            let selection = Selection {
                untyped: if g.job_type.is_none() {
                    "1".into()
                } else {
                    String::new()
                },
                job_type: g.job_type.clone().unwrap_or_default(),
                kind: g.error_kind.clone(),
                fingerprint: g.fingerprint.clone(),
                ..Selection::default()
            };
            GroupRow {
                count: g.count,
                job_type: g.job_type.unwrap_or_default(),
                kind: g.error_kind,
                fingerprint: g.fingerprint,
                first: g.first_failed_at.unwrap_or_default(),
                last: g.last_failed_at.unwrap_or_default(),
                example: g.example_message_id.unwrap_or_default(),
                query: selection.query(),
            }
        })
        .collect();
    // No auto-refresh: each read takes the sample out of the queue for a moment.
    render(&DeadLettersPage {
        base: Base::new(&state, &actor, "Dead letters"),
        selection: q.selection,
        sample,
        depth,
        scanned,
        matched,
        groups,
        problem,
    })
}

struct MessageRow {
    message_id: String,
    job_type: String,
    kind: String,
    error: String,
    failed_at: String,
    attempts: String,
    original_queue: String,
    replayed: i64,
}

impl MessageRow {
    fn new(m: &DeadLetter) -> Self {
        let mut error = m.error.clone();
        if error.len() > 300 {
            let mut end = 300;
            while !error.is_char_boundary(end) {
                end -= 1;
            }
            error.truncate(end);
            error.push('…');
        }
        Self {
            message_id: m.message_id.clone().unwrap_or_default(),
            job_type: m.job_type.clone().unwrap_or_default(),
            kind: m.error_kind.clone(),
            error,
            failed_at: m.failed_at.clone().unwrap_or_default(),
            attempts: m.attempts.map_or(String::new(), |a| a.to_string()),
            original_queue: m.original_queue.clone().unwrap_or_default(),
            replayed: m.replayed,
        }
    }
}

#[derive(Template)]
#[template(path = "console/messages.html")]
struct MessagesPage {
    base: Base,
    selection: Selection,
    query: String,
    describe: String,
    page: u64,
    rows: Vec<MessageRow>,
    more: bool,
    depth: u32,
    scanned: u64,
    problem: String,
}

#[derive(Debug, Deserialize)]
pub(crate) struct PageQuery {
    #[serde(flatten)]
    selection: Selection,
    page: Option<u64>,
}

pub(crate) async fn messages(
    State(state): State<AppState>,
    Extension(actor): Extension<Actor>,
    Query(q): Query<PageQuery>,
) -> Response {
    if let Err(r) = q.selection.check() {
        return r.into_response();
    }
    let page = q.page.unwrap_or(0).min(10_000);
    let skip = page * PAGE;
    let mut rows = Vec::new();
    let mut seen = 0u64;
    let _one_reader = state.dlq.lock().await;
    // One more than the page, to know whether there is a next one.
    let read = dlq::inspect_within(
        &target(&state),
        &q.selection.filter(),
        Some(skip + PAGE + 1),
        Some(MAX_SCAN),
        |m| {
            seen += 1;
            if seen > skip && seen <= skip + PAGE {
                rows.push(MessageRow::new(m));
            }
            Ok(())
        },
    )
    .await;
    let (depth, scanned, problem) = match read {
        Ok(c) => (c.depth, c.scanned, String::new()),
        Err(e) => (0, 0, e.to_string()),
    };
    render(&MessagesPage {
        scanned,
        base: Base::new(&state, &actor, "Dead letters"),
        query: q.selection.query(),
        describe: q.selection.describe(),
        selection: q.selection,
        page,
        more: seen > skip + PAGE,
        rows,
        depth,
        problem,
    })
}

#[derive(Template)]
#[template(path = "console/message.html")]
struct MessagePage {
    base: Base,
    id: String,
    query: String,
    found: Option<MessageRow>,
    error: String,
    origin: String,
    headers: String,
    properties: String,
    body: String,
    body_note: String,
    problem: String,
}

#[derive(Debug, Deserialize)]
pub(crate) struct IdQuery {
    #[serde(default)]
    id: String,
}

/// A body as text: JSON pretty-printed, other UTF-8 as is, anything else lossy;
/// cut at [`MAX_BODY_SHOWN`]. The note says what was done to it.
fn show_body(body: &[u8]) -> (String, String) {
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

pub(crate) async fn message(
    State(state): State<AppState>,
    Extension(actor): Extension<Actor>,
    Query(q): Query<IdQuery>,
) -> Response {
    if q.id.is_empty() || q.id.len() > MAX_FIELD {
        return bad_request("give the message_id: /dead-letters/message?id=…");
    }
    let selection = Selection {
        id: q.id.clone(),
        ..Selection::default()
    };
    let mut page = MessagePage {
        base: Base::new(&state, &actor, "Dead letter"),
        id: q.id.clone(),
        query: selection.query(),
        found: None,
        error: String::new(),
        origin: String::new(),
        headers: String::new(),
        properties: String::new(),
        body: String::new(),
        body_note: String::new(),
        problem: String::new(),
    };
    let mut found = None;
    let _one_reader = state.dlq.lock().await;
    let read = dlq::inspect_within(
        &target(&state),
        &selection.filter(),
        Some(1),
        Some(MAX_SCAN),
        |m| {
            found = Some(m.clone());
            Ok(())
        },
    )
    .await;
    let read_failed = read.is_err();
    if let Err(e) = read {
        page.problem = e.to_string();
    }
    let status = match &found {
        Some(m) => {
            let json = m.to_json();
            page.error = m.error.clone();
            page.origin = format!("{:?}", m.origin).to_lowercase();
            page.headers = json
                .get("headers")
                .map(|h| serde_json::to_string_pretty(h).unwrap_or_default())
                .unwrap_or_default();
            page.properties = json
                .get("properties")
                .map(|h| serde_json::to_string_pretty(h).unwrap_or_default())
                .unwrap_or_default();
            (page.body, page.body_note) = show_body(&m.body);
            page.found = Some(MessageRow::new(m));
            StatusCode::OK
        }
        None if read_failed => StatusCode::BAD_GATEWAY,
        None => StatusCode::NOT_FOUND,
    };
    (status, render(&page)).into_response()
}

// ---------------------------------------------------------------------------
// Replay and purge: a confirmation page, then the POST

#[derive(Debug, Deserialize)]
pub(crate) struct ConfirmQuery {
    action: String,
    #[serde(flatten)]
    selection: Selection,
}

#[derive(Template)]
#[template(path = "console/confirm.html")]
struct ConfirmPage {
    base: Base,
    action: &'static str,
    selection: Selection,
    describe: String,
    count: u64,
    skipped: u64,
    reply_to_gone: u64,
    depth: u32,
    scanned: u64,
    confirmation: String,
    problem: String,
}

pub(crate) async fn confirm(
    State(state): State<AppState>,
    Extension(actor): Extension<Actor>,
    Query(q): Query<ConfirmQuery>,
) -> Response {
    if let Err(r) = q.selection.check() {
        return r.into_response();
    }
    if state.read_only {
        return (
            StatusCode::FORBIDDEN,
            "the console is read-only (--read-only): no action is allowed\n",
        )
            .into_response();
    }
    let action = match q.action.as_str() {
        "replay" => "replay",
        "purge" => "purge",
        _ => return bad_request("action must be replay or purge"),
    };
    let filter = q.selection.filter();
    let mut page = ConfirmPage {
        base: Base::new(&state, &actor, "Confirm"),
        action,
        describe: q.selection.describe(),
        selection: q.selection,
        count: 0,
        skipped: 0,
        reply_to_gone: 0,
        depth: 0,
        scanned: 0,
        confirmation: state.auth.confirmation(),
        problem: String::new(),
    };
    let _reading = state.dlq.lock().await;
    if action == "replay" {
        let options = ReplayOptions {
            filter,
            dry_run: true,
            max_scanned: Some(MAX_SCAN),
            ..ReplayOptions::default()
        };
        match dlq::replay(&target(&state), &options, |_| Ok(())).await {
            Ok(r) => {
                page.count = r.would_replay;
                page.skipped = r.skipped;
                page.reply_to_gone = r.reply_to_gone;
                page.depth = r.counts.depth;
                page.scanned = r.counts.scanned;
            }
            Err(e) => page.problem = e.to_string(),
        }
    } else {
        match dlq::inspect_within(&target(&state), &filter, None, Some(MAX_SCAN), |_| Ok(())).await
        {
            Ok(c) => {
                page.count = c.matched;
                page.depth = c.depth;
                page.scanned = c.scanned;
            }
            Err(e) => page.problem = e.to_string(),
        }
    }
    render(&page)
}

#[derive(Debug, Deserialize)]
pub(crate) struct ActionForm {
    #[serde(default)]
    csrf: String,
    /// The single-use confirmation the confirmation page issued.
    #[serde(default)]
    confirmation: String,
    /// What the confirmation page counted: the action moves no more.
    expected: u64,
    #[serde(flatten)]
    selection: Selection,
}

#[derive(Template)]
#[template(path = "console/done.html")]
struct DonePage {
    base: Base,
    action: &'static str,
    describe: String,
    moved: u64,
    skipped: u64,
    expected: u64,
    problem: String,
}

pub(crate) async fn replay(
    State(state): State<AppState>,
    Extension(actor): Extension<Actor>,
    Form(form): Form<ActionForm>,
) -> Response {
    act(&state, &actor, form, "replay").await
}

pub(crate) async fn purge(
    State(state): State<AppState>,
    Extension(actor): Extension<Actor>,
    Form(form): Form<ActionForm>,
) -> Response {
    act(&state, &actor, form, "purge").await
}

/// Replays or purges what the confirmation page counted, at most
/// `form.expected` messages, through `tools::dlq`; an event says who did it.
async fn act(state: &AppState, actor: &Actor, form: ActionForm, action: &'static str) -> Response {
    if let Err(r) = form.selection.check() {
        return r.into_response();
    }
    if let Err(r) = state.may_act(actor, &form.csrf, &form.confirmation) {
        return r.into_response();
    }
    let describe = form.selection.describe();
    // In a task of its own: a dropped request (a closed tab, a cut connection)
    // must not stop an action half-way, between a copy's confirm and its ack, or
    // before its event is recorded.
    let task = {
        let (state, actor, describe) = (state.clone(), actor.name.clone(), describe.clone());
        let (filter, expected) = (form.selection.filter(), form.expected);
        tokio::spawn(async move {
            let _one_reader = state.dlq.lock().await;
            let (moved, skipped, error) = run_action(&state, action, filter, expected).await;
            crate::events::console_action(&actor, action, &describe, moved, error.as_deref());
            (moved, skipped, error.unwrap_or_default())
        })
    };
    let (moved, skipped, problem) = match task.await {
        Ok(done) => done,
        Err(e) => (0, 0, format!("the action failed: {e}")),
    };
    let status = if problem.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::BAD_GATEWAY
    };
    let page = DonePage {
        base: Base::new(
            state,
            actor,
            if action == "replay" {
                "Replayed"
            } else {
                "Purged"
            },
        ),
        action,
        describe,
        moved,
        skipped,
        expected: form.expected,
        problem,
    };
    (status, render(&page)).into_response()
}

/// Moves at most `expected` messages, from no further than the confirmation page
/// looked; returns how many moved, how many were skipped, and the error that
/// stopped it, if one did (what moved before it is still counted).
async fn run_action(
    state: &AppState,
    action: &'static str,
    filter: Filter,
    expected: u64,
) -> (u64, u64, Option<String>) {
    if expected == 0 {
        return (0, 0, None);
    }
    let mut moved = 0;
    let result = if action == "replay" {
        let options = ReplayOptions {
            filter,
            max_replayed: Some(expected),
            max_scanned: Some(MAX_SCAN),
            ..ReplayOptions::default()
        };
        dlq::replay(&target(state), &options, |event| {
            if matches!(event, dlq::ReplayEvent::Replayed { .. }) {
                moved += 1;
            }
            Ok(())
        })
        .await
        .map(|r| r.skipped)
    } else {
        dlq::purge_within(
            &target(state),
            &filter,
            Some(expected),
            Some(MAX_SCAN),
            |_| Ok(()),
            |_| async { Ok(true) },
        )
        .await
        .map(|r| {
            moved = r.purged;
            0
        })
    };
    match result {
        Ok(skipped) => (moved, skipped, None),
        Err(e) => (moved, 0, Some(e.to_string())),
    }
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
    (status, render(&page)).into_response()
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
    (status, render(&page)).into_response()
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
    let Some((session, name)) = state.log_in(&form.token) else {
        let page = LoginPage {
            csrf: state.login_csrf().to_owned(),
            failed: true,
        };
        return (StatusCode::UNAUTHORIZED, render(&page)).into_response();
    };
    tracing::info!(target: "txq::console", actor = %name, "console login");
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
