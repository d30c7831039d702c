//! What the sidecar tells its operators: Prometheus metrics (served on the admin listener)
//! and one log line per call. Both are fed when a call ends, from its facts.

mod call_log;
pub mod metrics;

use std::time::Duration;

use crate::config::TelemetryArgs;
use crate::facts::CallFacts;

pub use metrics::{HealthAnswer, Metrics, Sources, Unserved};

pub struct Telemetry {
    pub metrics: Metrics,
    access_log: bool,
}

impl Telemetry {
    pub fn new(args: &TelemetryArgs) -> Self {
        Telemetry { metrics: Metrics::new(args), access_log: args.access_log }
    }

    pub fn call_started(&self) {
        self.metrics.inflight.inc();
    }

    /// `upstream`: how long the call waited on Milvus; None when the sidecar answered it
    /// itself without forwarding (a refusal).
    pub fn call_ended(&self, facts: &CallFacts, upstream: Option<Duration>) {
        self.metrics.inflight.dec();
        self.metrics.observe_call(facts, upstream);
        call_log::write(facts, self.access_log);
    }
}
