//! Prometheus metrics. Per-call series are updated with atomics only: each known method's
//! counters and histograms are looked up once and kept, so a call costs a hash of its
//! method name and a few atomic adds. Everything else (recording, permissions cache,
//! PostgreSQL pool, upstream) is read from where it is already counted when scraped.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::Duration;

use foldhash::{HashMap, HashSet};
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

use crate::auth::authority::Authority;
use crate::config::TelemetryArgs;
use crate::facts::CallFacts;
use crate::milvus::access;
use crate::proxy::Upstream;
use crate::readiness::PROBE_TIMEOUT;
use crate::record::{PgRecorder, Stats};
use crate::store::Pool;
use crate::store::maintenance::MaintenanceStats;

/// How a call ended, as the `outcome` label says it.
#[derive(Clone, Copy)]
enum Outcome {
    Ok = 0,
    /// gRPC OK, but Milvus reported a failure in the reply.
    MilvusError = 1,
    /// A non-OK gRPC status from Milvus, or the upstream could not be reached.
    GrpcError = 2,
    /// The sidecar answered without forwarding: authentication, permission, bad input.
    Refused = 3,
}

const OUTCOMES: [&str; 4] = ["ok", "milvus_error", "grpc_error", "refused"];

impl Outcome {
    fn of(facts: &CallFacts, forwarded: bool) -> Self {
        match (forwarded, facts.outcome.grpc, facts.outcome.milvus_code) {
            (false, ..) => Outcome::Refused,
            (true, tonic::Code::Ok, 0) => Outcome::Ok,
            (true, tonic::Code::Ok, _) => Outcome::MilvusError,
            (true, ..) => Outcome::GrpcError,
        }
    }
}

/// Why a client connection was closed before HTTP/2 began on it (the `reason` label of
/// `milvus_sidecar_client_connections_unserved_total`).
#[derive(Clone, Copy, Debug)]
pub enum Unserved {
    /// It closed, or was reset, before sending anything: a TCP health check, a port scan.
    Closed = 0,
    /// Its TLS handshake failed (untrusted certificate, none where one is required, not TLS).
    TlsRefused = 1,
    /// Its TLS handshake or HTTP/2 preface was not done within `--handshake-timeout`.
    HandshakeTimeout = 2,
    /// It spoke something other than HTTP/2: HTTP/1, TLS to a plaintext listener, other bytes.
    NotHttp2 = 3,
}

const UNSERVED: [&str; 4] = ["closed", "tls_refused", "handshake_timeout", "not_http2"];

/// What a gRPC health check on the client listener was told (the `answer` label of
/// `milvus_sidecar_health_checks_total`).
#[derive(Clone, Copy, Debug)]
pub enum HealthAnswer {
    Serving = 0,
    NotServing = 1,
    /// An error status: an unknown service, `Watch`, a malformed request.
    Refused = 2,
}

const HEALTH_ANSWERS: [&str; 3] = ["serving", "not_serving", "refused"];

/// The client connections' series.
struct ConnectionSeries {
    open: IntGauge,
    limit: IntGauge,
    unserved: [IntCounter; 4],
    health_checks: [IntCounter; 3],
}

/// A client connection, counted as open until dropped.
pub struct OpenConnection(IntGauge);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// One method's series, resolved once.
struct MethodSeries {
    calls: [IntCounter; 4],
    overhead: Histogram,
    upstream: Histogram,
}

/// Where scraped values come from; attached as the parts start.
#[derive(Default)]
pub struct Sources {
    pub recording: Option<(Arc<Stats>, Arc<PgRecorder>)>,
    pub pool: Option<Pool>,
    pub auth: Option<Arc<Authority>>,
    pub maintenance: Option<Arc<MaintenanceStats>>,
}

pub struct Metrics {
    registry: Registry,
    /// Index of each known method's slot in `methods`; unknown methods share the last.
    method_index: HashMap<&'static str, usize>,
    methods: Box<[OnceLock<MethodSeries>]>,
    calls: IntCounterVec,
    overhead: HistogramVec,
    upstream: HistogramVec,
    pub(super) inflight: IntGauge,
    connections: ConnectionSeries,
    collections: Collections,
    pulled: Pulled,
    sources: Mutex<Sources>,
}

