//! Whether the sidecar should be sent calls: not while it drains for shutdown, nor while the
//! upstream Milvus does not answer. `/readyz` on the admin listener and the gRPC health
//! service on the client listener both ask here, so the two decide alike (the health
//! service on a probe up to a second old, `/readyz` on a fresh one).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::Mutex;

use crate::proxy::Upstream;

/// How long a probe of the upstream may take before it counts as no answer.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

pub struct Readiness {
    upstream: Upstream,
    draining: Arc<AtomicBool>,
    /// The last probe's time and answer. Behind a lock so that callers arriving together
    /// share one probe: anyone can send health checks, and each must not become a call to
    /// Milvus.
    last: Mutex<Option<(Instant, Result<(), String>)>>,
}

impl Readiness {
    pub fn new(upstream: Upstream, draining: Arc<AtomicBool>) -> Self {
        Readiness { upstream, draining, last: Mutex::new(None) }
    }

    pub fn upstream_name(&self) -> &Arc<str> {
        self.upstream.name()
    }

    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Whether the upstream answered a probe sent at most `max_age` ago; probes again
    /// when the last one is older.
    pub async fn upstream(&self, max_age: Duration) -> Result<(), String> {
        let mut last = self.last.lock().await;
        if let Some((at, answer)) = last.as_ref()
            && at.elapsed() <= max_age
        {
            return answer.clone();
        }
        let answer = self.upstream.probe(PROBE_TIMEOUT).await;
        *last = Some((Instant::now(), answer.clone()));
        answer
    }
}
