//! Prometheus metrics, served at `/metrics`. One registry per server (no globals), so tests
//! running several servers in one process see their own numbers.

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabel {
    pub endpoint: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabel {
    pub code: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabel {
    pub status: &'static str,
}

pub struct Metrics {
    registry: Registry,
    pub connections: Family<EndpointLabel, Gauge>,
    pub active_runs: Gauge,
    pub chunks_sent: Counter,
    pub bytes_sent: Counter,
    pub auth_failures: Family<ReasonLabel, Counter>,
    pub closes: Family<CodeLabel, Counter>,
    pub slow_client_closes: Counter,
    pub runs_finished: Family<StatusLabel, Counter>,
    pub time_to_first_token: Histogram,
    pub run_duration: Histogram,
    /// Runs driven elsewhere that this instance mirrors for its sockets.
    pub remote_watchers: Gauge,
    pub reaped_runs: Counter,
    pub runs_announced_again: Counter,
    pub fenced_runs: Counter,
    pub redis_append_seconds: Histogram,
    pub redis_errors: Counter,
    pub csp_violations: Counter,
    pub csp_reports_unlogged: Counter,
    pub refused_connections: Family<ReasonLabel, Counter>,
    pub overload_refusals: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("wadi");
        let connections = Family::<EndpointLabel, Gauge>::default();
        registry.register(
            "ws_connections",
            "Open WebSocket connections by endpoint (chat, run)",
            connections.clone(),
        );
        let active_runs = Gauge::default();
        registry.register(
            "active_runs",
            "Runs this instance drives that are streaming now",
            active_runs.clone(),
        );
        let chunks_sent = Counter::default();
        registry.register(
            "chunks_sent",
            "Chunk frames handed to sockets and SSE streams",
            chunks_sent.clone(),
        );
        let bytes_sent = Counter::default();
        registry.register(
            "bytes_sent",
            "Bytes of frames handed to sockets and SSE streams",
            bytes_sent.clone(),
        );
        let auth_failures = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "auth_failures",
            "Refused tokens by reason, on sockets and REST requests alike",
            auth_failures.clone(),
        );
        let closes = Family::<CodeLabel, Counter>::default();
        registry.register(
            "ws_closes",
            "WebSocket closes initiated by the server, by close code",
            closes.clone(),
        );
        let slow_client_closes = Counter::default();
        registry.register(
            "slow_client_closes",
            "Sockets closed because the client did not read fast enough",
            slow_client_closes.clone(),
        );
        let runs_finished = Family::<StatusLabel, Counter>::default();
        registry.register(
            "runs_finished",
            "Runs ended, by status",
            runs_finished.clone(),
        );
        // 5 ms … ~20 s.
        let time_to_first_token = Histogram::new(
            prometheus_client::metrics::histogram::exponential_buckets(0.005, 2.0, 13),
        );
        registry.register(
            "time_to_first_token_seconds",
            "From run start to the first chunk",
            time_to_first_token.clone(),
        );
        // 50 ms … ~27 min.
        let run_duration = Histogram::new(
            prometheus_client::metrics::histogram::exponential_buckets(0.05, 2.0, 16),
        );
        registry.register(
            "run_duration_seconds",
            "From run start to its end, whatever the status",
            run_duration.clone(),
        );
        let remote_watchers = Gauge::default();
        registry.register(
            "remote_watchers",
            "Runs driven by other instances that sockets here follow",
            remote_watchers.clone(),
        );
        let runs_announced_again = Counter::default();
        registry.register(
            "runs_announced_again",
            "Runs started elsewhere announced to sockets here from the store, after a gap in the cluster's events",
            runs_announced_again.clone(),
        );
        let reaped_runs = Counter::default();
        registry.register(
            "reaped_runs",
            "Runs of a dead instance (or of no task) ended here as interrupted or stopped",
            reaped_runs.clone(),
        );
        let fenced_runs = Counter::default();
        registry.register(
            "fenced_runs",
            "Runs this instance stopped writing because another reaped them",
            fenced_runs.clone(),
        );
        // 0.1 ms … ~3 s.
        let redis_append_seconds = Histogram::new(
            prometheus_client::metrics::histogram::exponential_buckets(0.0001, 2.0, 15),
        );
        registry.register(
            "redis_append_seconds",
            "Time of one append of chunks to a run's Redis log",
            redis_append_seconds.clone(),
        );
        let redis_errors = Counter::default();
        registry.register(
            "redis_errors",
            "Redis commands that failed and connections that broke",
            redis_errors.clone(),
        );
        let csp_violations = Counter::default();
        registry.register(
            "csp_violations",
            "Content-Security-Policy violations reported by browsers",
            csp_violations.clone(),
        );
        let csp_reports_unlogged = Counter::default();
        registry.register(
            "csp_reports_unlogged",
            "Content-Security-Policy reports counted but not logged (over the logging budget)",
            csp_reports_unlogged.clone(),
        );
        let refused_connections = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "refused_connections",
            "Sockets and streams refused by a cap, by which (total, address, unauthenticated, sse)",
            refused_connections.clone(),
        );
        let overload_refusals = Counter::default();
        registry.register(
            "overload_refusals",
            "New runs refused because this instance was past its load limits",
            overload_refusals.clone(),
        );
        Self {
            registry,
            connections,
            active_runs,
            chunks_sent,
            bytes_sent,
            auth_failures,
            closes,
            slow_client_closes,
            runs_finished,
            time_to_first_token,
            run_duration,
            remote_watchers,
            reaped_runs,
            runs_announced_again,
            fenced_runs,
            redis_append_seconds,
            redis_errors,
            csp_violations,
            csp_reports_unlogged,
            refused_connections,
            overload_refusals,
        }
    }

    pub fn refused_connection(&self, reason: &'static str) {
        self.refused_connections
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    /// Names this instance in the exposition (`wadi_instance_info{instance=…,mode=…} 1`).
    pub fn set_instance(&mut self, instance: &str, mode: &'static str) {
        let info = prometheus_client::metrics::info::Info::new(vec![
            ("instance".to_owned(), instance.to_owned()),
            ("mode".to_owned(), mode.to_owned()),
        ]);
        self.registry
            .register("instance", "This server process and its cluster mode", info);
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut text = String::new();
        if let Err(error) = encode(&mut text, &self.registry) {
            tracing::error!(%error, "cannot encode metrics");
        }
        text
    }

    pub fn auth_failure(&self, reason: &'static str) {
        self.auth_failures
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    pub fn close(&self, code: u16) {
        self.closes.get_or_create(&CodeLabel { code }).inc();
    }
}