/// Series whose values are read from elsewhere at scrape time.
struct Pulled {
    auth_decisions: IntCounterVec,
    auth_cache: IntCounterVec,
    password_checks: IntCounter,
    auth_changes: IntCounterVec,
    queue_depth: IntGauge,
    queue_bytes: IntGauge,
    rows_written: IntCounter,
    rows_spilled: IntCounter,
    rows_replayed: IntCounter,
    rows_rejected: IntCounter,
    rows_dropped: IntCounter,
    pool_connections: IntGaugeVec,
    postgres_up: IntGauge,
    upstream_up: IntGauge,
    maintenance_runs: IntCounterVec,
    maintenance_last_success: IntGauge,
    maintenance_actions: IntCounterVec,
}

/// Latency buckets from 20 µs to 10 s: the sidecar's own time sits at the low end,
/// Milvus's anywhere.
const LATENCY_BUCKETS: &[f64] =
    &[0.00002, 0.00005, 0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0];

/// Label of the calls on methods this build does not know, and on collections without a
/// label of their own: bounded, whatever clients send.
const OTHER: &str = "other";

impl Metrics {
    /// The gauge of calls in progress (`milvus_sidecar_inflight_calls`).
    pub fn calls_in_flight(&self) -> IntGauge {
        self.inflight.clone()
    }

