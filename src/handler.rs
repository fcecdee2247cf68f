//! The `Handler` trait, what a handler may return, and the registry that maps job
//! types to handlers.

use std::any::Any;
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::value::RawValue;

use crate::db::Tx;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What a job knows about the message it came from.
#[derive(Debug, Clone, Default)]
pub struct JobMeta {
    /// The job type that chose the handler.
    pub job_type: String,
    /// The request's `message_id` (its idempotency key), if it had one.
    pub message_id: Option<String>,
    /// The request's `correlation_id`, falling back to its `message_id`.
    pub correlation_id: Option<String>,
    /// 1 for the first transaction of this delivery; grows with each in-process
    /// retry after a transient error.
    pub attempt: u32,
    /// Which delivery of the request this is (`x-txq-attempt`): 1, then one more
    /// for each delayed retry.
    pub delivery_attempt: u32,
    /// The broker's redelivered flag: an earlier delivery may have been processed.
    pub redelivered: bool,
    /// The job's W3C `traceparent`: the request's trace continued, with this job's
    /// span as parent. Pass it on to whatever the handler calls.
    pub traceparent: Option<String>,
}

/// Code that runs one job type inside the job's transaction.
///
/// The worker decodes the payload to `Payload` (a decode failure is the producer's
/// error and never reaches the handler), begins the transaction, calls `handle`,
/// and commits if it returns `Ok`. Anything else rolls the transaction back.
///
/// A handler may be called more than once for one request: after a deadlock the
/// whole job is retried in a fresh transaction. Everything it does in `tx` is undone
/// between attempts; anything it does outside the database is not.
pub trait Handler: Send + Sync + 'static {
    /// The request body, decoded from JSON.
    type Payload: DeserializeOwned + Send;
    /// The `result` of an `ok` reply, encoded as JSON.
    type Output: Serialize + Send;

    /// Runs the job. Return [`JobError::reject`] for a business refusal (replied as
    /// `rejected`, not retried); `?` on a sqlx error lets the worker classify it
    /// (deadlocks and the like are retried).
    fn handle(
        &self,
        tx: &mut Tx,
        payload: Self::Payload,
        meta: &JobMeta,
    ) -> impl Future<Output = Result<Self::Output, JobError>> + Send;

    /// Checks the decoded payload before the worker takes a connection: a
    /// [`JobError::Rejected`] is answered `rejected` at once, without a
    /// transaction (nor an inbox record: the same payload is refused the same
    /// way every time); any other error fails the job. Default: accept.
    fn check(&self, payload: &Self::Payload) -> Result<(), JobError> {
        let _ = payload;
        Ok(())
    }
}

/// How a job can fail.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum JobError {
    /// A business refusal: rolled back, replied as `rejected`, never retried.
    #[error("rejected ({code}): {message}")]
    Rejected {
        /// Machine-readable reason, e.g. `insufficient_funds`.
        code: String,
        /// For humans.
        message: String,
    },
    /// A database error; the worker decides whether it is worth another attempt.
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    /// Worth another attempt in a fresh transaction.
    #[error("{0}")]
    Transient(#[source] BoxError),
    /// Will fail the same way every time: not retried.
    #[error("{0}")]
    Permanent(#[source] BoxError),
}

/// `error` and its sources, `: `-separated, for replies and dead-letter headers.
/// A level whose text the previous one already shows (a wrapper that prints its
/// source) is left out, so nothing is said twice.
pub(crate) fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut out = error.to_string();
    let mut last = out.clone();
    let mut next = error.source();
    while let Some(e) = next {
        let text = e.to_string();
        if !last.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        last = text;
        next = e.source();
    }
    out
}

/// An `async fn(&mut Tx, Payload, &JobMeta) -> Result<Output, JobError>` as a
/// handler: what [`handler_fn`] accepts. Implemented for every such function; a
/// handler with state implements [`Handler`] instead.
pub trait HandlerFn<'a, P, O>: Send + Sync + 'static {
    /// The future the function returns, borrowing the transaction.
    type Future: Future<Output = Result<O, JobError>> + Send + 'a;
    /// Calls the function.
    fn call(&self, tx: &'a mut Tx, payload: P, meta: &'a JobMeta) -> Self::Future;
}

impl<'a, F, Fut, P, O> HandlerFn<'a, P, O> for F
where
    F: Fn(&'a mut Tx, P, &'a JobMeta) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<O, JobError>> + Send + 'a,
{
    type Future = Fut;

    fn call(&self, tx: &'a mut Tx, payload: P, meta: &'a JobMeta) -> Fut {
        self(tx, payload, meta)
    }
}

/// A plain `async fn` as a [`Handler`]:
///
/// ```
/// use txq::{JobError, JobMeta, Tx, handler_fn};
///
/// async fn echo(_tx: &mut Tx, p: serde_json::Value, _m: &JobMeta)
///     -> Result<serde_json::Value, JobError> {
///     Ok(p)
/// }
///
/// let handler = handler_fn(echo);
/// # let _ = handler;
/// ```
pub fn handler_fn<F, P, O>(f: F) -> FnHandler<F, P, O>
where
    F: for<'a> HandlerFn<'a, P, O>,
{
    FnHandler {
        f,
        types: std::marker::PhantomData,
    }
}

