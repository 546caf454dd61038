//! Logs, traces and metrics, set up the same way in every binary.
//!
//! - [`init`]: structured logs (JSON or pretty) through `tracing`, and — when
//!   `OTEL_EXPORTER_OTLP_ENDPOINT` is set — spans exported over OTLP (gRPC or
//!   HTTP/protobuf per `OTEL_EXPORTER_OTLP_PROTOCOL`) in batches that never
//!   block a request. The returned [`Telemetry`] flushes on shutdown.
//! - [`metrics`]: the Prometheus recorder and the `/metrics` text.
//! - [`propagation`]: W3C `traceparent` in and out of HTTP headers and messages.
//! - [`shutdown`]: the cancellation token every service stops on.
//! - [`errors`]: [`ErrorChain`], an error with its causes, for logs.
//! - [`condition`]: [`Condition`], a state that goes bad and recovers (a store
//!   down, a subscription lost), logged on its changes only.
//! - [`redact`]: connection strings without their passwords, for logs.

pub mod condition;
pub mod errors;
pub mod metrics;
pub mod propagation;
pub mod redact;
pub mod shutdown;

pub use condition::Condition;
pub use errors::ErrorChain;

use opentelemetry::KeyValue;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{Protocol, SpanExporter, WithExportConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use thiserror::Error;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

#[derive(Debug, Error)]
pub enum TelemetryError {
    #[error("cannot build the OTLP exporter: {0}")]
    Exporter(String),
    #[error("invalid OTEL_EXPORTER_OTLP_PROTOCOL {0:?} (want grpc or http/protobuf)")]
    Protocol(String),
    #[error("cannot install the log subscriber: {0}")]
    Subscriber(String),
    #[error(
        "invalid OTEL_TRACES_SAMPLER {0:?} (want always_on, always_off, traceidratio, \
         parentbased_always_on, parentbased_always_off or parentbased_traceidratio)"
    )]
    Sampler(String),
    #[error("invalid OTEL_TRACES_SAMPLER_ARG {0:?} (want a ratio from 0 to 1)")]
    SamplerArg(String),
}

/// The trace sampler the standard `OTEL_TRACES_SAMPLER` and
/// `OTEL_TRACES_SAMPLER_ARG` name (default `parentbased_always_on`). The SDK
/// reads them too, but falls back silently on a typo; here a typo is an
/// error, so a replica never traces everything when it was told 1 %.
pub fn sampler(name: Option<&str>, arg: Option<&str>) -> Result<Sampler, TelemetryError> {
    let ratio = || -> Result<f64, TelemetryError> {
        match arg.map(str::trim).filter(|a| !a.is_empty()) {
            None => Ok(1.0),
            Some(raw) => raw
                .parse::<f64>()
                .ok()
                .filter(|r| (0.0..=1.0).contains(r))
                .ok_or_else(|| TelemetryError::SamplerArg(raw.to_owned())),
        }
    };
    let name = name.map(str::trim).filter(|n| !n.is_empty());
    Ok(match name.unwrap_or("parentbased_always_on") {
        "always_on" => Sampler::AlwaysOn,
        "always_off" => Sampler::AlwaysOff,
        "traceidratio" => Sampler::TraceIdRatioBased(ratio()?),
        "parentbased_always_on" => Sampler::ParentBased(Box::new(Sampler::AlwaysOn)),
        "parentbased_always_off" => Sampler::ParentBased(Box::new(Sampler::AlwaysOff)),
        "parentbased_traceidratio" => {
            Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(ratio()?)))
        }
        other => return Err(TelemetryError::Sampler(other.to_owned())),
    })
}

fn sampler_from_env() -> Result<Sampler, TelemetryError> {
    let var = |name| std::env::var(name).ok();
    sampler(
        var("OTEL_TRACES_SAMPLER").as_deref(),
        var("OTEL_TRACES_SAMPLER_ARG").as_deref(),
    )
}

/// Keeps the tracer provider alive; [`Telemetry::shutdown`] flushes spans.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Whether spans are being exported.
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }

    /// Runs a service until SIGTERM or Ctrl-C cancels the token it is given
    /// ([`shutdown::on_signal`]), then flushes buffered spans: how every
    /// service binary ends.
    pub async fn serve<F, E>(
        self,
        service: impl FnOnce(tokio_util::sync::CancellationToken) -> F,
    ) -> Result<(), E>
    where
        F: std::future::Future<Output = Result<(), E>>,
    {
        let result = service(shutdown::on_signal()).await;
        self.shutdown();
        result
    }

    /// Flushes buffered spans; call once before the process exits.
    pub fn shutdown(self) {
        if let Some(provider) = self.provider
            && let Err(err) = provider.shutdown()
        {
            eprintln!("telemetry: flushing spans failed: {err}");
        }
    }
}

/// Installs logging and, when configured, OTLP trace export. Also installs the
/// Prometheus recorder, so metrics count from the first request.
///
/// `RUST_LOG` sets the log filter (default `info`).
pub fn init(
    service_name: &str,
    instance_id: &str,
    json_logs: bool,
) -> Result<Telemetry, TelemetryError> {
    init_with(service_name, instance_id, json_logs, false)
}

