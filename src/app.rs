//! The whole sidecar wired together: PostgreSQL (migrations, settings, partitions, the
//! record writer) behind the proxy. `main` and the integration tests start it the same way.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use crate::auth::authority::{AuthConfig, Authority, bootstrap_root};
use crate::config::Config;
use crate::record::{NoRecorder, Recorder, Recording};
use crate::settings::Settings;
use crate::store::{self, maintenance, migrate, system_config};
use crate::telemetry::{Sources, Telemetry};
use crate::{Running, start};

pub struct App {
    pub running: Running,
    pub settings: Arc<Settings>,
    /// None when recording is off (`--no-recording`).
    pub recording: Option<Recording>,
    background: Vec<tokio::task::JoinHandle<()>>,
    /// Calls in progress, as `/metrics` reports them.
    pub calls_in_flight: prometheus::IntGauge,
}

impl App {
    pub async fn start(config: Config) -> anyhow::Result<App> {
        let settings = Arc::new(Settings::default());
        let telemetry = Arc::new(Telemetry::new(&config.telemetry));
        let mut sources = Sources::default();
        let mut background = Vec::new();
        let mut auth = None;
        let (recorder, recording): (Arc<dyn Recorder>, _) = if config.recording.no_recording {
            if !config.auth.no_auth {
                anyhow::bail!(
                    "authentication needs PostgreSQL (users and grants live there): drop --no-recording, \
                     or pass --no-auth as well to let every call through unchecked"
                );
            }
            tracing::warn!("recording is off (--no-recording): calls are logged, nothing is written to PostgreSQL");
            (Arc::new(NoRecorder), None)
        } else {
            let pg = config.database.pg_config()?;
            let mut client = store::wait_for_postgres(&pg, config.database.db_startup_wait).await?;
            if !config.recording.skip_migrations {
                let applied = migrate::run(&mut client).await?;
                if !applied.is_empty() {
                    tracing::info!(?applied, "database migrated");
                }
            }
            // Settings before the first call, so the first calls already follow them.
            system_config::load(&client, &settings).await.context("cannot read system_config")?;
            drop(client);
            let pool = store::pool(pg.clone(), config.database.db_pool_size, store::CheckOut::Tested);
            if !config.auth.no_auth {
                bootstrap_root(&pool, &config.auth.root_password).await.context("cannot create the root user")?;
                let a = &config.auth;
                let authority = Arc::new(Authority::new(
                    pool.clone(),
                    AuthConfig {
                        credential_ttl: a.credential_cache_ttl,
                        anonymous_user: a.anonymous_user.clone(),
                        unknown_methods: a.unknown_methods,
                        fail_open: a.auth_fail_open,
                    },
                    settings.clone(),
                ));
                background.push(authority.watch(pg.clone()).await);
                sources.auth = Some(authority.clone());
                auth = Some(authority);
            }
            // Collections Milvus held before the sidecar (or got behind its back) join the
            // mirror; in the background, so serving never waits on it.
            background.push(crate::sync::spawn(&config, pg.clone()));
            background.push(system_config::watch(pg.clone(), settings.clone()));
            let maintained = Arc::new(maintenance::MaintenanceStats::default());
            background.push(maintenance::spawn(pool.clone(), settings.clone(), maintained.clone()));
            sources.maintenance = Some(maintained);
            sources.pool = Some(pool.clone());
            let recording = Recording::start(pg, settings.clone(), &config.recording)
                .await
                .with_context(|| format!("cannot open the spill directory {}", config.recording.spill_dir.display()))?;
            sources.recording = Some((recording.stats.clone(), recording.recorder.clone()));
            (recording.recorder.clone() as Arc<dyn Recorder>, Some(recording))
        };
        telemetry.metrics.attach(sources);
        if auth.is_none() {
            tracing::warn!("authentication is OFF (--no-auth): every call is forwarded without checks");
        }
        let calls_in_flight = telemetry.metrics.calls_in_flight();
        let running = start(config, recorder, telemetry, settings.clone(), auth).await?;
        Ok(App { running, settings, recording, background, calls_in_flight })
    }

    /// Drains in-flight calls, then writes (or spills) every queued record.
    pub async fn shutdown(self) {
        self.running.shutdown().await;
        if let Some(recording) = self.recording
            && tokio::time::timeout(Duration::from_secs(30), recording.finish()).await.is_err()
        {
            tracing::error!("the record writer did not finish within 30 s");
        }
        for task in self.background {
            task.abort();
        }
    }
}
