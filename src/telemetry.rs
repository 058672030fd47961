//! Traces across nodes: the W3C trace context a task carries.
//!
//! An enqueue (a [`Client`](crate::Client) call, or an HTTP request with a
//! `traceparent` header) runs in a `task.enqueue` span; that span's W3C
//! `traceparent` is stored with each task it inserts ([`Task::traceparent`]).
//! Every attempt runs in a `task.execute` span whose parent is that
//! context, on whichever node claims it, so a trace viewer shows the
//! request, the enqueue and each attempt (with its outcome) as one tree.
//!
//! With the `otel` feature the spans are OpenTelemetry spans for whatever
//! pipeline the application installs (a `tracing-opentelemetry` layer);
//! with `otlp`, a node exports them itself when `telemetry.otlp_endpoint`
//! is set ([`Exporter`]). Without a pipeline, a `traceparent` given by the
//! caller is stored and passed on unchanged (to `shell` programs as
//! `TRACEPARENT`, to `http` targets as the `traceparent` header).
//!
//! [`Task::traceparent`]: crate::Task::traceparent

/// Why a `traceparent` is refused.
pub(crate) const TRACEPARENT_FORMAT: &str = "is not a W3C traceparent (00-<32 hex trace id>-<16 hex span id>-<2 hex flags>, lowercase, ids not all zero)";

/// A W3C `traceparent` (version 00) split into its parts, or `None` when
/// `s` is not one: 55 characters, lowercase hex, non-zero ids.
pub fn parse_traceparent(s: &str) -> Option<([u8; 16], [u8; 8], u8)> {
    let b = s.as_bytes();
    if b.len() != 55 || &b[..3] != b"00-" || b[35] != b'-' || b[52] != b'-' {
        return None;
    }
    fn hex<const N: usize>(s: &[u8]) -> Option<[u8; N]> {
        let digit = |c: u8| match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            _ => None,
        };
        let mut out = [0u8; N];
        for (i, pair) in s.chunks(2).enumerate() {
            out[i] = digit(pair[0])? << 4 | digit(pair[1])?;
        }
        Some(out)
    }
    let trace: [u8; 16] = hex(&b[3..35])?;
    let span: [u8; 8] = hex(&b[36..52])?;
    let [flags] = hex::<1>(&b[53..55])?;
    if trace == [0; 16] || span == [0; 8] {
        return None;
    }
    Some((trace, span, flags))
}

/// The `traceparent` of a trace, span and flags.
pub fn format_traceparent(trace: [u8; 16], span: [u8; 8], flags: u8) -> String {
    let mut s = String::with_capacity(55);
    s.push_str("00-");
    for b in trace {
        s.push_str(&format!("{b:02x}"));
    }
    s.push('-');
    for b in span {
        s.push_str(&format!("{b:02x}"));
    }
    s.push_str(&format!("-{flags:02x}"));
    s
}

/// The trace context of `span` as a `traceparent`, when an OpenTelemetry
/// layer gave it one.
pub(crate) fn traceparent_of(span: &tracing::Span) -> Option<String> {
    #[cfg(feature = "otel")]
    {
        use opentelemetry::trace::TraceContextExt;
        use tracing_opentelemetry::OpenTelemetrySpanExt;
        let cx = span.context();
        let sc = cx.span().span_context().clone();
        if sc.is_valid() {
            return Some(format_traceparent(
                sc.trace_id().to_bytes(),
                sc.span_id().to_bytes(),
                sc.trace_flags().to_u8(),
            ));
        }
    }
    #[cfg(not(feature = "otel"))]
    let _ = span;
    None
}

/// Make the remote context `traceparent` (if valid) the parent of `span`,
/// which must not have been entered yet. Without an OpenTelemetry layer
/// this does nothing.
pub(crate) fn continue_trace(span: &tracing::Span, traceparent: Option<&str>) {
    #[cfg(feature = "otel")]
    if let Some((trace, id, flags)) = traceparent.and_then(parse_traceparent) {
        use opentelemetry::trace::{
            SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState,
        };
        use tracing_opentelemetry::OpenTelemetrySpanExt;
        let sc = SpanContext::new(
            TraceId::from_bytes(trace),
            SpanId::from_bytes(id),
            TraceFlags::new(flags),
            true,
            TraceState::default(),
        );
        let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(sc));
    }
    #[cfg(not(feature = "otel"))]
    let _ = (span, traceparent);
}

#[cfg(feature = "otlp")]
pub use export::{Exporter, TelemetryError};

#[cfg(feature = "otlp")]
mod export {
    use std::time::Duration;

    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
    use opentelemetry_sdk::trace::{BatchSpanProcessor, Sampler, SdkTracerProvider};

    use crate::config::TelemetryConfig;

    /// The export could not be set up.
    #[derive(Debug, thiserror::Error)]
    #[error("telemetry: {0}")]
    pub struct TelemetryError(pub String);

    /// A node's OTLP/HTTP span export. Spans are sent in batches from a
    /// thread of the SDK's, so a slow or absent collector never holds up a
    /// task (a full buffer drops spans, it does not wait). Call
    /// [`Exporter::shutdown`] on the way out to send what is buffered.
    #[derive(Debug)]
    pub struct Exporter {
        provider: SdkTracerProvider,
    }