    pub fn new(args: &TelemetryArgs) -> Self {
        let registry = Registry::new();
        let calls = IntCounterVec::new(
            Opts::new("milvus_sidecar_calls_total", "Calls by method and outcome"),
            &["method", "outcome"],
        )
        .expect("valid metric");
        let histogram = |name: &str, help: &str| {
            HistogramVec::new(HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec()), &["method"])
                .expect("valid metric")
        };
        let overhead = histogram(
            "milvus_sidecar_overhead_seconds",
            "Time a call spent in the sidecar itself (its whole duration minus the upstream's)",
        );
        let upstream = histogram(
            "milvus_sidecar_upstream_seconds",
            "Time a forwarded call spent waiting on the upstream Milvus, until its reply ended",
        );
        let inflight = IntGauge::new("milvus_sidecar_inflight_calls", "Calls in progress").expect("valid metric");
        let collections = Collections::new(args);
        let pulled = Pulled::new();
        let unserved = IntCounterVec::new(
            Opts::new(
                "milvus_sidecar_client_connections_unserved_total",
                "Client connections closed before HTTP/2 began on them, by reason",
            ),
            &["reason"],
        )
        .expect("valid metric");
        let health_checks = IntCounterVec::new(
            Opts::new(
                "milvus_sidecar_health_checks_total",
                "gRPC health checks (grpc.health.v1.Health) answered on the client listener, by answer",
            ),
            &["answer"],
        )
        .expect("valid metric");
        let connections = ConnectionSeries {
            open: IntGauge::new("milvus_sidecar_client_connections", "Client connections open").expect("valid metric"),
            limit: IntGauge::new(
                "milvus_sidecar_client_connections_limit",
                "Client connections served at once (--max-connections); past it, new ones wait",
            )
            .expect("valid metric"),
            unserved: UNSERVED.map(|reason| unserved.with_label_values(&[reason])),
            health_checks: HEALTH_ANSWERS.map(|answer| health_checks.with_label_values(&[answer])),
        };
        let build_info = IntGaugeVec::new(Opts::new("milvus_sidecar_build_info", "The running build"), &["version"])
            .expect("valid metric");
        build_info.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);

        let collectors: Vec<Box<dyn prometheus::core::Collector>> = vec![
            Box::new(build_info),
            Box::new(calls.clone()),
            Box::new(overhead.clone()),
            Box::new(upstream.clone()),
            Box::new(inflight.clone()),
            Box::new(connections.open.clone()),
            Box::new(connections.limit.clone()),
            Box::new(unserved),
            Box::new(health_checks),
            Box::new(collections.calls.clone()),
            Box::new(pulled.auth_decisions.clone()),
            Box::new(pulled.auth_cache.clone()),
            Box::new(pulled.password_checks.clone()),
            Box::new(pulled.auth_changes.clone()),
            Box::new(pulled.queue_depth.clone()),
            Box::new(pulled.queue_bytes.clone()),
            Box::new(pulled.rows_written.clone()),
            Box::new(pulled.rows_spilled.clone()),
            Box::new(pulled.rows_replayed.clone()),
            Box::new(pulled.rows_rejected.clone()),
            Box::new(pulled.rows_dropped.clone()),
            Box::new(pulled.pool_connections.clone()),
            Box::new(pulled.postgres_up.clone()),
            Box::new(pulled.upstream_up.clone()),
            Box::new(pulled.maintenance_runs.clone()),
            Box::new(pulled.maintenance_last_success.clone()),
            Box::new(pulled.maintenance_actions.clone()),
        ];
        for collector in collectors {
            registry.register(collector).expect("metric names are unique");
        }
        let method_index = access::KNOWN.iter().enumerate().map(|(i, name)| (*name, i)).collect();
        let methods = (0..=access::KNOWN.len()).map(|_| OnceLock::new()).collect();
        Metrics {
            registry,
            method_index,
            methods,
            calls,
            overhead,
            upstream,
            inflight,
            connections,
            collections,
            pulled,
            sources: Mutex::default(),
        }
    }

    /// Shows the listener's `--max-connections`.
    pub fn connections_limited_to(&self, max: u32) {
        self.connections.limit.set(i64::from(max));
    }

    /// Counts a client connection as open until the value returned is dropped.
    pub fn connection_opened(&self) -> OpenConnection {
        self.connections.open.inc();
        OpenConnection(self.connections.open.clone())
    }

    pub fn connection_unserved(&self, why: Unserved) {
        self.connections.unserved[why as usize].inc();
    }

    pub fn health_checked(&self, answer: HealthAnswer) {
        self.connections.health_checks[answer as usize].inc();
    }

    /// Lets the scrape read the recording pipeline, the pool and the permission caches.
    pub fn attach(&self, sources: Sources) {
        if let Some((stats, _)) = &sources.recording {
            // The writer observes its batch sizes itself; the registry only shows them.
            let _ = self.registry.register(Box::new(stats.batch_rows.clone()));
        }
        *self.sources.lock().unwrap() = sources;
    }

    pub(super) fn observe_call(&self, facts: &CallFacts, upstream: Option<Duration>) {
        let outcome = Outcome::of(facts, upstream.is_some());
        let series = self.series(facts.method.name());
        series.calls[outcome as usize].inc();
        let upstream = upstream.unwrap_or_default();
        series.overhead.observe(facts.duration.saturating_sub(upstream).as_secs_f64());
        if !matches!(outcome, Outcome::Refused) {
            series.upstream.observe(upstream.as_secs_f64());
        }
        if let Some(collection) = &facts.request.collection {
            self.collections.count(&facts.database, collection, outcome);
        }
    }

    fn series(&self, method: &str) -> &MethodSeries {
        let (slot, label) = match self.method_index.get_key_value(method) {
            Some((name, i)) => (*i, *name),
            None => (self.methods.len() - 1, OTHER),
        };
        self.methods[slot].get_or_init(|| MethodSeries {
            calls: OUTCOMES.map(|outcome| self.calls.with_label_values(&[label, outcome])),
            overhead: self.overhead.with_label_values(&[label]),
            upstream: self.upstream.with_label_values(&[label]),
        })
    }

    /// The Prometheus text exposition of every metric, read fresh.
    pub async fn render(&self, upstream: &Upstream) -> String {
        let pool = self.pull();
        let p = &self.pulled;
        if let Some(pool) = pool {
            let up = crate::store::probe(&pool, PROBE_TIMEOUT).await.is_ok();
            p.postgres_up.set(i64::from(up));
        }
        let upstream_up = match upstream.reachable() {
            Some(up) => up,
            None => upstream.probe(PROBE_TIMEOUT).await.is_ok(),
        };
        p.upstream_up.set(i64::from(upstream_up));

        let mut out = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut out).expect("text encoding into memory");
        String::from_utf8(out).expect("the text format is UTF-8")
    }

    /// The PostgreSQL pool, when the sidecar uses one.
    pub fn pool(&self) -> Option<Pool> {
        self.sources.lock().unwrap().pool.clone()
    }

    /// Copies what is counted elsewhere into the registry; returns the pool to probe.
    fn pull(&self) -> Option<Pool> {
        // Held throughout, so that two scrapes at once cannot both add the same difference.
        let sources = self.sources.lock().unwrap();
        let p = &self.pulled;
        if let Some((stats, recorder)) = &sources.recording {
            set_counter(&p.rows_written, stats.rows_written.load(Ordering::Relaxed));
            set_counter(&p.rows_spilled, stats.records_spilled.load(Ordering::Relaxed));
            set_counter(&p.rows_replayed, stats.records_replayed.load(Ordering::Relaxed));
            set_counter(&p.rows_rejected, stats.records_rejected.load(Ordering::Relaxed));
            set_counter(&p.rows_dropped, stats.records_dropped.load(Ordering::Relaxed));
            p.queue_depth.set(recorder.queue_depth() as i64);
            p.queue_bytes.set(i64::try_from(recorder.queue_bytes()).unwrap_or(i64::MAX));
        }
        if let Some(auth) = &sources.auth {
            let s = &auth.stats;
            for (decision, counter) in [
                ("allowed", &s.allowed),
                ("denied", &s.denied),
                ("unauthenticated", &s.unauthenticated),
                ("unavailable", &s.unavailable),
            ] {
                set_counter(&p.auth_decisions.with_label_values(&[decision]), counter.load(Ordering::Relaxed));
            }
            for (cache, result, counter) in [
                ("credentials", "hit", &s.credential_hits),
                ("credentials", "miss", &s.credential_misses),
                ("grants", "hit", &s.grant_hits),
                ("grants", "miss", &s.grant_misses),
            ] {
                set_counter(&p.auth_cache.with_label_values(&[cache, result]), counter.load(Ordering::Relaxed));
            }
            set_counter(&p.password_checks, s.password_checks.load(Ordering::Relaxed));
            for (table, counter) in [
                ("users", &s.users_changes),
                ("permissions", &s.permissions_changes),
                ("collections", &s.collections_changes),
                ("other", &s.other_changes),
            ] {
                set_counter(&p.auth_changes.with_label_values(&[table]), counter.load(Ordering::Relaxed));
            }
        }
        if let Some(m) = &sources.maintenance {
            for (result, counter) in [("ok", &m.runs_ok), ("failed", &m.runs_failed)] {
                set_counter(&p.maintenance_runs.with_label_values(&[result]), counter.load(Ordering::Relaxed));
            }
            p.maintenance_last_success.set(m.last_success.load(Ordering::Relaxed) as i64);
            for (action, counter) in [
                ("partition_created", &m.partitions_created),
                ("partition_failed", &m.partitions_failed),
                ("partition_dropped", &m.partitions_dropped),
                ("index_built", &m.indexes_built),
                ("key_swapped", &m.keys_swapped),
            ] {
                set_counter(&p.maintenance_actions.with_label_values(&[action]), counter.load(Ordering::Relaxed));
            }
        }
        if let Some(pool) = &sources.pool {
            let state = pool.state();
            let idle = i64::from(state.idle_connections);
            p.pool_connections.with_label_values(&["idle"]).set(idle);
            p.pool_connections.with_label_values(&["in_use"]).set(i64::from(state.connections) - idle);
        }
        sources.pool.clone()
    }
}

