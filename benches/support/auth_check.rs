//! What the permission check costs a call once its answers are cached: the library's own
//! `Authority` is driven in this process with the bench user's credential, as the proxy
//! drives it for a Search on the bench collection: `identify` (a keyed hash of the
//! credential and a cache lookup) then `authorize` (the cached grants). One warm-up call
//! fills both caches from PostgreSQL; none of the timed calls touches it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use milvus_sidecar::auth::authority::{AuthConfig, Authority};
use milvus_sidecar::config::AuthArgs;
use milvus_sidecar::milvus::access;
use milvus_sidecar::settings::Settings;
use milvus_sidecar::store::{self, system_config};

pub struct AuthCheck {
    pub checks: u32,
    pub identify_ns: f64,
    pub authorize_ns: f64,
}

pub async fn measure(database_url: &str, user: &str, password: &str, collection: &str) -> Result<AuthCheck> {
    const CHECKS: u32 = 200_000;
    let pg: tokio_postgres::Config = database_url.parse().context("DATABASE_URL")?;
    let settings = Arc::new(Settings::default());
    let client = store::connect(&pg).await.context("connecting to DATABASE_URL")?;
    system_config::load(&client, &settings).await?;
    let defaults = AuthArgs::default();
    let config = AuthConfig {
        credential_ttl: defaults.credential_cache_ttl,
        anonymous_user: None,
        unknown_methods: defaults.unknown_methods,
        fail_open: false,
    };
    let authority = Authority::new(store::pool(pg, 1, store::CheckOut::Tested), config, settings);
    let mut headers = http::HeaderMap::new();
    headers.insert("authorization", crate::load::authorization(user, password).to_str()?.parse()?);
    let rule = access::rule("Search");
    let targets = [("default".to_owned(), collection.to_owned())];

    let principal = authority.identify(&headers).await.map_err(|e| anyhow!("the bench user's credential: {e:?}"))?;
    authority.authorize(&principal, rule, &targets).await.map_err(|e| anyhow!("the bench user's grant: {e:?}"))?;

    let (mut identify, mut authorize) = (Duration::ZERO, Duration::ZERO);
    for _ in 0..CHECKS {
        let started = Instant::now();
        let principal = authority.identify(&headers).await.map_err(|e| anyhow!("{e:?}"))?;
        let identified = Instant::now();
        authority.authorize(&principal, rule, &targets).await.map_err(|e| anyhow!("{e:?}"))?;
        identify += identified - started;
        authorize += identified.elapsed();
    }
    let per = |d: Duration| d.as_nanos() as f64 / f64::from(CHECKS);
    Ok(AuthCheck { checks: CHECKS, identify_ns: per(identify), authorize_ns: per(authorize) })
}