/// [`init`] for a command-line tool whose standard output is its result
/// (a table, JSON for scripts): readable logs go to standard error.
pub fn init_cli(service_name: &str, instance_id: &str) -> Result<Telemetry, TelemetryError> {
    init_with(service_name, instance_id, false, true)
}

fn init_with(
    service_name: &str,
    instance_id: &str,
    json_logs: bool,
    to_stderr: bool,
) -> Result<Telemetry, TelemetryError> {
    metrics::install();
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());

    let provider = match std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT") {
        Ok(endpoint) if !endpoint.trim().is_empty() => {
            Some(tracer_provider(service_name, instance_id, &endpoint)?)
        }
        _ => None,
    };

    // Logs and traces are filtered apart: `RUST_LOG` (default `info`) for
    // logs, `OTEL_TRACES_FILTER` (default `info`) for exported spans, so
    // detailed traces never mean noisy logs.
    // The cluster client warns on every reconnect attempt to a dead node
    // (once a second, for as long as it is down); the services log the
    // state change once themselves.
    let log_filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,redis::cluster_handling=error"));
    let fmt = if json_logs {
        tracing_subscriber::fmt::layer()
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .with_filter(log_filter)
            .boxed()
    } else if to_stderr {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_filter(log_filter)
            .boxed()
    } else {
        tracing_subscriber::fmt::layer()
            .with_filter(log_filter)
            .boxed()
    };
    let otel = provider.as_ref().map(|provider| {
        let trace_filter = EnvFilter::try_from_env("OTEL_TRACES_FILTER")
            .unwrap_or_else(|_| EnvFilter::new("info"));
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer(service_name.to_owned()))
            .with_error_records_to_exceptions(true)
            .with_filter(trace_filter)
    });
    tracing_subscriber::registry()
        .with(fmt)
        .with(otel)
        .try_init()
        .map_err(|e| TelemetryError::Subscriber(e.to_string()))?;
    if provider.is_some() {
        tracing::info!(endpoint = %std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT").unwrap_or_default(), "exporting traces over OTLP");
    }
    Ok(Telemetry { provider })
}

fn tracer_provider(
    service_name: &str,
    instance_id: &str,
    endpoint: &str,
) -> Result<SdkTracerProvider, TelemetryError> {
    let protocol = std::env::var("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        .or_else(|_| std::env::var("OTEL_EXPORTER_OTLP_PROTOCOL"))
        .unwrap_or_else(|_| "grpc".to_owned());
    let exporter = match protocol.as_str() {
        "grpc" => SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .build(),
        "http/protobuf" => SpanExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpBinary)
            .with_endpoint(traces_url(endpoint))
            .build(),
        other => return Err(TelemetryError::Protocol(other.to_owned())),
    }
    .map_err(|e| TelemetryError::Exporter(e.to_string()))?;

    // The environment (OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES) is read by
    // the default builder; our name applies only when none is given there.
    let mut resource = Resource::builder()
        .with_attribute(KeyValue::new("service.instance.id", instance_id.to_owned()));
    if std::env::var("OTEL_SERVICE_NAME").map_or(true, |v| v.is_empty()) {
        resource = resource.with_service_name(service_name.to_owned());
    }
    Ok(SdkTracerProvider::builder()
        .with_sampler(sampler_from_env()?)
        .with_batch_exporter(exporter)
        .with_resource(resource.build())
        .build())
}

/// The signal path for HTTP export, as the OTLP spec derives it from the base.
fn traces_url(endpoint: &str) -> String {
    if endpoint.ends_with("/v1/traces") {
        endpoint.to_owned()
    } else {
        format!("{}/v1/traces", endpoint.trim_end_matches('/'))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sampler_follows_the_standard_settings_and_refuses_typos() {
        let cases = [
            (None, None, "ParentBased(AlwaysOn)"),
            (Some("always_on"), None, "AlwaysOn"),
            (Some("always_off"), None, "AlwaysOff"),
            (
                Some("traceidratio"),
                Some("0.25"),
                "TraceIdRatioBased(0.25)",
            ),
            (Some("traceidratio"), None, "TraceIdRatioBased(1.0)"),
            (
                Some("parentbased_always_off"),
                None,
                "ParentBased(AlwaysOff)",
            ),
            (
                Some("parentbased_traceidratio"),
                Some("0.01"),
                "ParentBased(TraceIdRatioBased(0.01))",
            ),
        ];
        for (name, arg, expected) in cases {
            let sampler = sampler(name, arg).unwrap();
            assert_eq!(format!("{sampler:?}"), expected, "{name:?} {arg:?}");
        }
        assert!(matches!(
            sampler(Some("alwayson"), None),
            Err(TelemetryError::Sampler(_))
        ));
        for arg in ["2", "-0.1", "half", "NaN"] {
            assert!(
                matches!(
                    sampler(Some("traceidratio"), Some(arg)),
                    Err(TelemetryError::SamplerArg(_))
                ),
                "{arg}"
            );
        }
    }
}
