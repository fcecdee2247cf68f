//! Who may use the console, and the rules every request passes, each enforced
//! here once:
//! - with no tokens, only loopback is served, and only to a loopback `Host` (a page
//!   of another site whose name was re-pointed at 127.0.0.1 is refused);
//! - with tokens, every request carries one: `Authorization: Bearer`, or the cookie
//!   of a session the login page opened (a random id, never the token);
//! - a POST from a browser must come from the console's own origin and carry the
//!   CSRF token of its session; an action also uses up the single-use
//!   confirmation its confirmation page issued;
//! - read-only refuses every action;
//! - every response carries headers that keep it out of other sites' frames and
//!   scripts.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Mutex;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};
use rand::Rng as _;

use super::{Console, State as AppState};

/// The session cookie's name.
pub(crate) const COOKIE: &str = "txq_console";

/// The shortest token accepted.
pub(crate) const MIN_TOKEN: usize = 16;

/// Sessions and confirmations kept at most; past that the oldest go.
const MAX_SESSIONS: usize = 10_000;
const MAX_CONFIRMATIONS: usize = 1_000;

/// Failed logins a minute, for the whole console, before it answers 429: a
/// token cannot be guessed at speed.
const MAX_FAILED_LOGINS: usize = 10;

/// The name actions are logged as when no tokens are configured.
const LOCAL: &str = "local";

/// A request refused: its status and why, as the response's text.
pub(crate) type Refusal = (StatusCode, String);

/// Who is making a request: the name of the token it carried (`local` when no
/// tokens are configured and only loopback is served), and whether the token came
/// in an `Authorization` header, which a browser never adds on its own, so such a
/// request cannot be a forged one.
#[derive(Debug, Clone)]
pub(crate) struct Actor {
    pub(crate) name: String,
    pub(crate) bearer: bool,
}