/// The handler [`handler_fn`] makes.
pub struct FnHandler<F, P, O> {
    f: F,
    types: std::marker::PhantomData<fn(P) -> O>,
}

impl<F, P, O> std::fmt::Debug for FnHandler<F, P, O> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FnHandler")
            .field("fn", &std::any::type_name::<F>())
            .finish()
    }
}

impl<F, P, O> Handler for FnHandler<F, P, O>
where
    F: for<'a> HandlerFn<'a, P, O>,
    P: DeserializeOwned + Send + 'static,
    O: Serialize + Send + 'static,
{
    type Payload = P;
    type Output = O;

    // An `async fn` holds both borrows, so the call may tie them together.
    async fn handle(&self, tx: &mut Tx, payload: P, meta: &JobMeta) -> Result<O, JobError> {
        self.f.call(tx, payload, meta).await
    }
}

impl JobError {
    /// A business refusal with a machine-readable `code`.
    pub fn reject(code: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Rejected {
            code: code.into(),
            message: message.into(),
        }
    }

    /// An error worth another attempt.
    pub fn transient(error: impl Into<BoxError>) -> Self {
        Self::Transient(error.into())
    }

    /// An error not worth another attempt.
    pub fn permanent(error: impl Into<BoxError>) -> Self {
        Self::Permanent(error.into())
    }
}

type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A decoded payload, type-erased so that one registry holds every handler.
pub(crate) type Payload = Box<dyn Any + Send>;

/// Object-safe face of a [`Handler`].
pub(crate) trait DynHandler: Send + Sync {
    fn decode(&self, body: &[u8]) -> Result<Payload, serde_json::Error>;
    fn check(&self, payload: &Payload) -> Result<(), JobError>;
    fn call<'a>(
        &'a self,
        tx: &'a mut Tx,
        payload: Payload,
        meta: &'a JobMeta,
    ) -> BoxFuture<'a, Result<Box<RawValue>, JobError>>;
}

struct Typed<H>(H);

impl<H: Handler> DynHandler for Typed<H> {
    fn decode(&self, body: &[u8]) -> Result<Payload, serde_json::Error> {
        serde_json::from_slice::<H::Payload>(body).map(|p| Box::new(p) as Payload)
    }

    fn check(&self, payload: &Payload) -> Result<(), JobError> {
        match payload.downcast_ref::<H::Payload>() {
            Some(p) => self.0.check(p),
            // Only `decode` of this same handler makes payloads for it.
            None => Err(JobError::permanent(
                "internal: payload of another handler's type",
            )),
        }
    }

    fn call<'a>(
        &'a self,
        tx: &'a mut Tx,
        payload: Payload,
        meta: &'a JobMeta,
    ) -> BoxFuture<'a, Result<Box<RawValue>, JobError>> {
        Box::pin(async move {
            let payload = payload.downcast::<H::Payload>().map_err(|_| {
                // Only `decode` of this same handler makes payloads for it.
                JobError::permanent("internal: payload of another handler's type")
            })?;
            let output = self.0.handle(tx, *payload, meta).await?;
            serde_json::value::to_raw_value(&output)
                .map_err(|e| JobError::permanent(format!("handler output is not JSON: {e}")))
        })
    }
}

/// Job type → handler.
#[derive(Clone, Default)]
pub(crate) struct Registry {
    handlers: HashMap<String, Arc<dyn DynHandler>>,
    batch_callback: Option<BatchCallback>,
}

/// The handler a batch's completion runs once per revision, and its settings.
#[derive(Clone)]
pub(crate) struct BatchCallback {
    pub(crate) handler: Arc<dyn DynHandler>,
    pub(crate) isolation: Option<crate::db::Isolation>,
    pub(crate) timeout: Option<std::time::Duration>,
}

impl Registry {
    pub(crate) fn insert<H: Handler>(&mut self, job_type: String, handler: H) -> bool {
        self.handlers
            .insert(job_type, Arc::new(Typed(handler)))
            .is_some()
    }

    pub(crate) fn set_batch_callback<H: Handler>(
        &mut self,
        handler: H,
        settings: crate::config::JobConfig,
    ) {
        self.batch_callback = Some(BatchCallback {
            handler: Arc::new(Typed(handler)),
            isolation: settings.isolation,
            timeout: settings.timeout,
        });
    }

    pub(crate) fn batch_callback(&self) -> Option<&BatchCallback> {
        self.batch_callback.as_ref()
    }

    pub(crate) fn get(&self, job_type: &str) -> Option<&Arc<dyn DynHandler>> {
        self.handlers.get(job_type)
    }

    pub(crate) fn job_types(&self) -> impl Iterator<Item = &str> {
        self.handlers.keys().map(String::as_str)
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.handlers.is_empty()
    }
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.handlers.keys()).finish()
    }
}
