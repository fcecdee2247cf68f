//! The dead-letter pages and actions: groups of a sample, a selection's messages
//! page by page, one message, and replay or purge behind a confirmation page.
//! They read and act through [`crate::tools::dlq`], the code behind `txq dlq`;
//! actions go through [`super::Console::may_act`] first, run to their end in a
//! task of their own, and are events ([`crate::events::console_action`]).

use askama::Template;
use axum::Extension;
use axum::extract::rejection::FormRejection;
use axum::extract::{Form, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::State as AppState;
use super::auth::{Actor, Refusal};
use super::pages::{Base, IdQuery, MAX_FIELD, bad_request, render, render_as, show_body};
use crate::tools::dlq::{self, DeadLetter, Filter, Grouper, ReplayOptions, Target};

/// Dead letters the groups page samples by default, and at most.
const SAMPLE: u64 = 1000;
const MAX_SAMPLE: u64 = 20_000;
/// Messages a confirmation, a list or a lookup reads at most from the head of
/// the queue: a long queue is sampled, never read whole for a page.
const MAX_SCAN: u64 = 20_000;
/// Messages a list page shows.
const PAGE: u64 = 50;

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
    /// The fields by their query names.
    fn fields(&self) -> [(&'static str, &String); 6] {
        [
            ("type", &self.job_type),
            ("kind", &self.kind),
            ("grep", &self.grep),
            ("fingerprint", &self.fingerprint),
            ("id", &self.id),
            ("untyped", &self.untyped),
        ]
    }

    fn check(&self) -> Result<(), Refusal> {
        for (name, v) in self.fields() {
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
        for (k, v) in self.fields() {
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
    render_as(status, &page)
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
    if let Err(r) = state.writable() {
        return r.into_response();
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
    form: Result<Form<ActionForm>, FormRejection>,
) -> Response {
    act(&state, &actor, form, "replay").await
}

pub(crate) async fn purge(
    State(state): State<AppState>,
    Extension(actor): Extension<Actor>,
    form: Result<Form<ActionForm>, FormRejection>,
) -> Response {
    act(&state, &actor, form, "purge").await
}

/// Replays or purges what the confirmation page counted, at most
/// `form.expected` messages, through `tools::dlq`; an event says who did it.
async fn act(
    state: &AppState,
    actor: &Actor,
    form: Result<Form<ActionForm>, FormRejection>,
    action: &'static str,
) -> Response {
    // Read-only answers 403 to any action, well-formed or not.
    if let Err(r) = state.writable() {
        return r.into_response();
    }
    let form = match form {
        Ok(Form(form)) => form,
        Err(rejection) => return rejection.into_response(),
    };
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
    render_as(status, &page)
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