/// 32 random bytes, hex.
pub(crate) fn random_token() -> String {
    let bytes: [u8; 32] = rand::rng().random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Equal without telling, by its timing, how much of a guess was right.
pub(crate) fn same(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// The console's secrets of this process: a CSRF token per token name (and for
/// `local`), one for the login form only, the open sessions and the unused
/// confirmations.
pub(crate) struct Sessions {
    csrf: BTreeMap<String, String>,
    login_csrf: String,
    open: Mutex<(HashMap<String, String>, VecDeque<String>)>,
    confirmations: Mutex<VecDeque<String>>,
    /// When the latest failed logins were, at most [`MAX_FAILED_LOGINS`].
    failures: Mutex<VecDeque<std::time::Instant>>,
}

impl Sessions {
    pub(crate) fn new<'a>(names: impl Iterator<Item = &'a String>) -> Self {
        let mut csrf: BTreeMap<String, String> =
            names.map(|n| (n.clone(), random_token())).collect();
        csrf.insert(LOCAL.into(), random_token());
        Self {
            csrf,
            login_csrf: random_token(),
            open: Mutex::default(),
            confirmations: Mutex::default(),
            failures: Mutex::default(),
        }
    }

    /// Counts a failed login.
    fn failed(&self) {
        let mut f = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        f.push_back(std::time::Instant::now());
        if f.len() > MAX_FAILED_LOGINS {
            f.pop_front();
        }
    }

    /// [`MAX_FAILED_LOGINS`] failures within the last minute.
    fn throttled(&self) -> bool {
        let f = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        f.len() >= MAX_FAILED_LOGINS
            && f.front()
                .is_some_and(|t| t.elapsed() < std::time::Duration::from_secs(60))
    }

    fn open(&self, name: &str) -> String {
        let id = random_token();
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let (by_id, order) = &mut *open;
        if order.len() >= MAX_SESSIONS {
            if let Some(oldest) = order.pop_front() {
                by_id.remove(&oldest);
            }
        }
        by_id.insert(id.clone(), name.to_owned());
        order.push_back(id.clone());
        id
    }

    fn session(&self, id: &str) -> Option<String> {
        let open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        open.0.get(id).cloned()
    }

    fn close(&self, id: &str) {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let (by_id, order) = &mut *open;
        if by_id.remove(id).is_some() {
            order.retain(|o| o != id);
        }
    }

    /// A single-use confirmation for an action's form.
    pub(crate) fn confirmation(&self) -> String {
        let id = random_token();
        let mut c = self.confirmations.lock().unwrap_or_else(|e| e.into_inner());
        if c.len() >= MAX_CONFIRMATIONS {
            c.pop_front();
        }
        c.push_back(id.clone());
        id
    }

    /// Uses up `id`; false if it was never issued, or used already.
    fn use_confirmation(&self, id: &str) -> bool {
        let mut c = self.confirmations.lock().unwrap_or_else(|e| e.into_inner());
        match c.iter().position(|x| same(x, id)) {
            Some(i) => {
                c.remove(i);
                true
            }
            None => false,
        }
    }
}

impl Console {
    /// The name of the token `sent`, if it is one. Every token is compared.
    pub(crate) fn token_name(&self, sent: &str) -> Option<&str> {
        self.config
            .console
            .tokens
            .iter()
            .filter(|(_, secret)| same(secret.expose(), sent))
            .fold(None, |found, (name, _)| found.or(Some(name.as_str())))
    }

    /// The CSRF token of `actor`'s forms.
    pub(crate) fn csrf(&self, actor: &Actor) -> &str {
        self.auth.csrf.get(&actor.name).map_or("", String::as_str)
    }

    pub(crate) fn login_csrf(&self) -> &str {
        &self.auth.login_csrf
    }

    /// Opens a session for `token` (the login form); its id for the cookie.
    pub(crate) fn log_in(&self, token: &str) -> Option<(String, String)> {
        let Some(name) = self.token_name(token).map(str::to_owned) else {
            self.auth.failed();
            return None;
        };
        Some((self.auth.open(&name), name))
    }

    pub(crate) fn log_out(&self, session: &str) {
        self.auth.close(session);
    }

    /// Refuses every action when read-only.
    pub(crate) fn writable(&self) -> Result<(), Refusal> {
        if self.config.console.read_only {
            return Err((
                StatusCode::FORBIDDEN,
                "the console is read-only (--read-only): no action is allowed\n".into(),
            ));
        }
        Ok(())
    }

    /// Whether too many logins failed lately to try another now.
    pub(crate) fn login_throttled(&self) -> bool {
        self.auth.throttled()
    }

    /// Refuses every action when read-only; a POST without `actor`'s CSRF token
    /// unless a bearer header carried the token; and a confirmation that was not
    /// issued or was used already (a reload, a double click).
    pub(crate) fn may_act(
        &self,
        actor: &Actor,
        csrf: &str,
        confirmation: &str,
    ) -> Result<(), Refusal> {
        self.writable()?;
        if !actor.bearer && !same(csrf, self.csrf(actor)) {
            return Err((
                StatusCode::FORBIDDEN,
                "the form's CSRF token is missing or wrong: reload the page and try again\n".into(),
            ));
        }
        if !self.auth.use_confirmation(confirmation) {
            return Err((
                StatusCode::CONFLICT,
                "this confirmation was used already, or is unknown: go back to the dead letters and confirm again\n"
                    .into(),
            ));
        }
        Ok(())
    }
}

fn refuse(status: StatusCode, why: &str) -> Response {
    (status, format!("{why}\n")).into_response()
}

/// The bearer token a request carries, if any.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
}

/// The session id of the request's cookie, if any.
pub(crate) fn session_cookie(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value)
}

/// The host name of a `Host` header (or an origin's authority), without the port.
fn host_name(authority: &str) -> &str {
    if let Some(rest) = authority.strip_prefix('[') {
        return rest.split(']').next().unwrap_or_default();
    }
    authority.split(':').next().unwrap_or_default()
}

