//! Authentication and authorization decisions, cached in memory. A cache hit costs no
//! PostgreSQL round trip; a miss costs one (plus an argon2 verification, off the async
//! workers, for a credential not seen recently). Any change to users, grants or
//! collections, made anywhere, clears the caches through LISTEN/NOTIFY.

use std::future::poll_fn;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use foldhash::HashMap;
use hmac::{Hmac, KeyInit, Mac};
use http::HeaderMap;
use sha2::Sha256;
use tokio_postgres::{AsyncMessage, NoTls};
use uuid::Uuid;

use super::identity::{self, Credential};
use super::policy::{self, Level, Role};
use crate::milvus::access::{Access, MethodRule};
use crate::settings::Settings;
use crate::store::Pool;

/// Who is calling, once their credential checked out.
#[derive(Debug)]
pub struct Principal {
    pub id: Uuid,
    pub name: Arc<str>,
    pub role: Role,
}

/// Why a call is refused.
#[derive(Debug, Clone, PartialEq)]
pub enum AuthError {
    Unauthenticated(&'static str),
    PermissionDenied(String),
    /// PostgreSQL is needed for this decision and cannot be reached.
    Unavailable(String),
}

/// The grants of one user: database -> collection -> highest level (nested so that a
/// lookup borrows the names from the request instead of building a key).
#[derive(Debug, Default, Clone)]
pub struct Grants(HashMap<String, HashMap<String, Level>>);

impl Grants {
    pub fn level(&self, database: &str, collection: &str) -> Option<Level> {
        self.0.get(database)?.get(collection).copied()
    }

