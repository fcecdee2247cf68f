//! Who may use the console, and the rules every request passes: the access token
//! (bearer header or login cookie) when tokens are configured, the CSRF token on
//! every POST a browser could be tricked into sending, and the response headers
//! that keep pages out of other sites' frames and scripts.

use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};
use rand::Rng as _;

use super::{Console, State as AppState};

/// A request refused: its status and why, as the response's text.
pub(crate) type Refusal = (StatusCode, String);

/// The login cookie's name.
pub(crate) const COOKIE: &str = "txq_console";

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

impl Console {
    /// The name of the token `sent`, if it is one.
    pub(crate) fn token_name(&self, sent: &str) -> Option<&str> {
        self.tokens
            .iter()
            .find(|(_, secret)| same(secret.expose(), sent))
            .map(|(name, _)| name.as_str())
    }

    /// Refuses a POST that neither carries this process's CSRF token nor came
    /// with a bearer header; and every action when the console is read-only.
    pub(crate) fn may_act(&self, actor: &Actor, csrf: &str) -> Result<(), Refusal> {
        if self.read_only {
            return Err((
                StatusCode::FORBIDDEN,
                "the console is read-only (--read-only): no action is allowed\n".into(),
            ));
        }
        if !actor.bearer && !same(csrf, &self.csrf) {
            return Err((
                StatusCode::FORBIDDEN,
                "the form's CSRF token is missing or wrong: reload the page and try again\n".into(),
            ));
        }
        Ok(())
    }

    pub(crate) fn csrf(&self) -> &str {
        &self.csrf
    }
}

fn refuse(status: StatusCode, why: &str) -> Response {
    (status, format!("{why}\n")).into_response()
}

/// The token a request carries: `Authorization: Bearer …`, else the login cookie.
fn sent_token(headers: &HeaderMap) -> Option<(String, bool)> {
    if let Some(bearer) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    {
        return Some((bearer.trim().to_owned(), true));
    }
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| (value.to_owned(), false))
}

/// Every request passes here: it is let through with its [`Actor`], sent to the
/// login page, or refused.
pub(crate) async fn guard(
    State(state): State<AppState>,
    mut request: Request,
    next: Next,
) -> Response {
    let path = request.uri().path();
    let public = path == "/login" || path.starts_with("/static/");
    let actor = if state.tokens.is_empty() {
        Some(Actor {
            name: "local".into(),
            bearer: false,
        })
    } else {
        sent_token(request.headers()).and_then(|(token, bearer)| {
            state.token_name(&token).map(|name| Actor {
                name: name.to_owned(),
                bearer,
            })
        })
    };
    let mut response = match actor {
        Some(actor) => {
            request.extensions_mut().insert(actor);
            next.run(request).await
        }
        None if public => next.run(request).await,
        None if request.method() == Method::GET => Redirect::to("/login").into_response(),
        None => refuse(
            StatusCode::UNAUTHORIZED,
            "an access token is required: log in, or send Authorization: Bearer TOKEN",
        ),
    };
    let headers = response.headers_mut();
    for (name, value) in [
        (
            header::CONTENT_SECURITY_POLICY,
            "default-src 'none'; style-src 'self'; script-src 'self'; img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::REFERRER_POLICY, "no-referrer"),
        (header::CACHE_CONTROL, "no-store"),
    ] {
        headers
            .entry(name)
            .or_insert(HeaderValue::from_static(value));
    }
    response
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
    fn the_bearer_header_wins_over_the_cookie() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("a=b; txq_console=c1"),
        );
        assert_eq!(sent_token(&h), Some(("c1".into(), false)));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer t1"));
        assert_eq!(sent_token(&h), Some(("t1".into(), true)));
    }
}