fn is_loopback_name(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Why a browser's POST is not from the console's own pages, if it is not:
/// `Sec-Fetch-Site` says another site, or `Origin` names another host.
fn cross_origin(headers: &HeaderMap) -> Option<String> {
    let text = |name| {
        headers
            .get(name)
            .and_then(|v: &HeaderValue| v.to_str().ok())
    };
    if let Some(site) = text(header::HeaderName::from_static("sec-fetch-site")) {
        if site != "same-origin" && site != "none" {
            return Some(format!("Sec-Fetch-Site is {site}"));
        }
    }
    let origin = text(header::ORIGIN)?;
    let host = text(header::HOST).unwrap_or_default();
    let authority = origin.split_once("://").map_or(origin, |(_, a)| a);
    (authority != host).then(|| format!("Origin {origin} is not this console ({host})"))
}

/// Every request passes here: it is let through with its [`Actor`], sent to the
/// login page, or refused.
pub(crate) async fn guard(
    State(state): State<AppState>,
    mut request: Request,
    next: Next,
) -> Response {
    let mut response = match check(&state, &mut request) {
        Ok(()) => next.run(request).await,
        Err(refused) => refused,
    };
    let headers = response.headers_mut();
    for (name, value) in [
        (
            header::CONTENT_SECURITY_POLICY,
            "default-src 'none'; style-src 'self'; script-src 'self'; img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        // Not `no-referrer`: with it a browser sends `Origin: null` on a form POST,
        // which the origin check must refuse.
        (header::REFERRER_POLICY, "same-origin"),
        (header::CACHE_CONTROL, "no-store"),
    ] {
        headers
            .entry(name)
            .or_insert(HeaderValue::from_static(value));
    }
    response
}

/// `Ok`: let the request through (with its [`Actor`] attached when it has one);
/// `Err(response)`: answer with that instead.
#[allow(clippy::result_large_err)] // the refusal is the response itself
fn check(state: &Console, request: &mut Request) -> Result<(), Response> {
    let headers = request.headers();
    if state.config.console.tokens.is_empty() {
        let host = headers
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        if !is_loopback_name(host_name(host)) {
            return Err(refuse(
                StatusCode::MISDIRECTED_REQUEST,
                "without access tokens the console answers to localhost and loopback addresses only",
            ));
        }
    }
    let path = request.uri().path();
    let public = path == "/login" || path.starts_with("/static/");
    let sent_bearer = bearer(headers);
    let actor = if state.config.console.tokens.is_empty() {
        Some(Actor {
            name: LOCAL.into(),
            bearer: false,
        })
    } else if let Some(token) = sent_bearer {
        state.token_name(token).map(|name| Actor {
            name: name.to_owned(),
            bearer: true,
        })
    } else {
        session_cookie(headers)
            .and_then(|id| state.auth.session(id))
            .map(|name| Actor {
                name,
                bearer: false,
            })
    };
    if request.method() == Method::POST && !actor.as_ref().is_some_and(|a| a.bearer) {
        if let Some(why) = cross_origin(headers) {
            return Err(refuse(
                StatusCode::FORBIDDEN,
                &format!("a form posted from another site is refused: {why}"),
            ));
        }
    }
    match actor {
        Some(actor) => {
            request.extensions_mut().insert(actor);
            Ok(())
        }
        None if public => Ok(()),
        None if sent_bearer.is_some() => Err(refuse(
            StatusCode::UNAUTHORIZED,
            "that bearer token is not one of the console's",
        )),
        None if request.method() == Method::GET => Err(Redirect::to("/login").into_response()),
        None => Err(refuse(
            StatusCode::UNAUTHORIZED,
            "an access token is required: log in, or send Authorization: Bearer TOKEN",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_compare_whole() {
        assert!(same("abc", "abc"));
        assert!(!same("abc", "abd"));
        assert!(!same("abc", "ab"));
        assert!(!same("", "a"));
        assert_eq!(random_token().len(), 64);
        assert_ne!(random_token(), random_token());
    }

    #[test]
    fn hosts_and_origins() {
        assert_eq!(host_name("127.0.0.1:8080"), "127.0.0.1");
        assert_eq!(host_name("[::1]:8080"), "::1");
        assert_eq!(host_name("localhost"), "localhost");
        assert!(is_loopback_name("localhost") && is_loopback_name("127.0.0.2"));
        assert!(is_loopback_name("::1"));
        assert!(!is_loopback_name("evil.example") && !is_loopback_name(""));
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("127.0.0.1:8080"));
        assert_eq!(
            cross_origin(&h),
            None,
            "no Origin: not a browser's cross-site form"
        );
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("http://127.0.0.1:8080"),
        );
        assert_eq!(cross_origin(&h), None);
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("http://127.0.0.1:9000"),
        );
        assert!(cross_origin(&h).is_some());
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("http://127.0.0.1:8080"),
        );
        h.insert("sec-fetch-site", HeaderValue::from_static("same-site"));
        assert!(cross_origin(&h).is_some());
    }

    #[test]
    fn failed_logins_are_throttled() {
        let s = Sessions::new([].iter());
        for _ in 0..MAX_FAILED_LOGINS - 1 {
            s.failed();
        }
        assert!(!s.throttled());
        s.failed();
        assert!(s.throttled());
    }

    #[test]
    fn a_confirmation_is_used_once() {
        let s = Sessions::new([].iter());
        let c = s.confirmation();
        assert!(s.use_confirmation(&c));
        assert!(!s.use_confirmation(&c));
        assert!(!s.use_confirmation("made-up"));
        let id = s.open("alice");
        assert_eq!(s.session(&id).as_deref(), Some("alice"));
        s.close(&id);
        assert_eq!(s.session(&id), None);
    }
}