    fn grant(&mut self, database: String, collection: String, level: Level) {
        let entry = self.0.entry(database).or_default().entry(collection).or_insert(level);
        *entry = (*entry).max(level);
    }
}

/// What the authority decided and how often its caches answered, for the metrics.
#[derive(Debug, Default)]
pub struct AuthStats {
    pub allowed: AtomicU64,
    pub denied: AtomicU64,
    pub unauthenticated: AtomicU64,
    /// PostgreSQL was needed and away (refused, or let through when failing open).
    pub unavailable: AtomicU64,
    pub credential_hits: AtomicU64,
    pub credential_misses: AtomicU64,
    pub grant_hits: AtomicU64,
    pub grant_misses: AtomicU64,
    /// argon2 verifications run (each costs tens of milliseconds of CPU).
    pub password_checks: AtomicU64,
    /// Change notifications acted on, by the table that changed: whether LISTEN works, and
    /// when a change reached the caches.
    pub users_changes: AtomicU64,
    pub permissions_changes: AtomicU64,
    pub collections_changes: AtomicU64,
    pub other_changes: AtomicU64,
}

impl AuthStats {
    /// Counts a refusal by its kind (successes are counted where they mean something).
    fn count<T>(&self, result: &Result<T, AuthError>) {
        let counter = match result {
            Ok(_) => return,
            Err(AuthError::Unauthenticated(_)) => &self.unauthenticated,
            Err(AuthError::PermissionDenied(_)) => &self.denied,
            Err(AuthError::Unavailable(_)) => &self.unavailable,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

#[derive(Default)]
struct Cache {
    credentials: HashMap<[u8; 32], Verified>,
    grants: HashMap<Uuid, Arc<Grants>>,
}

/// A credential that checked out.
#[derive(Clone)]
struct Verified {
    principal: Arc<Principal>,
    at: Instant,
    /// The password hash it was verified against: while the user's row still holds this
    /// hash, the same credential is still right, with no new argon2 run.
    hash: Option<Arc<str>>,
    /// `users_generation` when verified; older entries are checked again.
    users_generation: u64,
}

/// One verification per credential at a time: callers arriving meanwhile share its result
/// instead of each running argon2.
type Verification = Arc<tokio::sync::OnceCell<Result<Arc<Principal>, AuthError>>>;

/// What to do with a method this build does not know.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum UnknownMethods {
    AdminOnly,
    Allow,
}

pub struct AuthConfig {
    /// How long a verified credential is trusted without checking PostgreSQL again.
    pub credential_ttl: Duration,
    /// Calls without an `authorization` header act as this user (off by default).
    pub anonymous_user: Option<String>,
    pub unknown_methods: UnknownMethods,
    /// When PostgreSQL is unreachable and a decision is not cached: allow (true) or
    /// refuse with UNAVAILABLE (false, the default).
    pub fail_open: bool,
}

pub struct Authority {
    pool: Pool,
    /// HMAC under a random key of this process, already keyed: each call's hash starts
    /// from a copy instead of hashing the key again.
    mac: HmacSha256,
    config: AuthConfig,
    settings: Arc<Settings>,
    cache: RwLock<Cache>,
    /// Bumped on every invalidation, so a load that raced one is not cached.
    generation: AtomicU64,
    /// Bumped when users change: verified credentials are then checked again (against
    /// their row; argon2 only if the password changed).
    users_generation: AtomicU64,
    verifying: Mutex<HashMap<[u8; 32], Verification>>,
    /// Collections callers created through this sidecar recently, kept apart from the
    /// cache so that an invalidation before the writer stored the creator's grant does
    /// not take it away (user id, database, collection, when).
    created: Mutex<Vec<(Uuid, String, String, Instant)>>,
    pub stats: AuthStats,
}

/// How long a creation seen here stands in for the grant the writer stores; far longer
/// than the writer takes, short enough that a stale entry cannot linger.
const CREATED_GRACE: Duration = Duration::from_secs(60);

type HmacSha256 = Hmac<Sha256>;

/// How long a PostgreSQL lookup may take before the call is answered UNAVAILABLE.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(3);

impl Authority {
    pub fn new(pool: Pool, config: AuthConfig, settings: Arc<Settings>) -> Authority {
        let mut key = [0u8; 32];
        getrandom::fill(&mut key).expect("the operating system provides random bytes");
        Authority {
            pool,
            mac: <HmacSha256 as KeyInit>::new_from_slice(&key).expect("HMAC takes any key length"),
            config,
            settings,
            cache: RwLock::default(),
            generation: AtomicU64::new(0),
            users_generation: AtomicU64::new(0),
            verifying: Mutex::default(),
            created: Mutex::default(),
            stats: AuthStats::default(),
        }
    }

    /// Forgets every cached grant, and has every verified credential checked again.
    pub fn invalidate(&self) {
        self.users_generation.fetch_add(1, Ordering::SeqCst);
        self.invalidate_grants();
        // Entries are kept for their hash; those long unused go.
        let ttl = self.config.credential_ttl;
        self.cache.write().unwrap().credentials.retain(|_, v| v.at.elapsed() < ttl * 10);
    }

    /// Forgets every cached grant (permissions or collections changed).
    pub fn invalidate_grants(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.cache.write().unwrap().grants.clear();
    }

    /// Acts on a change notification: the payload names the table that changed.
    fn changed(&self, table: &str) {
        let (counter, grants_only) = match table {
            "permissions" => (&self.stats.permissions_changes, true),
            "collections" => (&self.stats.collections_changes, true),
            "users" => (&self.stats.users_changes, false),
            _ => (&self.stats.other_changes, false),
        };
        if grants_only {
            self.invalidate_grants();
        } else {
            self.invalidate();
        }
        // Counted once the caches are cleared: a count seen means the change is in effect.
        counter.fetch_add(1, Ordering::SeqCst);
    }

    /// Checks the caller's credential.
    pub async fn identify(&self, headers: &HeaderMap) -> Result<Arc<Principal>, AuthError> {
        let result = self.verify(headers).await;
        self.stats.count(&result);
        result
    }

    async fn verify(&self, headers: &HeaderMap) -> Result<Arc<Principal>, AuthError> {
        let header = headers.get(http::header::AUTHORIZATION);
        let anonymous = self.config.anonymous_user.as_deref();
        let cache_key = match (header, anonymous) {
            (Some(value), _) => self.keyed(value.as_bytes()),
            (None, Some(user)) => self.keyed(format!("anonymous\0{user}").as_bytes()),
            (None, None) => return Err(AuthError::Unauthenticated(identity::MISSING)),
        };
        let cached = self.cache.read().unwrap().credentials.get(&cache_key).cloned();
        if let Some(v) = &cached
            && v.at.elapsed() < self.config.credential_ttl
            && v.users_generation == self.users_generation.load(Ordering::SeqCst)
        {
            self.stats.credential_hits.fetch_add(1, Ordering::Relaxed);
            return Ok(v.principal.clone());
        }
        self.stats.credential_misses.fetch_add(1, Ordering::Relaxed);
        let verification = self.verifying.lock().unwrap().entry(cache_key).or_default().clone();
        let result = verification.get_or_init(|| self.check(headers, anonymous, cache_key, cached)).await.clone();
        let mut verifying = self.verifying.lock().unwrap();
        if verifying.get(&cache_key).is_some_and(|v| Arc::ptr_eq(v, &verification)) {
            verifying.remove(&cache_key);
        }
        result
    }

    /// Checks a credential against PostgreSQL and caches it when it checks out.
    async fn check(
        &self,
        headers: &HeaderMap,
        anonymous: Option<&str>,
        cache_key: [u8; 32],
        cached: Option<Verified>,
    ) -> Result<Arc<Principal>, AuthError> {
        let users_generation = self.users_generation.load(Ordering::SeqCst);
        let known_hash = cached.as_ref().and_then(|v| v.hash.clone());
        let loaded = match (headers.contains_key(http::header::AUTHORIZATION), anonymous) {
            (false, Some(user)) => self.load_user(user, None, None).await,
            _ => match identity::credential(headers).map_err(AuthError::Unauthenticated)? {
                Credential::Token => return Err(AuthError::Unauthenticated(identity::BAD_API_KEY)),
                Credential::Password { user, password } => {
                    self.load_user(&user, Some(password), known_hash.as_deref()).await
                }
            },
        };
        let (principal, hash) = match (loaded, cached) {
            (Ok(loaded), _) => loaded,
            // PostgreSQL away: a credential verified before keeps working until it returns.
            (Err(AuthError::Unavailable(_)), Some(v)) => return Ok(v.principal),
            (Err(e), _) => return Err(e),
        };
        let principal = Arc::new(principal);
        // Stamped with the generation the row was read under: if users changed meanwhile,
        // the next call checks the row again (argon2 only if the hash is another).
        let verified = Verified { principal: principal.clone(), at: Instant::now(), hash, users_generation };
        self.cache.write().unwrap().credentials.insert(cache_key, verified);
        Ok(principal)
    }

    /// A keyed hash of the credential: the cache never holds the credential itself.
    fn keyed(&self, credential: &[u8]) -> [u8; 32] {
        let mut mac = self.mac.clone();
        mac.update(credential);
        mac.finalize().into_bytes().into()
    }

    /// The user `name`, with `password` checked against their hash unless the same
    /// credential was verified against that very hash before (`known_hash`).
    async fn load_user(
        &self,
        name: &str,
        password: Option<String>,
        known_hash: Option<&str>,
    ) -> Result<(Principal, Option<Arc<str>>), AuthError> {
        // PostgreSQL text cannot hold NUL, so no such user exists (and asking would be an
        // error, which must not read as "PostgreSQL unavailable").
        if name.contains('\0') {
            return Err(AuthError::Unauthenticated(identity::BAD_PASSWORD));
        }
        let row = self
            .query_opt("SELECT id, role, is_active, password_hash FROM users WHERE username = $1", &[&name])
            .await?;
        let Some(row) = row else { return Err(AuthError::Unauthenticated(identity::BAD_PASSWORD)) };
        let (id, role, active, hash): (Uuid, String, bool, Option<String>) =
            (row.get(0), row.get(1), row.get(2), row.get(3));
        if !active {
            return Err(AuthError::Unauthenticated(identity::BAD_PASSWORD));
        }
        let mut verified_hash = None;
        if let Some(password) = password {
            let Some(hash) = hash else { return Err(AuthError::Unauthenticated(identity::BAD_PASSWORD)) };
            if known_hash != Some(hash.as_str()) {
                // argon2 takes tens of milliseconds of CPU: not on an async worker.
                self.stats.password_checks.fetch_add(1, Ordering::Relaxed);
                let checked = hash.clone();
                let ok = tokio::task::spawn_blocking(move || super::password::verify(&checked, &password))
                    .await
                    .unwrap_or(false);
                if !ok {
                    return Err(AuthError::Unauthenticated(identity::BAD_PASSWORD));
                }
            }
            verified_hash = Some(Arc::from(hash));
        }
        let role = Role::parse(&role).unwrap_or(Role::User);
        Ok((Principal { id, name: Arc::from(name), role }, verified_hash))
    }

    /// The caller's grants (one query on a miss, then cached).
    pub async fn grants(&self, principal: &Principal) -> Result<Arc<Grants>, AuthError> {
        if let Some(grants) = self.cache.read().unwrap().grants.get(&principal.id) {
            self.stats.grant_hits.fetch_add(1, Ordering::Relaxed);
            return Ok(grants.clone());
        }
        self.stats.grant_misses.fetch_add(1, Ordering::Relaxed);
        let generation = self.generation.load(Ordering::SeqCst);
        let rows = self
            .query(
                "SELECT c.database_name, c.collection_name, p.permission_type
                 FROM permissions p JOIN collections c ON c.id = p.collection_id
                 WHERE p.user_id = $1 AND c.status = 'active'",
                &[&principal.id],
            )
            .await?;
        let mut grants = Grants::default();
        for row in rows {
            if let Some(level) = Level::parse(row.get(2)) {
                grants.grant(row.get(0), row.get(1), level);
            }
        }
        for (user, database, collection, at) in self.created.lock().unwrap().iter() {
            if *user == principal.id && at.elapsed() < CREATED_GRACE {
                grants.grant(database.clone(), collection.clone(), Level::Admin);
            }
        }
        let grants = Arc::new(grants);
        if self.generation.load(Ordering::SeqCst) == generation {
            self.cache.write().unwrap().grants.insert(principal.id, grants.clone());
        }
        Ok(grants)
    }

    /// The creator of a collection administers it from the moment Milvus says it exists,
    /// before the writer has stored the grant.
    pub fn note_created(&self, principal: &Principal, database: &str, collection: &str) {
        {
            let mut created = self.created.lock().unwrap();
            created.retain(|(.., at)| at.elapsed() < CREATED_GRACE);
            created.push((principal.id, database.to_owned(), collection.to_owned(), Instant::now()));
        }
        // A load already under way may have missed the creation: keep it out of the cache.
        self.generation.fetch_add(1, Ordering::SeqCst);
        // Cached grants gain the collection now; uncached ones pick it up from `created`
        // when they load (inserting a fresh entry here would hide the user's other grants).
        let mut cache = self.cache.write().unwrap();
        if let Some(grants) = cache.grants.get_mut(&principal.id) {
            let mut updated = (**grants).clone();
            updated.grant(database.to_owned(), collection.to_owned(), Level::Admin);
            *grants = Arc::new(updated);
        }
    }

    /// Whether calls whose grants cannot be read (PostgreSQL away) go through unchecked.
    pub fn fails_open(&self) -> bool {
        self.config.fail_open
    }

    /// Whether `principal` may make this call on `targets` ((database, collection) pairs
    /// the request names).
    pub async fn authorize(
        &self,
        principal: &Principal,
        rule: Option<MethodRule>,
        targets: &[(String, String)],
    ) -> Result<(), AuthError> {
        let result = self.decide(principal, rule, targets).await;
        if result.is_ok() {
            self.stats.allowed.fetch_add(1, Ordering::Relaxed);
        }
        self.stats.count(&result);
        result
    }

    async fn decide(
        &self,
        principal: &Principal,
        rule: Option<MethodRule>,
        targets: &[(String, String)],
    ) -> Result<(), AuthError> {
        let deny = |privilege: &str, on: Option<&(String, String)>| {
            let mut msg = format!("{privilege}: permission deny to {}", principal.name);
            if let Some((db, c)) = on {
                msg.push_str(&format!(" on collection {db}.{c}"));
            }
            Err(AuthError::PermissionDenied(msg))
        };
        if principal.role == Role::Admin {
            return Ok(());
        }
        let Some(rule) = rule else {
            return match self.config.unknown_methods {
                UnknownMethods::Allow => Ok(()),
                UnknownMethods::AdminOnly => deny("PrivilegeUnknownMethod", None),
            };
        };
        match rule.access {
            Access::Public => Ok(()),
            Access::Global => deny(rule.privilege, None),
            Access::CreateCollection if self.settings.users_may_create_collections() => Ok(()),
            Access::CreateCollection => deny(rule.privilege, None),
            Access::Collection { needed, .. } => {
                if targets.is_empty() {
                    // A collection-scoped call that names no collection: admins only.
                    return deny(rule.privilege, None);
                }
                let grants = match self.grants(principal).await {
                    Ok(grants) => grants,
                    Err(AuthError::Unavailable(_)) if self.config.fail_open => {
                        self.stats.unavailable.fetch_add(1, Ordering::Relaxed);
                        return Ok(());
                    }
                    Err(e) => return Err(e),
                };
                for target in targets {
                    if !policy::allows(principal.role, grants.level(&target.0, &target.1), needed) {
                        return deny(rule.privilege, Some(target));
                    }
                }
                Ok(())
            }
        }
    }

    /// Whether `principal` may see `collection` in a listing.
    pub fn may_read(principal: &Principal, grants: &Grants, database: &str, collection: &str) -> bool {
        policy::allows(principal.role, grants.level(database, collection), Level::Read)
    }

    async fn query_opt(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Option<tokio_postgres::Row>, AuthError> {
        Ok(self.query(sql, params).await?.into_iter().next())
    }

    async fn query(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<tokio_postgres::Row>, AuthError> {
        let unavailable = |e: String| AuthError::Unavailable(format!("cannot check permissions: PostgreSQL: {e}"));
        let late = || unavailable(format!("no answer within {} s", LOOKUP_TIMEOUT.as_secs()));
        let deadline = tokio::time::Instant::now() + LOOKUP_TIMEOUT;
        let mut conn = tokio::time::timeout_at(deadline, self.pool.get())
            .await
            .map_err(|_| late())?
            .map_err(|e| unavailable(e.to_string()))?;
        match tokio::time::timeout_at(deadline, conn.query(sql, params)).await {
            Ok(rows) => rows.map_err(|e| unavailable(crate::error_chain(&e))),
            Err(_) => {
                // Gone silent (or too slow to wait for): pooled again, it would hold up the
                // next lookups the same way.
                conn.abandon();
                Err(late())
            }
        }
    }

    /// Clears the grants whenever users, grants or collections change, and every 30 s
    /// regardless (in case a notification was missed while disconnected); has verified
    /// credentials checked again when users change.
    ///
    /// Returns once the first LISTEN is in place (or after 5 s), so that nothing served
    /// afterwards can miss a change.
    pub async fn watch(self: &Arc<Self>, config: tokio_postgres::Config) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        let (listening, first) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            let mut listening = Some(listening);
            loop {
                // While PostgreSQL is away the caches keep serving (nothing could reload them);
                // `listen` clears them once it is back, for whatever changed meanwhile.
                if let Err(e) = this.listen(&config, &mut listening).await {
                    tracing::warn!(error = %e, "lost the permission-change watch; reconnecting in 1 s");
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
        if tokio::time::timeout(Duration::from_secs(5), first).await.is_err() {
            tracing::warn!("the permission-change watch is not in place yet; it keeps trying");
        }
        task
    }

    async fn listen(
        &self,
        config: &tokio_postgres::Config,
        listening: &mut Option<tokio::sync::oneshot::Sender<()>>,
    ) -> Result<(), tokio_postgres::Error> {
        let (client, mut connection) = config.connect(NoTls).await?;
        let (tx, mut changed) = tokio::sync::mpsc::unbounded_channel();
        let pump = tokio::spawn(async move {
            while let Some(message) = poll_fn(|cx| connection.poll_message(cx)).await {
                match message {
                    Ok(AsyncMessage::Notification(n)) => {
                        let _ = tx.send(n.payload().to_owned());
                    }
                    Ok(_) => {}
                    Err(e) => return Err(e),
                }
            }
            Ok(())
        });
        client.batch_execute("LISTEN milvus_sidecar_auth").await?;
        // Anything cached before the LISTEN took effect may be stale.
        self.invalidate();
        if let Some(listening) = listening.take() {
            let _ = listening.send(());
        }
        loop {
            tokio::select! {
                got = changed.recv() => match got {
                    Some(table) => self.changed(&table),
                    None => break,
                },
                // Credentials expire by their own TTL; the password is not checked again.
                _ = tokio::time::sleep(Duration::from_secs(30)) => self.invalidate_grants(),
            }
        }
        pump.abort();
        Ok(())
    }
}

/// Creates the `root` admin on a database without one, as Milvus does, with the
/// configured initial password; warns while root still has the default password.
pub async fn bootstrap_root(pool: &Pool, initial_password: &str) -> anyhow::Result<()> {
    let conn = pool.get().await?;
    let existing = conn.query_opt("SELECT password_hash FROM users WHERE username = 'root'", &[]).await?;
    let hash: Option<String> = match existing {
        Some(row) => row.get(0),
        None => {
            let password = initial_password.to_owned();
            let hash = tokio::task::spawn_blocking(move || super::password::hash(&password)).await?;
            conn.execute(
                "INSERT INTO users (id, username, role, password_hash) VALUES ($1, 'root', 'admin', $2)
                 ON CONFLICT (username) DO NOTHING",
                &[&Uuid::now_v7(), &super::password::HashParam(&hash)],
            )
            .await?;
            tracing::info!("created the root admin user");
            Some(hash)
        }
    };
    if let Some(hash) = hash {
        let is_default = tokio::task::spawn_blocking(move || super::password::verify(&hash, "Milvus")).await?;
        if is_default {
            tracing::warn!(
                "SECURITY: user root still has the default password 'Milvus'; change it with \
                 `milvus-sidecar user set-password root`"
            );
        }
    }
    Ok(())
}
