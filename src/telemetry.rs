//! Logging set-up: `tracing` with text or JSON lines, filtered by `RUST_LOG`
//! (default `info`); with the `otlp` cargo feature and `OTEL_EXPORTER_OTLP_ENDPOINT`
//! set, job spans are also exported over OTLP/HTTP.

use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer as _};

use crate::config::LogFormat;

/// Keeps the exporter alive; dropping it flushes spans still buffered.
#[must_use = "dropping the guard stops span export"]
#[derive(Debug, Default)]
pub struct Telemetry {
    #[cfg(feature = "otlp")]
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        #[cfg(feature = "otlp")]
        if let Some(provider) = self.provider.take() {
            let _ = provider.shutdown();
        }
    }
}

/// Installs the global subscriber; a second call is a no-op.
pub fn init(format: LogFormat) -> Telemetry {
    init_with(format, "info,txq::job=warn,lapin=off")
}

/// As [`init`], with `default` as the filter when `RUST_LOG` is unset (the `dlq`
/// commands keep stderr for their own counts and errors: `warn,lapin=off`).
pub fn init_with(format: LogFormat, default: &str) -> Telemetry {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    // Colour only on a terminal, and never with NO_COLOR set (no-color.org).
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    let fmt = match format {
        LogFormat::Text => fmt.boxed(),
        LogFormat::Json => fmt.json().flatten_event(true).boxed(),
    };
    let registry = tracing_subscriber::registry().with(filter).with(fmt);
    #[cfg(feature = "otlp")]
    {
        let (layer, provider) = match otlp::layer() {
            Ok(Some((layer, provider))) => (Some(layer), Some(provider)),
            Ok(None) => (None, None),
            Err(e) => {
                eprintln!("txq: OTLP export is off: {e}");
                (None, None)
            }
        };
        let _ = registry.with(layer).try_init();
        Telemetry { provider }
    }
    #[cfg(not(feature = "otlp"))]
    {
        let _ = registry.try_init();
        Telemetry::default()
    }
}

/// Makes the job's exported span a child of the request's (remote) span, and
/// takes the exported ids into `trace`, so the `traceparent` txq publishes names
/// the span a collector received. Without an OTLP layer it changes nothing.
#[cfg(feature = "otlp")]
pub(crate) fn continue_trace(span: &tracing::Span, trace: &mut crate::broker::Trace) {
    use opentelemetry::trace::{
        SpanContext, SpanId, TraceContextExt as _, TraceFlags, TraceId, TraceState,
    };
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;

    if let (Ok(trace_id), Some(Ok(parent)), Ok(flags)) = (
        TraceId::from_hex(&trace.trace_id),
        trace.parent_id.as_deref().map(SpanId::from_hex),
        u8::from_str_radix(&trace.flags, 16),
    ) {
        let remote = SpanContext::new(
            trace_id,
            parent,
            TraceFlags::new(flags),
            true,
            TraceState::default(),
        );
        let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(remote));
    }
    let cx = span.context();
    let own = cx.span().span_context().clone();
    if own.is_valid() {
        trace.trace_id = own.trace_id().to_string();
        trace.span_id = own.span_id().to_string();
    }
}

#[cfg(feature = "otlp")]
mod otlp {
    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_otlp::SpanExporter;
    use opentelemetry_sdk::Resource;
    use opentelemetry_sdk::trace::SdkTracerProvider;
    use tracing_subscriber::registry::LookupSpan;

    type Layer<S> = tracing_opentelemetry::OpenTelemetryLayer<S, opentelemetry_sdk::trace::Tracer>;

    /// The OTLP layer, when `OTEL_EXPORTER_OTLP_ENDPOINT` (or its traces-only
    /// variant) names a collector; the exporter reads the standard `OTEL_*`
    /// variables itself.
    pub(super) fn layer<S>() -> Result<Option<(Layer<S>, SdkTracerProvider)>, String>
    where
        S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    {
        let set = |v: &str| std::env::var(v).is_ok_and(|s| !s.is_empty());
        if !set("OTEL_EXPORTER_OTLP_ENDPOINT") && !set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") {
            return Ok(None);
        }
        let exporter = SpanExporter::builder()
            .with_http()
            .build()
            .map_err(|e| e.to_string())?;
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(Resource::builder().with_service_name("txq").build())
            .build();
        let tracer = provider.tracer("txq");
        Ok(Some((
            tracing_opentelemetry::layer().with_tracer(tracer),
            provider,
        )))
    }
}