/// Moves a counter up to `value`, counted elsewhere.
fn set_counter(counter: &IntCounter, value: u64) {
    let current = counter.get();
    if value > current {
        counter.inc_by(value - current);
    }
}

impl Pulled {
    fn new() -> Self {
        let counter = |name: &str, help: &str| IntCounter::new(name, help).expect("valid metric");
        let gauge = |name: &str, help: &str| IntGauge::new(name, help).expect("valid metric");
        Pulled {
            auth_decisions: IntCounterVec::new(
                Opts::new(
                    "milvus_sidecar_auth_decisions_total",
                    "Authentication and permission decisions (unavailable: PostgreSQL was needed and away)",
                ),
                &["decision"],
            )
            .expect("valid metric"),
            auth_cache: IntCounterVec::new(
                Opts::new("milvus_sidecar_auth_cache_lookups_total", "Credential and grant cache lookups"),
                &["cache", "result"],
            )
            .expect("valid metric"),
            password_checks: counter(
                "milvus_sidecar_auth_password_checks_total",
                "argon2 password verifications (a credential is verified once, then cached)",
            ),
            auth_changes: IntCounterVec::new(
                Opts::new(
                    "milvus_sidecar_auth_change_notifications_total",
                    "Change notifications from PostgreSQL acted on, by table (each clears the cached grants; users also credentials)",
                ),
                &["table"],
            )
            .expect("valid metric"),
            queue_depth: gauge("milvus_sidecar_recording_queue_depth", "Call records waiting for the writer"),
            queue_bytes: gauge(
                "milvus_sidecar_recording_queue_bytes",
                "Memory the call records waiting for the writer hold, about (bounded by --queue-max-bytes)",
            ),
            rows_written: counter("milvus_sidecar_recording_rows_written_total", "Rows written to PostgreSQL"),
            rows_spilled: counter(
                "milvus_sidecar_recording_rows_spilled_total",
                "Call records written to the spill file while PostgreSQL was away or behind",
            ),
            rows_replayed: counter(
                "milvus_sidecar_recording_rows_replayed_total",
                "Spilled call records replayed into PostgreSQL",
            ),
            rows_rejected: counter(
                "milvus_sidecar_recording_rows_rejected_total",
                "Call records PostgreSQL refused for their content (kept in rejected.jsonl)",
            ),
            rows_dropped: counter(
                "milvus_sidecar_recording_rows_dropped_total",
                "Call records lost (queue full or spill file unwritable); should stay 0",
            ),
            pool_connections: IntGaugeVec::new(
                Opts::new("milvus_sidecar_postgres_pool_connections", "PostgreSQL pool connections by state"),
                &["state"],
            )
            .expect("valid metric"),
            postgres_up: gauge("milvus_sidecar_postgres_up", "Whether PostgreSQL answered at the last scrape"),
            upstream_up: gauge("milvus_sidecar_upstream_up", "Whether the last call reached the upstream Milvus"),
            maintenance_runs: IntCounterVec::new(
                Opts::new(
                    "milvus_sidecar_log_maintenance_runs_total",
                    "Rounds of log partition maintenance (at start, then hourly), by whether they completed",
                ),
                &["result"],
            )
            .expect("valid metric"),
            maintenance_last_success: gauge(
                "milvus_sidecar_log_maintenance_last_success_timestamp_seconds",
                "Unix time of the last completed round of log partition maintenance (0: none yet)",
            ),
            maintenance_actions: IntCounterVec::new(
                Opts::new(
                    "milvus_sidecar_log_maintenance_actions_total",
                    "What log partition maintenance did: partitions created, failed to create, dropped; indexes built; keys swapped",
                ),
                &["action"],
            )
            .expect("valid metric"),
        }
    }
}