    /// The exporter's HTTP client: the blocking reqwest client, called from
    /// the batch processor's own thread (never from the runtime). Bodies of
    /// answers are read up to 64 KiB: a collector answers with a few bytes.
    #[derive(Debug)]
    struct Http(reqwest::blocking::Client);

    const MAX_ANSWER: u64 = 64 * 1024;

    #[async_trait::async_trait]
    impl opentelemetry_http::HttpClient for Http {
        async fn send_bytes(
            &self,
            request: http::Request<bytes::Bytes>,
        ) -> Result<http::Response<bytes::Bytes>, opentelemetry_http::HttpError> {
            use std::io::Read;
            let request: reqwest::blocking::Request = request.try_into()?;
            let response = self.0.execute(request)?;
            let status = response.status();
            let mut body = Vec::new();
            response.take(MAX_ANSWER).read_to_end(&mut body)?;
            Ok(http::Response::builder()
                .status(status)
                .body(bytes::Bytes::from(body))?)
        }
    }

    impl Exporter {
        /// Start exporting to `cfg.otlp_endpoint` (a base URL: spans go to
        /// `<endpoint>/v1/traces`, as with `OTEL_EXPORTER_OTLP_ENDPOINT`;
        /// headers such as an API key come from `OTEL_EXPORTER_OTLP_HEADERS`).
        /// `instance` names this node (`service.instance.id`).
        pub fn start(cfg: &TelemetryConfig, instance: &str) -> Result<Self, TelemetryError> {
            let endpoint = cfg
                .otlp_endpoint
                .as_deref()
                .ok_or_else(|| TelemetryError("telemetry.otlp_endpoint is not set".into()))?;
            let url = traces_url(endpoint);
            // Built on a thread of its own: the blocking client starts a
            // runtime of its own, which may not be built inside ours.
            let http = std::thread::scope(|s| {
                s.spawn(|| {
                    reqwest::blocking::Client::builder()
                        .timeout(Duration::from_secs(10))
                        .build()
                })
                .join()
            })
            .map_err(|_| TelemetryError("the HTTP client panicked".into()))?
            .map_err(|e| TelemetryError(format!("cannot build an HTTP client: {e}")))?;
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_http_client(Http(http))
                .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
                .with_endpoint(url)
                .with_timeout(Duration::from_secs(10))
                .build()
                .map_err(|e| TelemetryError(format!("telemetry.otlp_endpoint: {e}")))?;
            let resource = opentelemetry_sdk::Resource::builder()
                .with_service_name(cfg.service_name.clone())
                .with_attribute(opentelemetry::KeyValue::new(
                    "service.instance.id",
                    instance.to_string(),
                ))
                .build();
            let sampler =
                Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(cfg.sample_ratio)));
            let provider = SdkTracerProvider::builder()
                .with_span_processor(BatchSpanProcessor::builder(exporter).build())
                .with_sampler(sampler)
                .with_resource(resource)
                .build();
            Ok(Exporter { provider })
        }

        /// The `tracing` layer that turns this crate's spans into
        /// OpenTelemetry spans sent by this exporter.
        pub fn layer<S>(&self) -> impl tracing_subscriber::Layer<S> + use<S>
        where
            S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
        {
            tracing_opentelemetry::layer().with_tracer(self.provider.tracer("proto_tasker"))
        }

        /// Send the buffered spans and stop (at most a few seconds).
        pub async fn shutdown(self) {
            let provider = self.provider;
            let _ = tokio::task::spawn_blocking(move || {
                if let Err(e) = provider.shutdown_with_timeout(Duration::from_secs(5)) {
                    eprintln!("proto_tasker: telemetry: {e}");
                }
            })
            .await;
        }
    }

    /// `<endpoint>/v1/traces`, unless the endpoint already names that path.
    pub(crate) fn traces_url(endpoint: &str) -> String {
        let base = endpoint.trim_end_matches('/');
        if base.ends_with("/v1/traces") {
            base.to_string()
        } else {
            format!("{base}/v1/traces")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparents_are_checked_and_round_trip() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let (t, s, f) = parse_traceparent(tp).expect("valid");
        assert_eq!(f, 1);
        assert_eq!(format_traceparent(t, s, f), tp);
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0g",
            "00-4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01 ",
            "00-4bf92f3577b34da6a3ce929d0e0e47é-00f067aa0ba902b7-01",
        ] {
            assert!(parse_traceparent(bad).is_none(), "{bad:?} was accepted");
        }
    }

    #[cfg(feature = "otlp")]
    #[test]
    fn the_traces_path_is_added_once() {
        assert_eq!(
            export::traces_url("http://127.0.0.1:4318"),
            "http://127.0.0.1:4318/v1/traces"
        );
        assert_eq!(
            export::traces_url("http://tempo:4318/"),
            "http://tempo:4318/v1/traces"
        );
        assert_eq!(
            export::traces_url("http://c/v1/traces"),
            "http://c/v1/traces"
        );
    }
}