/// Calls per collection, for a bounded set of collections: the allow-list, or else the
/// first `limit` collections called. Every other collection counts under `other`.
struct Collections {
    calls: IntCounterVec,
    /// database -> collections with a label of their own.
    allow: Option<HashMap<String, HashSet<String>>>,
    limit: usize,
    /// database -> collection -> counters per outcome.
    labelled: RwLock<HashMap<String, HashMap<String, [IntCounter; 4]>>>,
    other: [IntCounter; 4],
}

impl Collections {
    fn new(args: &TelemetryArgs) -> Self {
        let calls = IntCounterVec::new(
            Opts::new(
                "milvus_sidecar_collection_calls_total",
                "Calls by collection (`db.name`; `other` beyond the allow-list or limit) and outcome",
            ),
            &["collection", "outcome"],
        )
        .expect("valid metric");
        let allow = (!args.metrics_collections.is_empty()).then(|| {
            let mut allow: HashMap<String, HashSet<String>> = HashMap::default();
            for c in &args.metrics_collections {
                let (db, name) = c.split_once('.').unwrap_or((crate::facts::DEFAULT_DATABASE, c));
                allow.entry(db.to_owned()).or_default().insert(name.to_owned());
            }
            allow
        });
        let other = OUTCOMES.map(|outcome| calls.with_label_values(&[OTHER, outcome]));
        Collections { calls, allow, limit: args.metrics_collection_limit, labelled: RwLock::default(), other }
    }

    fn count(&self, database: &str, collection: &str, outcome: Outcome) {
        let i = outcome as usize;
        {
            let labelled = self.labelled.read().unwrap();
            if let Some(counters) = labelled.get(database).and_then(|c| c.get(collection)) {
                counters[i].inc();
                return;
            }
            if !self.has_room(&labelled, database, collection) {
                self.other[i].inc();
                return;
            }
        }
        let mut labelled = self.labelled.write().unwrap();
        // Another call may have taken the last place meanwhile.
        let known = labelled.get(database).is_some_and(|c| c.contains_key(collection));
        if !known && !self.has_room(&labelled, database, collection) {
            self.other[i].inc();
            return;
        }
        let label = format!("{database}.{collection}");
        let counters = labelled
            .entry(database.to_owned())
            .or_default()
            .entry(collection.to_owned())
            .or_insert_with(|| OUTCOMES.map(|outcome| self.calls.with_label_values(&[label.as_str(), outcome])));
        counters[i].inc();
    }

    fn has_room(&self, labelled: &HashMap<String, HashMap<String, [IntCounter; 4]>>, db: &str, name: &str) -> bool {
        match &self.allow {
            Some(allow) => allow.get(db).is_some_and(|names| names.contains(name)),
            None => labelled.values().map(HashMap::len).sum::<usize>() < self.limit,
        }
    }
}
