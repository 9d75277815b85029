//! The cluster's ledger and notifier on PostgreSQL (issue 16): any number
//! of relay nodes share one database.
//!
//! **Durability.** Every write is one call of a PL/pgSQL function
//! (`pg_schema.sql`): one statement, one transaction, answered only after
//! PostgreSQL committed it with `synchronous_commit = on` (set on every
//! connection) on a server with `fsync` on (checked at start). Group commit
//! is PostgreSQL's own: commits arriving together share one WAL flush, so
//! the embedded ledger's single writer thread is not needed (and would make
//! writes from several nodes wait on one another's batches).
//!
//! **Concurrency.** Quotas, per-source shares and the mailbox cap are
//! checked under the row locks of the rows they spend from; mailbox rows
//! are always locked first and in ascending order, so writes from any node
//! serialise without deadlocks. Item seqs are per mailbox, taken under the
//! mailbox's lock, so they increase in commit order. A write that
//! PostgreSQL rolled back for a deadlock or a serialisation failure is
//! tried again (it changed nothing); one whose outcome is unknown (the
//! connection broke) is reported as not stored, never tried again behind
//! the caller's back.

use std::future::Future;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use futures_util::{pin_mut, TryStreamExt};
use rand_core::{OsRng, RngCore};
use sealpost_proto::relay::{BlobId, Forward, Item, MailboxId, NextHop, RefusalCode, Waiting};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::{NoTls, Row};

use crate::ledger::*;
use crate::{CommitStats, Latencies, Limits, Registered, Source, StoreError, SubmitOutcome};

/// The schema and write functions, applied at every start.
pub const SCHEMA: &str = include_str!("pg_schema.sql");

/// Connections one node keeps to PostgreSQL (each write holds one for its
/// round trip; PostgreSQL's default cap is 100 for all nodes together).
pub const POOL_SIZE: usize = 16;

/// The advisory lock the schema is set up under (one node at a time).
const SCHEMA_LOCK: i64 = 7_465_000;

/// Writes rolled back by PostgreSQL for a deadlock or serialisation
/// failure are tried again this many times.
const RETRIES: u32 = 4;

/// The channel nodes tell one another of new items on.
const CHANNEL: &str = "sealpost_items";

type Params<'a> = [&'a (dyn ToSql + Sync)];

fn i64_of(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn u64_of(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn arr<const N: usize>(v: &[u8]) -> [u8; N] {
    v.try_into().unwrap_or([0; N])
}

/// A PostgreSQL error as the store's: what PostgreSQL said, and whether
/// its disk is full.
pub(crate) fn pg_err(e: tokio_postgres::Error) -> StoreError {
    let disk_full = e.code() == Some(&SqlState::DISK_FULL);
    let detail = match e.as_db_error() {
        Some(db) => format!("PostgreSQL {}: {}", db.code().code(), db.message()),
        None => format!(
            "PostgreSQL: {e}{}",
            std::error::Error::source(&e)
                .map(|s| format!(": {s}"))
                .unwrap_or_default()
        ),
    };
    StoreError::Storage { disk_full, detail }
}

pub(crate) fn pool_err(e: deadpool_postgres::PoolError) -> StoreError {
    StoreError::Storage {
        disk_full: false,
        detail: format!("cannot reach PostgreSQL: {e}"),
    }
}

fn retryable(e: &tokio_postgres::Error) -> bool {
    matches!(
        e.code(),
        Some(c) if *c == SqlState::T_R_DEADLOCK_DETECTED || *c == SqlState::T_R_SERIALIZATION_FAILURE
    )
}

/// How a node talks to PostgreSQL: in the clear (a Unix socket, a private
/// network), or with `sslmode=require` over TLS 1.2+ with the server's
/// certificate verified (as libpq's `verify-full`) against
/// `sslrootcert=FILE` or else the system's roots.
#[derive(Clone)]
pub(crate) enum Tls {
    Plain,
    Rustls(tokio_postgres_rustls::MakeRustlsConnect),
}

/// Takes `sslrootcert=…` out of `url` (tokio-postgres does not know it):
/// the URL without it, and the file it named.
fn split_root_cert(url: &str) -> (String, Option<String>) {
    if let Some((base, query)) = url.split_once('?') {
        let mut root = None;
        let kept: Vec<&str> = query
            .split('&')
            .filter(|kv| match kv.strip_prefix("sslrootcert=") {
                Some(v) => {
                    root = Some(percent_decode(v));
                    false
                }
                None => true,
            })
            .collect();
        let url = if kept.is_empty() {
            base.to_owned()
        } else {
            format!("{base}?{}", kept.join("&"))
        };
        return (url, root);
    }
    if !url.contains("://") {
        // key=value form
        let mut root = None;
        let kept: Vec<&str> = url
            .split_whitespace()
            .filter(|kv| match kv.strip_prefix("sslrootcert=") {
                Some(v) => {
                    root = Some(v.to_owned());
                    false
                }
                None => true,
            })
            .collect();
        return (kept.join(" "), root);
    }
    (url.to_owned(), None)
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The TLS a configuration asks for: `sslmode=require` is TLS with a
/// verified certificate; anything else (`disable`, or `prefer`, which is
/// also the default when unsaid) is plaintext — a relay never tries TLS
/// it would then give up silently.
fn tls_for(c: &tokio_postgres::Config, root: Option<&str>) -> Result<Tls, StoreError> {
    if c.get_ssl_mode() != tokio_postgres::config::SslMode::Require {
        return Ok(Tls::Plain);
    }
    let bad = |detail: String| StoreError::Storage {
        disk_full: false,
        detail,
    };
    let mut roots = rustls::RootCertStore::empty();
    match root {
        Some(path) => {
            let pem = std::fs::read(path)
                .map_err(|e| bad(format!("cannot read sslrootcert {path}: {e}")))?;
            use rustls_pki_types::pem::PemObject;
            for cert in rustls_pki_types::CertificateDer::pem_slice_iter(&pem) {
                let cert = cert.map_err(|e| bad(format!("sslrootcert {path}: {e}")))?;
                roots
                    .add(cert)
                    .map_err(|e| bad(format!("sslrootcert {path}: {e}")))?;
            }
            if roots.is_empty() {
                return Err(bad(format!("sslrootcert {path} holds no certificate")));
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            for cert in found.certs {
                let _ = roots.add(cert);
            }
            if roots.is_empty() {
                return Err(bad(
                    "sslmode=require, but this system has no CA certificates to verify PostgreSQL's with; name its CA with sslrootcert=FILE".into(),
                ));
            }
        }
    }
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| bad(format!("TLS: {e}")))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(Tls::Rustls(tokio_postgres_rustls::MakeRustlsConnect::new(
        config,
    )))
}

/// Checks a database URL as a node will use it (its syntax, and for
/// `sslmode=require` the CA certificates), without connecting.
pub fn check_url(url: &str) -> Result<(), StoreError> {
    settings(url).map(|_| ())
}

/// `url` as a client configuration and its TLS.
pub(crate) fn settings(url: &str) -> Result<(tokio_postgres::Config, Tls), StoreError> {
    let (url, root) = split_root_cert(url);
    let c = config(&url)?;
    let tls = tls_for(&c, root.as_deref())?;
    Ok((c, tls))
}

/// Connects once; a task drives the connection (and hands notifications
/// to `news`, if given) until it ends.
pub(crate) async fn connect_driven(
    c: &tokio_postgres::Config,
    tls: &Tls,
    news: Option<tokio::sync::mpsc::UnboundedSender<String>>,
) -> Result<(tokio_postgres::Client, tokio::task::JoinHandle<()>), tokio_postgres::Error> {
    async fn drive<S, T>(
        mut conn: tokio_postgres::Connection<S, T>,
        news: Option<tokio::sync::mpsc::UnboundedSender<String>>,
    ) where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
        T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let mut stream = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
        while let Some(m) = futures_util::StreamExt::next(&mut stream).await {
            match m {
                Ok(tokio_postgres::AsyncMessage::Notification(n)) => {
                    if let Some(tx) = &news {
                        if tx.send(n.payload().to_owned()).is_err() {
                            break;
                        }
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    if news.is_some() {
                        tracing::warn!("the relay nodes' news connection to PostgreSQL broke: {e}");
                    } else {
                        tracing::debug!("a PostgreSQL connection ended: {e}");
                    }
                    break;
                }
            }
        }
    }
    match tls {
        Tls::Plain => {
            let (client, conn) = c.connect(NoTls).await?;
            Ok((client, tokio::spawn(drive(conn, news))))
        }
        Tls::Rustls(m) => {
            let (client, conn) = c.connect(m.clone()).await?;
            Ok((client, tokio::spawn(drive(conn, news))))
        }
    }
}

/// `url` as a client configuration with what every sealpost connection
/// needs: `synchronous_commit = on` (a commit returns once it is on
/// stable storage), a name in `pg_stat_activity`, a connect timeout.
pub fn config(url: &str) -> Result<tokio_postgres::Config, StoreError> {
    let mut c = tokio_postgres::Config::from_str(url).map_err(|e| StoreError::Storage {
        disk_full: false,
        detail: format!(
            "not a PostgreSQL connection URL ({e}); write postgres://USER@HOST:PORT/DATABASE"
        ),
    })?;
    let options = match c.get_options() {
        Some(o) if !o.is_empty() => format!("{o} -c synchronous_commit=on"),
        _ => "-c synchronous_commit=on".to_owned(),
    };
    c.options(&options);
    if c.get_application_name().is_none() {
        c.application_name("sealpost-relay");
    }
    if c.get_connect_timeout().is_none() {
        c.connect_timeout(Duration::from_secs(10));
    }
    Ok(c)
}

/// The URL without its password, for logs.
pub fn redacted(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => match rest.split_once('@') {
            Some((user, host)) => {
                let user = user.split_once(':').map_or(user, |(u, _)| u);
                format!("{scheme}://{user}@{host}")
            }
            None => url.to_owned(),
        },
        None => "postgres (key/value configuration)".to_owned(),
    }
}

/// Connects once (outside the pool) and sets the schema up, under an
/// advisory lock; refuses a server that does not make commits durable,
/// and a database a migration into has not finished filling.
pub async fn setup(url: &str) -> Result<(), StoreError> {
    setup_with(url, false).await
}

/// As [`setup`], for `relay migrate` (which finishes what it started).
pub(crate) async fn setup_for_migration(url: &str) -> Result<(), StoreError> {
    setup_with(url, true).await
}

async fn setup_with(url: &str, migrating: bool) -> Result<(), StoreError> {
    let (c, tls) = settings(url)?;
    let (client, task) = connect_driven(&c, &tls, None).await.map_err(pg_err)?;
    let result = async {
        // synchronous_commit is set on every connection; fsync is the
        // server's alone.
        let fsync: String = client
            .query_one("SHOW fsync", &[])
            .await
            .map_err(pg_err)?
            .get(0);
        if fsync != "on" {
            return Err(StoreError::Storage {
                disk_full: false,
                detail: format!(
                    "PostgreSQL runs with fsync = {fsync}: a commit would not be on stable storage when the relay acknowledges it; turn fsync on"
                ),
            });
        }
        client
            .query_one("SELECT pg_advisory_lock($1)", &[&SCHEMA_LOCK])
            .await
            .map_err(pg_err)?;
        let r = client.batch_execute(SCHEMA).await.map_err(pg_err);
        let _ = client
            .query_one("SELECT pg_advisory_unlock($1)", &[&SCHEMA_LOCK])
            .await;
        r?;
        if !migrating {
            crate::migrate::refuse_if_migrating(&client).await?;
        }
        Ok(())
    }
    .await;
    drop(client);
    let _ = task.await;
    result
}

/// [`setup`] from outside any runtime, or from inside one without
/// blocking it (a thread of its own).
pub fn setup_blocking(url: &str) -> Result<(), StoreError> {
    let url = url.to_owned();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| StoreError::Storage {
                disk_full: false,
                detail: format!("cannot start a runtime: {e}"),
            })?;
        rt.block_on(setup(&url))
    })
    .join()
    .unwrap_or_else(|_| {
        Err(StoreError::Storage {
            disk_full: false,
            detail: "the PostgreSQL set-up panicked".into(),
        })
    })
}

/// A pool of connections to `url` (made as they are needed).
pub fn pool(url: &str, size: usize) -> Result<Pool, StoreError> {
    let (c, tls) = settings(url)?;
    pool_with(c, tls, size)
}

/// [`pool`] for a tool, named `name` in `pg_stat_activity` (nodes are
/// `sealpost-relay`).
pub(crate) fn pool_named(url: &str, size: usize, name: &str) -> Result<Pool, StoreError> {
    let (mut c, tls) = settings(url)?;
    c.application_name(name);
    pool_with(c, tls, size)
}

fn pool_with(c: tokio_postgres::Config, tls: Tls, size: usize) -> Result<Pool, StoreError> {
    let mc = ManagerConfig {
        recycling_method: RecyclingMethod::Fast,
    };
    let manager = match tls {
        Tls::Plain => Manager::from_config(c, NoTls, mc),
        Tls::Rustls(m) => Manager::from_config(c, m, mc),
    };
    Pool::builder(manager)
        .max_size(size)
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(Duration::from_secs(30)))
        .create_timeout(Some(Duration::from_secs(10)))
        .build()
        .map_err(|e| StoreError::Storage {
            disk_full: false,
            detail: format!("cannot make a PostgreSQL pool: {e}"),
        })
}

/// The ledger on PostgreSQL. Every method is one round trip on a pooled
/// connection; submissions arriving together go in one (group commit).
pub struct PgLedger {
    core: Arc<Core>,
    submits: Mutex<Option<tokio::sync::mpsc::Sender<PendingSubmit>>>,
    name: String,
}

/// What the ledger's methods and its submission batcher share.
struct Core {
    /// This node's id in the forward lanes' claims (random per start).
    node: i64,
    pool: Pool,
    limits: Limits,
    stats: Mutex<CommitStats>,
    latencies: Latencies,
}

/// A submission waiting for its batch.
struct PendingSubmit {
    item: NewItem,
    item_id: [u8; 16],
    reply: tokio::sync::oneshot::Sender<Result<SubmitOutcome, StoreError>>,
}

/// Most submissions in one transaction, and most payload bytes.
const MAX_BATCH: usize = 1024;
const MAX_BATCH_BYTES: usize = 1 << 20;
/// Batches one node has in flight at once: while they all wait for their
/// commits, new submissions gather into the next (batches grow when
/// commits are slow).
const BATCHES_IN_FLIGHT: usize = 4;

impl std::fmt::Debug for PgLedger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PgLedger({})", self.name)
    }
}

impl PgLedger {
    /// Sets the schema up at `url` and returns the ledger on it.
    pub async fn connect(url: &str, limits: Limits) -> Result<Self, StoreError> {
        setup(url).await?;
        Self::on_schema(url, limits)
    }

    /// The ledger on a database whose schema [`setup`] made; connects
    /// when first used. Starts its submission batcher on the current
    /// Tokio runtime.
    pub fn on_schema(url: &str, limits: Limits) -> Result<Self, StoreError> {
        let core = Arc::new(Core {
            node: i64::from_ne_bytes(OsRng.next_u64().to_ne_bytes()),
            pool: pool(url, POOL_SIZE)?,
            limits,
            stats: Mutex::new(CommitStats::default()),
            latencies: Latencies::default(),
        });
        let (tx, rx) = tokio::sync::mpsc::channel(MAX_BATCH * BATCHES_IN_FLIGHT * 4);
        tokio::spawn(submit_loop(core.clone(), rx));
        Ok(Self {
            core,
            submits: Mutex::new(Some(tx)),
            name: redacted(url),
        })
    }
}

/// Gathers submissions into batches: the first waiting, then whatever
/// else is waiting at that moment (up to [`MAX_BATCH`] and
/// [`MAX_BATCH_BYTES`]), once a batch slot is free.
async fn submit_loop(core: Arc<Core>, mut rx: tokio::sync::mpsc::Receiver<PendingSubmit>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(BATCHES_IN_FLIGHT));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let Some(first) = rx.recv().await else {
            return;
        };
        let mut bytes = first.item.payload.len();
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH && bytes < MAX_BATCH_BYTES {
            match rx.try_recv() {
                Ok(p) => {
                    bytes += p.item.payload.len();
                    batch.push(p);
                }
                Err(_) => break,
            }
        }
        let core = core.clone();
        tokio::spawn(async move {
            core.submit_batch(batch).await;
            drop(slot);
        });
    }
}

impl Core {
    async fn submit_batch(&self, batch: Vec<PendingSubmit>) {
        let mbs: Vec<&[u8]> = batch.iter().map(|p| p.item.mailbox.0.as_slice()).collect();
        let ids: Vec<&[u8]> = batch.iter().map(|p| p.item_id.as_slice()).collect();
        let nows: Vec<i64> = batch.iter().map(|p| i64_of(p.item.now)).collect();
        let exps: Vec<i64> = batch.iter().map(|p| i64_of(p.item.expires_at)).collect();
        let hashes: Vec<&[u8]> = batch.iter().map(|p| p.item.hash.as_slice()).collect();
        let payloads: Vec<&[u8]> = batch.iter().map(|p| p.item.payload.as_slice()).collect();
        let sources: Vec<&[u8]> = batch.iter().map(|p| p.item.source.as_bytes()).collect();
        let pct = self.pct();
        let result = self
            .write_n(
                "SELECT o_outcome, o_seq FROM sp_submit_many($1, $2, $3, $4, $5, $6, $7, $8)",
                &[&mbs, &ids, &nows, &exps, &hashes, &payloads, &sources, &pct],
                batch.len() as u64,
                |r| (r.get::<_, Vec<i32>>(0), r.get::<_, Vec<i64>>(1)),
            )
            .await;
        match result {
            Ok((outcomes, seqs)) if outcomes.len() == batch.len() && seqs.len() == batch.len() => {
                for ((p, o), seq) in batch.into_iter().zip(outcomes).zip(seqs) {
                    let outcome = match o {
                        0 => SubmitOutcome::Stored {
                            seq: u64_of(seq),
                            item_id: p.item_id,
                        },
                        c => SubmitOutcome::Refused(refusal(c)),
                    };
                    let _ = p.reply.send(Ok(outcome));
                }
            }
            Ok(_) => {
                for p in batch {
                    let _ = p.reply.send(Err(StoreError::Storage {
                        disk_full: false,
                        detail: "PostgreSQL answered a batch of submissions with the wrong number of outcomes".into(),
                    }));
                }
            }
            Err(e) => {
                let (disk_full, detail) = match &e {
                    StoreError::Storage { disk_full, detail } => (*disk_full, detail.clone()),
                    other => (false, other.to_string()),
                };
                for p in batch {
                    let _ = p.reply.send(Err(StoreError::Storage {
                        disk_full,
                        detail: detail.clone(),
                    }));
                }
            }
        }
    }

    fn pct(&self) -> i32 {
        i32::from(self.limits.source_share_percent.clamp(1, 100))
    }

    /// One write: a function call in its own transaction, committed
    /// before it returns; tried again if PostgreSQL rolled it back for a
    /// deadlock or serialisation failure.
    async fn write<T>(
        &self,
        sql: &str,
        params: &Params<'_>,
        f: impl Fn(&Row) -> T,
    ) -> Result<T, StoreError> {
        self.write_n(sql, params, 1, f).await
    }

    /// As [`Core::write`], for a call that holds `writes` writes.
    async fn write_n<T>(
        &self,
        sql: &str,
        params: &Params<'_>,
        writes: u64,
        f: impl Fn(&Row) -> T,
    ) -> Result<T, StoreError> {
        let started = Instant::now();
        let mut tries = 0;
        let result = loop {
            let client = match self.pool.get().await {
                Ok(c) => c,
                Err(e) => break Err(pool_err(e)),
            };
            let stmt = match client.prepare_cached(sql).await {
                Ok(s) => s,
                Err(e) => break Err(pg_err(e)),
            };
            match client.query_one(&stmt, params).await {
                Ok(row) => break Ok(f(&row)),
                Err(e) if retryable(&e) && tries < RETRIES => tries += 1,
                Err(e) => break Err(pg_err(e)),
            }
        };
        let elapsed = started.elapsed();
        self.latencies.commit.observe(elapsed.as_secs_f64());
        if let Ok(mut s) = self.stats.lock() {
            s.commits += 1;
            s.writes += writes;
            s.last_commit_micros = elapsed.as_micros() as u64;
            if result.is_err() {
                s.failures += 1;
            }
        }
        result
    }

    async fn read(&self, sql: &str, params: &Params<'_>) -> Result<Vec<Row>, StoreError> {
        let client = self.pool.get().await.map_err(pool_err)?;
        let stmt = client.prepare_cached(sql).await.map_err(pg_err)?;
        client.query(&stmt, params).await.map_err(pg_err)
    }

    async fn read_opt(&self, sql: &str, params: &Params<'_>) -> Result<Option<Row>, StoreError> {
        let client = self.pool.get().await.map_err(pool_err)?;
        let stmt = client.prepare_cached(sql).await.map_err(pg_err)?;
        client.query_opt(&stmt, params).await.map_err(pg_err)
    }

    /// Rows one by one, for `take` to stop early (a byte bound): what is
    /// not taken is not kept.
    async fn read_while(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
        mut take: impl FnMut(Row) -> bool,
    ) -> Result<(), StoreError> {
        let client = self.pool.get().await.map_err(pool_err)?;
        let stmt = client.prepare_cached(sql).await.map_err(pg_err)?;
        let rows = client
            .query_raw(&stmt, params.iter().copied())
            .await
            .map_err(pg_err)?;
        pin_mut!(rows);
        while let Some(row) = rows.try_next().await.map_err(pg_err)? {
            if !take(row) {
                break;
            }
        }
        Ok(())
    }

    /// A notice to store with a forward's end: its columns, or NULLs.
    async fn end_with_notice(
        &self,
        func: &str,
        id: u64,
        notice: Option<NewItem>,
    ) -> Result<Ended, StoreError> {
        let mut item_id = [0u8; 16];
        OsRng.fill_bytes(&mut item_id);
        let (mb, now, exp, hash, payload) = match &notice {
            Some(n) => (
                Some(n.mailbox.0.as_slice()),
                Some(i64_of(n.now)),
                Some(i64_of(n.expires_at)),
                Some(n.hash.as_slice()),
                Some(n.payload.as_slice()),
            ),
            None => (None, None, None, None, None),
        };
        let item_id = notice.as_ref().map(|_| item_id.as_slice());
        let id = i64_of(id);
        self.write(
            &format!("SELECT o_gone, o_seq FROM {func}($1, $2, $3, $4, $5, $6, $7)"),
            &[&id, &mb, &item_id, &now, &exp, &hash, &payload],
            |r| {
                if r.get::<_, bool>(0) {
                    Ended::Gone
                } else {
                    Ended::Ended {
                        notice_seq: r.get::<_, Option<i64>>(1).map(u64_of),
                    }
                }
            },
        )
        .await
    }
}

fn refusal(code: i32) -> RefusalCode {
    match code {
        1 => RefusalCode::UnknownMailbox,
        2 => RefusalCode::Expired,
        _ => RefusalCode::OverQuota,
    }
}

fn boxed<'a, T: Send + 'a>(
    f: impl Future<Output = Result<T, StoreError>> + Send + 'a,
) -> Fut<'a, T> {
    Box::pin(f)
}

impl Ledger for PgLedger {
    fn register(&self, mailbox: MailboxId, key: [u8; 32], now: u64) -> Fut<'_, Registered> {
        boxed(async move {
            let quota = i64_of(self.core.limits.mailbox_quota);
            let cap = i64_of(self.core.limits.max_mailboxes.unwrap_or(u64::MAX));
            let now = i64_of(now);
            self.core
                .write(
                    "SELECT sp_register($1, $2, $3, $4, $5)",
                    &[&mailbox.0.as_slice(), &key.as_slice(), &quota, &now, &cap],
                    |r| match r.get::<_, i32>(0) {
                        0 => Registered::Created,
                        1 => Registered::Existing,
                        _ => Registered::Full,
                    },
                )
                .await
        })
    }

    fn mailbox_key(&self, mailbox: MailboxId) -> Fut<'_, Option<[u8; 32]>> {
        boxed(async move {
            let row = self
                .core
                .read_opt(
                    "SELECT key FROM mailboxes WHERE id = $1",
                    &[&mailbox.0.as_slice()],
                )
                .await?;
            Ok(row.and_then(|r| r.get::<_, &[u8]>(0).try_into().ok()))
        })
    }

    /// Through the batcher: answered once the batch holding it committed.
    fn submit(&self, item: NewItem) -> Fut<'_, SubmitOutcome> {
        boxed(async move {
            let tx = self
                .submits
                .lock()
                .map_err(|_| StoreError::Closed)?
                .clone()
                .ok_or(StoreError::Closed)?;
            let mut item_id = [0u8; 16];
            OsRng.fill_bytes(&mut item_id);
            let (reply, answer) = tokio::sync::oneshot::channel();
            tx.send(PendingSubmit {
                item,
                item_id,
                reply,
            })
            .await
            .map_err(|_| StoreError::Closed)?;
            answer.await.map_err(|_| StoreError::Closed)?
        })
    }

    fn ack(&self, mailbox: MailboxId, seqs: Vec<u64>) -> Fut<'_, u32> {
        boxed(async move {
            let seqs: Vec<i64> = seqs.into_iter().map(i64_of).collect();
            self.core
                .write(
                    "SELECT sp_ack($1, $2)",
                    &[&mailbox.0.as_slice(), &seqs],
                    |r| u32::try_from(r.get::<_, i32>(0)).unwrap_or(0),
                )
                .await
        })
    }

    fn fetch(
        &self,
        mailbox: MailboxId,
        after: u64,
        max: usize,
        max_bytes: usize,
    ) -> Fut<'_, Fetched> {
        boxed(async move {
            let mut out = Fetched::default();
            let mut bytes = 0usize;
            let (after, limit) = (i64_of(after), i64::try_from(max + 1).unwrap_or(i64::MAX));
            self.core
                .read_while(
                    "SELECT seq, received_at, expires_at, hash, payload FROM items \
                 WHERE mailbox = $1 AND seq > $2 ORDER BY seq LIMIT $3",
                    &[&mailbox.0.as_slice(), &after, &limit],
                    |row| {
                        let payload: Vec<u8> = row.get(4);
                        if out.items.len() == max
                            || (!out.items.is_empty() && bytes + payload.len() > max_bytes)
                        {
                            out.more = true;
                            return false;
                        }
                        let hash: [u8; 32] = arr(row.get::<_, &[u8]>(3));
                        if blake3::hash(&payload).as_bytes() != &hash {
                            out.damaged += 1;
                        }
                        bytes += payload.len();
                        out.items.push(Item {
                            seq: u64_of(row.get(0)),
                            received_at: u64_of(row.get(1)),
                            expires_at: u64_of(row.get(2)),
                            payload_hash: hash,
                            payload,
                        });
                        true
                    },
                )
                .await?;
            Ok(out)
        })
    }

    fn sweep(&self, now: u64) -> Fut<'_, (u64, Vec<BlobId>)> {
        boxed(async move {
            let now = i64_of(now);
            self.core
                .write("SELECT o_n, o_blobs FROM sp_sweep($1)", &[&now], |r| {
                    let blobs: Vec<Vec<u8>> = r.get(1);
                    (
                        u64_of(r.get(0)),
                        blobs.iter().map(|b| BlobId(arr(b))).collect(),
                    )
                })
                .await
        })
    }

    fn status(&self, mailbox: MailboxId) -> Fut<'_, MailboxUse> {
        boxed(async move {
            let row = self.core
                .read_opt(
                    "SELECT m.used, m.quota, (SELECT COUNT(*) FROM items i WHERE i.mailbox = m.id) \
                     FROM mailboxes m WHERE m.id = $1",
                    &[&mailbox.0.as_slice()],
                )
                .await?;
            Ok(row.map_or_else(MailboxUse::default, |r| MailboxUse {
                used: u64_of(r.get(0)),
                quota: u64_of(r.get(1)),
                items: u64_of(r.get(2)),
            }))
        })
    }

    fn share_used(&self, mailbox: MailboxId, source: Source) -> Fut<'_, u64> {
        boxed(async move {
            let row = self
                .core
                .read_opt(
                    "SELECT used FROM shares WHERE mailbox = $1 AND source = $2",
                    &[&mailbox.0.as_slice(), &source.as_bytes()],
                )
                .await?;
            Ok(row.map_or(0, |r| u64_of(r.get(0))))
        })
    }

    fn blob(&self, blob_id: BlobId) -> Fut<'_, Option<BlobState>> {
        boxed(async move {
            let row = self
                .core
                .read_opt(
                    "SELECT mailbox, total_len, stored, complete, hash, expires_at FROM blobs \
                     WHERE id = $1",
                    &[&blob_id.0.as_slice()],
                )
                .await?;
            Ok(row.map(|r| BlobState {
                mailbox: MailboxId(arr(r.get::<_, &[u8]>(0))),
                total_len: u64_of(r.get(1)),
                stored: u64_of(r.get(2)),
                complete: r.get(3),
                hash: arr(r.get::<_, &[u8]>(4)),
                expires_at: u64_of(r.get(5)),
            }))
        })
    }

    fn blob_advance(&self, a: BlobAdvance) -> Fut<'_, Advanced> {
        boxed(async move {
            let (total, exp, to) = (i64_of(a.total_len), i64_of(a.expires_at), i64_of(a.to));
            let from = a.from.map(i64_of);
            let pct = self.core.pct();
            self.core.write(
                "SELECT o_kind, o_stored, o_code FROM sp_blob_advance($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
                &[
                    &a.blob_id.0.as_slice(),
                    &a.mailbox.0.as_slice(),
                    &total,
                    &exp,
                    &from,
                    &to,
                    &a.complete,
                    &a.hash.as_slice(),
                    &a.source.as_bytes(),
                    &pct,
                ],
                |r| match r.get::<_, i32>(0) {
                    0 => Advanced::Committed,
                    1 => Advanced::Conflict {
                        stored: r.get::<_, Option<i64>>(1).map(u64_of),
                    },
                    _ => Advanced::Refused(refusal(r.get(2))),
                },
            )
            .await
        })
    }

    fn blob_delete(&self, blob_id: BlobId, mailbox: MailboxId) -> Fut<'_, bool> {
        boxed(async move {
            self.core
                .write(
                    "SELECT sp_blob_delete($1, $2)",
                    &[&blob_id.0.as_slice(), &mailbox.0.as_slice()],
                    |r| r.get(0),
                )
                .await
        })
    }

    fn blob_expire(&self, blob_id: BlobId, mailbox: MailboxId, at: u64) -> Fut<'_, bool> {
        boxed(async move {
            let at = i64_of(at);
            self.core
                .write(
                    "WITH u AS (UPDATE blobs SET expires_at = $3 WHERE id = $1 AND mailbox = $2 \
                 RETURNING 1) SELECT COUNT(*) FROM u",
                    &[&blob_id.0.as_slice(), &mailbox.0.as_slice(), &at],
                    |r| r.get::<_, i64>(0) > 0,
                )
                .await
        })
    }

    fn blobs_known(&self, ids: Vec<BlobId>) -> Fut<'_, Vec<bool>> {
        boxed(async move {
            let keys: Vec<&[u8]> = ids.iter().map(|b| b.0.as_slice()).collect();
            let rows = self
                .core
                .read("SELECT id FROM blobs WHERE id = ANY($1)", &[&keys])
                .await?;
            let known: std::collections::HashSet<Vec<u8>> =
                rows.iter().map(|r| r.get::<_, Vec<u8>>(0)).collect();
            Ok(ids.iter().map(|b| known.contains(b.0.as_slice())).collect())
        })
    }

    fn complete_blobs(&self) -> Fut<'_, Vec<(BlobId, [u8; 32], u64)>> {
        boxed(async move {
            let rows = self
                .core
                .read("SELECT id, hash, stored FROM blobs WHERE complete", &[])
                .await?;
            Ok(rows
                .iter()
                .map(|r| {
                    (
                        BlobId(arr(r.get::<_, &[u8]>(0))),
                        arr(r.get::<_, &[u8]>(1)),
                        u64_of(r.get(2)),
                    )
                })
                .collect())
        })
    }

    fn scrub_items(&self) -> Fut<'_, (u64, Vec<u64>)> {
        boxed(async move {
            let (mut n, mut damaged) = (0u64, Vec::new());
            self.core
                .read_while(
                    "SELECT seq, hash, payload FROM items ORDER BY mailbox, seq",
                    &[],
                    |r| {
                        n += 1;
                        if blake3::hash(r.get::<_, &[u8]>(2)).as_bytes()[..]
                            != *r.get::<_, &[u8]>(1)
                        {
                            damaged.push(u64_of(r.get(0)));
                        }
                        true
                    },
                )
                .await?;
            Ok((n, damaged))
        })
    }

    fn totals(&self) -> Fut<'_, Totals> {
        boxed(async move {
            let rows = self
                .core
                .read(
                    "SELECT (SELECT COUNT(*) FROM mailboxes), (SELECT COUNT(*) FROM items), \
                     (SELECT COALESCE(SUM(length(payload)), 0)::bigint FROM items), \
                     (SELECT COUNT(*) FROM blobs)",
                    &[],
                )
                .await?;
            Ok(rows.first().map_or_else(Totals::default, |r| Totals {
                mailboxes: u64_of(r.get(0)),
                items: u64_of(r.get(1)),
                item_bytes: u64_of(r.get(2)),
                blobs: u64_of(r.get(3)),
            }))
        })
    }

    fn mailboxes(&self) -> Fut<'_, Vec<(MailboxId, MailboxUse)>> {
        boxed(async move {
            let rows = self
                .core
                .read(
                    "SELECT m.id, m.used, m.quota, \
                     (SELECT COUNT(*) FROM items i WHERE i.mailbox = m.id) \
                     FROM mailboxes m ORDER BY m.used DESC",
                    &[],
                )
                .await?;
            Ok(rows
                .iter()
                .map(|r| {
                    (
                        MailboxId(arr(r.get::<_, &[u8]>(0))),
                        MailboxUse {
                            used: u64_of(r.get(1)),
                            quota: u64_of(r.get(2)),
                            items: u64_of(r.get(3)),
                        },
                    )
                })
                .collect())
        })
    }

    fn share_rows(&self) -> Fut<'_, u64> {
        boxed(async move {
            let rows = self.core.read("SELECT COUNT(*) FROM shares", &[]).await?;
            Ok(rows.first().map_or(0, |r| u64_of(r.get(0))))
        })
    }

    /// The database's size; what VACUUM frees PostgreSQL reuses itself
    /// (autovacuum), so none is reported as being given back.
    fn space(&self) -> Fut<'_, LedgerSpace> {
        boxed(async move {
            let rows = self
                .core
                .read("SELECT pg_database_size(current_database())", &[])
                .await?;
            Ok(LedgerSpace {
                size: rows.first().map_or(0, |r| u64_of(r.get(0))),
                free: 0,
            })
        })
    }

    fn forward_enqueue(&self, f: NewForward) -> Fut<'_, Enqueued> {
        boxed(async move {
            let NewForward {
                origin,
                item,
                blob,
                now,
            } = f;
            let hops = i32::from(item.hops);
            let (now, exp) = (i64_of(now), i64_of(item.expires_at));
            let blob_id = blob.as_ref().map(|b| b.0 .0.as_slice());
            let blob_len = i64_of(blob.map_or(0, |b| b.1));
            self.core.write(
                "SELECT o_kind, o_id, o_code FROM sp_forward_enqueue($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
                &[
                    &origin.0.as_slice(),
                    &item.next.addr,
                    &item.next.pin.as_slice(),
                    &hops,
                    &item.mailbox.0.as_slice(),
                    &now,
                    &exp,
                    &item.payload_hash.as_slice(),
                    &item.payload.as_slice(),
                    &blob_id,
                    &blob_len,
                ],
                |r| match r.get::<_, i32>(0) {
                    0 => Enqueued::Queued {
                        id: u64_of(r.get(1)),
                    },
                    _ => Enqueued::Refused(refusal(r.get(2))),
                },
            )
            .await
        })
    }

    fn forward_due(&self, now: u64, max: usize, max_bytes: usize) -> Fut<'_, Vec<Queued>> {
        boxed(async move {
            let (now, limit) = (i64_of(now), i64::try_from(max).unwrap_or(i64::MAX));
            let mut out: Vec<Queued> = Vec::new();
            let mut bytes = 0usize;
            self.core.read_while(
                "SELECT id, origin, next_addr, next_pin, hops, mailbox, received_at, expires_at, \
                 hash, payload, attempts, next_at, last_error, blob, blob_len FROM forwards f \
                 WHERE (next_at <= $1 OR expires_at <= $1) \
                 AND NOT EXISTS (SELECT 1 FROM forward_lanes l WHERE l.next_addr = f.next_addr \
                     AND l.next_pin = f.next_pin AND l.blobs = (f.blob IS NOT NULL) \
                     AND l.node <> $3 AND l.until > $1) \
                 ORDER BY id LIMIT $2",
                &[&now, &limit, &self.core.node],
                |r| {
                    let q = Queued {
                        id: u64_of(r.get(0)),
                        origin: MailboxId(arr(r.get::<_, &[u8]>(1))),
                        item: Forward {
                            hops: u8::try_from(r.get::<_, i32>(4)).unwrap_or(u8::MAX),
                            next: NextHop {
                                addr: r.get(2),
                                pin: arr(r.get::<_, &[u8]>(3)),
                            },
                            mailbox: MailboxId(arr(r.get::<_, &[u8]>(5))),
                            expires_at: u64_of(r.get(7)),
                            payload_hash: arr(r.get::<_, &[u8]>(8)),
                            payload: r.get(9),
                        },
                        blob: r
                            .get::<_, Option<&[u8]>>(13)
                            .map(|b| (BlobId(arr(b)), u64_of(r.get(14)))),
                        received_at: u64_of(r.get(6)),
                        attempts: u32::try_from(r.get::<_, i32>(10)).unwrap_or(0),
                        next_at: u64_of(r.get(11)),
                        last_error: r.get(12),
                    };
                    if !out.is_empty() && bytes + q.item.payload.len() > max_bytes {
                        return false;
                    }
                    bytes += q.item.payload.len();
                    out.push(q);
                    true
                },
            )
            .await?;
            Ok(out)
        })
    }

    fn lane_claim(&self, next: NextHop, blobs: bool, now: u64, until: u64) -> Fut<'_, bool> {
        boxed(async move {
            let (now, until) = (i64_of(now), i64_of(until));
            let rows = self
                .core
                .read(
                    "INSERT INTO forward_lanes (next_addr, next_pin, blobs, node, until) \
                     VALUES ($1, $2, $3, $4, $6) \
                     ON CONFLICT (next_addr, next_pin, blobs) DO UPDATE \
                     SET node = EXCLUDED.node, until = EXCLUDED.until \
                     WHERE forward_lanes.node = EXCLUDED.node OR forward_lanes.until <= $5 \
                     RETURNING 1",
                    &[
                        &next.addr,
                        &&next.pin[..],
                        &blobs,
                        &self.core.node,
                        &now,
                        &until,
                    ],
                )
                .await?;
            Ok(!rows.is_empty())
        })
    }

    fn lane_release(&self, next: NextHop, blobs: bool) -> Fut<'_, ()> {
        boxed(async move {
            self.core
                .read(
                    "DELETE FROM forward_lanes WHERE next_addr = $1 AND next_pin = $2 \
                     AND blobs = $3 AND node = $4",
                    &[&next.addr, &&next.pin[..], &blobs, &self.core.node],
                )
                .await?;
            Ok(())
        })
    }

    fn forward_end(&self, id: u64, notice: Option<NewItem>) -> Fut<'_, Ended> {
        boxed(self.core.end_with_notice("sp_forward_end", id, notice))
    }

    fn forward_later(
        &self,
        ids: Vec<u64>,
        next_at: u64,
        error: String,
        failed: bool,
    ) -> Fut<'_, ()> {
        boxed(async move {
            let ids: Vec<i64> = ids.into_iter().map(i64_of).collect();
            let (next_at, add) = (i64_of(next_at), i32::from(failed));
            self.core
                .write(
                    "WITH u AS (UPDATE forwards SET attempts = attempts + $4, next_at = $2, \
                 last_error = $3 WHERE id = ANY($1) RETURNING 1) SELECT COUNT(*) FROM u",
                    &[&ids, &next_at, &error, &add],
                    |_| (),
                )
                .await
        })
    }

    fn forward_queue(&self) -> Fut<'_, Vec<HopQueue>> {
        boxed(async move {
            let rows = self.core
                .read(
                    "SELECT next_addr, next_pin, COUNT(*), SUM(length(payload) + blob_len)::bigint, \
                     MIN(received_at), MIN(next_at), MAX(attempts), \
                     (SELECT last_error FROM forwards g WHERE g.next_addr = f.next_addr \
                      AND g.next_pin = f.next_pin ORDER BY attempts DESC, id LIMIT 1) \
                     FROM forwards f GROUP BY next_addr, next_pin ORDER BY MIN(received_at)",
                    &[],
                )
                .await?;
            Ok(rows
                .iter()
                .map(|r| HopQueue {
                    next: NextHop {
                        addr: r.get(0),
                        pin: arr(r.get::<_, &[u8]>(1)),
                    },
                    items: u64_of(r.get(2)),
                    bytes: u64_of(r.get(3)),
                    oldest: u64_of(r.get(4)),
                    next_at: u64_of(r.get(5)),
                    attempts: u32::try_from(r.get::<_, i32>(6)).unwrap_or(0),
                    last_error: r.get(7),
                })
                .collect())
        })
    }

    fn forward_waiting(
        &self,
        origin: MailboxId,
        items: Vec<(MailboxId, [u8; 32])>,
    ) -> Fut<'_, Vec<Option<Waiting>>> {
        boxed(async move {
            let mut out = Vec::with_capacity(items.len());
            for (mb, h) in &items {
                let row = self
                    .core
                    .read_opt(
                        "SELECT attempts, next_at, last_error FROM forwards \
                         WHERE origin = $1 AND hash = $2 AND mailbox = $3 AND blob IS NULL LIMIT 1",
                        &[&origin.0.as_slice(), &h.as_slice(), &mb.0.as_slice()],
                    )
                    .await?;
                out.push(row.map(|r| Waiting {
                    attempts: u32::try_from(r.get::<_, i32>(0)).unwrap_or(0),
                    next_at: u64_of(r.get(1)),
                    error: r.get(2),
                }));
            }
            Ok(out)
        })
    }

    fn forward_blob_queued(&self, id: BlobId) -> Fut<'_, bool> {
        boxed(async move {
            Ok(self
                .core
                .read_opt(
                    "SELECT 1 FROM forwards WHERE blob = $1 LIMIT 1",
                    &[&id.0.as_slice()],
                )
                .await?
                .is_some())
        })
    }

    fn forward_handed(&self, id: u64, until: u64) -> Fut<'_, Ended> {
        boxed(async move {
            let (id, until) = (i64_of(id), i64_of(until));
            self.core
                .write("SELECT sp_forward_handed($1, $2)", &[&id, &until], |r| {
                    if r.get::<_, bool>(0) {
                        Ended::Gone
                    } else {
                        Ended::Ended { notice_seq: None }
                    }
                })
                .await
        })
    }

    fn handed_find(
        &self,
        mailbox: MailboxId,
        payload_hash: [u8; 32],
        blob: Option<BlobId>,
    ) -> Fut<'_, Option<Handed>> {
        boxed(async move {
            const COLUMNS: &str =
                "SELECT id, origin, next_addr, next_pin, mailbox, hash, blob, until FROM handed";
            let row = match blob {
                Some(b) => {
                    self.core
                        .read_opt(
                            &format!(
                                "{COLUMNS} WHERE blob = $1 AND mailbox = $2 ORDER BY id LIMIT 1"
                            ),
                            &[&b.0.as_slice(), &mailbox.0.as_slice()],
                        )
                        .await?
                }
                None => {
                    self.core
                        .read_opt(
                            &format!(
                                "{COLUMNS} WHERE mailbox = $1 AND hash = $2 AND blob IS NULL \
                             ORDER BY id LIMIT 1"
                            ),
                            &[&mailbox.0.as_slice(), &payload_hash.as_slice()],
                        )
                        .await?
                }
            };
            Ok(row.map(|r| Handed {
                id: u64_of(r.get(0)),
                origin: MailboxId(arr(r.get::<_, &[u8]>(1))),
                next: NextHop {
                    addr: r.get(2),
                    pin: arr(r.get::<_, &[u8]>(3)),
                },
                mailbox: MailboxId(arr(r.get::<_, &[u8]>(4))),
                payload_hash: arr(r.get::<_, &[u8]>(5)),
                blob: r.get::<_, Option<&[u8]>>(6).map(|b| BlobId(arr(b))),
                until: u64_of(r.get(7)),
            }))
        })
    }

    fn handed_end(&self, id: u64, notice: Option<NewItem>) -> Fut<'_, Ended> {
        boxed(self.core.end_with_notice("sp_handed_end", id, notice))
    }

    fn handed_expire(&self, now: u64) -> Fut<'_, u32> {
        boxed(async move {
            let now = i64_of(now);
            self.core.write(
                "WITH d AS (DELETE FROM handed WHERE until < $1 RETURNING 1) SELECT COUNT(*) FROM d",
                &[&now],
                |r| u32::try_from(r.get::<_, i64>(0)).unwrap_or(u32::MAX),
            )
            .await
        })
    }

    fn commit_stats(&self) -> CommitStats {
        self.core.stats.lock().map(|s| *s).unwrap_or_default()
    }

    fn latencies(&self) -> &Latencies {
        &self.core.latencies
    }

    /// Every write was answered only once committed: closing just stops
    /// new ones.
    fn close(&self) {
        if let Ok(mut tx) = self.submits.lock() {
            tx.take();
        }
        self.core.pool.close();
    }
}

/// News of new items between nodes: what this node publishes reaches its
/// own listeners at once and the other nodes through PostgreSQL's
/// `NOTIFY` (no other broker). A push is a hint — an agent fetches on
/// connecting — so a notification lost with a node that died between its
/// commit and its `NOTIFY` costs latency, not mail.
pub struct PgNotifier {
    node: u64,
    local: Arc<crate::LocalNotifier>,
    out: tokio::sync::mpsc::Sender<(MailboxId, u64)>,
    /// Notifications that could not be queued (the queue to PostgreSQL
    /// was full) or sent.
    pub dropped: Arc<AtomicU64>,
}

impl std::fmt::Debug for PgNotifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PgNotifier(node {:016x})", self.node)
    }
}

/// Notifications waiting to be sent, at most.
const NOTIFY_QUEUE: usize = 65_536;

impl PgNotifier {
    /// Starts listening at `url` and sending this node's news there (two
    /// tasks on the current runtime, which reconnect when the connection
    /// breaks).
    pub fn start(url: &str, pool: Pool) -> Result<Self, StoreError> {
        let config = settings(url)?;
        let node = OsRng.next_u64();
        let local = Arc::new(crate::LocalNotifier::default());
        let dropped = Arc::new(AtomicU64::new(0));
        let (out, rx) = tokio::sync::mpsc::channel(NOTIFY_QUEUE);
        tokio::spawn(send_loop(node, pool, rx, dropped.clone()));
        tokio::spawn(listen_loop(node, config, local.clone()));
        Ok(Self {
            node,
            local,
            out,
            dropped,
        })
    }
}

impl Notifier for PgNotifier {
    fn published(&self, mailbox: &MailboxId, seq: u64) {
        self.local.published(mailbox, seq);
        if self.out.try_send((*mailbox, seq)).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn listen(&self, sink: Sink) {
        self.local.listen(sink);
    }
}

fn encode_news(node: u64, mailbox: &MailboxId, seq: u64) -> String {
    let mut s = format!("{node:016x}");
    for b in mailbox.0 {
        s.push_str(&format!("{b:02x}"));
    }
    s.push_str(&format!("{seq}"));
    s
}

/// (node, mailbox, seq) of a notification's payload.
fn decode_news(s: &str) -> Option<(u64, MailboxId, u64)> {
    if s.len() <= 16 + 64 || !s.is_ascii() {
        return None;
    }
    let node = u64::from_str_radix(&s[..16], 16).ok()?;
    let mut mb = [0u8; 32];
    for (i, b) in mb.iter_mut().enumerate() {
        *b = u8::from_str_radix(&s[16 + 2 * i..18 + 2 * i], 16).ok()?;
    }
    let seq = s[80..].parse().ok()?;
    Some((node, MailboxId(mb), seq))
}

async fn send_loop(
    node: u64,
    pool: Pool,
    mut rx: tokio::sync::mpsc::Receiver<(MailboxId, u64)>,
    dropped: Arc<AtomicU64>,
) {
    let mut batch = Vec::new();
    while rx.recv_many(&mut batch, 1024).await > 0 {
        let news: Vec<String> = batch
            .drain(..)
            .map(|(mb, seq)| encode_news(node, &mb, seq))
            .collect();
        let sent = async {
            let client = pool.get().await.map_err(pool_err)?;
            client
                .execute(
                    &format!("SELECT pg_notify('{CHANNEL}', n) FROM unnest($1::text[]) n"),
                    &[&news],
                )
                .await
                .map_err(pg_err)
        }
        .await;
        if let Err(e) = sent {
            dropped.fetch_add(news.len() as u64, Ordering::Relaxed);
            tracing::warn!(
                "could not tell the other relay nodes of {} new items ({e}); their subscribers see them at their next fetch",
                news.len()
            );
        }
    }
}

async fn listen_loop(
    node: u64,
    (config, tls): (tokio_postgres::Config, Tls),
    local: Arc<crate::LocalNotifier>,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        match connect_driven(&config, &tls, Some(tx)).await {
            Ok((client, driver)) => {
                if let Err(e) = client.batch_execute(&format!("LISTEN {CHANNEL}")).await {
                    tracing::warn!("cannot listen for the other relay nodes' news: {e}");
                } else {
                    backoff = Duration::from_millis(100);
                    while let Some(payload) = rx.recv().await {
                        match decode_news(&payload) {
                            Some((from, mb, seq)) if from != node => local.published(&mb, seq),
                            Some(_) => {}
                            None => tracing::debug!("ignored a malformed notification"),
                        }
                    }
                }
                driver.abort();
            }
            Err(e) => {
                tracing::warn!("cannot reach PostgreSQL for the relay nodes' news ({e}); trying again in {backoff:?}");
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sslrootcert_is_taken_out_of_the_url() {
        assert_eq!(
            split_root_cert("postgres://u@h/db?sslmode=require&sslrootcert=%2Fetc%2Fca.pem"),
            (
                "postgres://u@h/db?sslmode=require".to_owned(),
                Some("/etc/ca.pem".to_owned())
            )
        );
        assert_eq!(
            split_root_cert("postgres://u@h/db?sslrootcert=/x.pem"),
            ("postgres://u@h/db".to_owned(), Some("/x.pem".to_owned()))
        );
        assert_eq!(
            split_root_cert("host=h sslmode=require sslrootcert=/x.pem user=u"),
            (
                "host=h sslmode=require user=u".to_owned(),
                Some("/x.pem".to_owned())
            )
        );
        assert_eq!(
            split_root_cert("postgres://u@h/db"),
            ("postgres://u@h/db".to_owned(), None)
        );
        // Odd escapes are kept as they are, never a panic.
        assert_eq!(percent_decode("%a\u{e9}%4"), "%a\u{e9}%4");
        assert_eq!(percent_decode("%41%42"), "AB");
    }

    #[test]
    fn news_round_trips() {
        let mb = MailboxId([0xab; 32]);
        let s = encode_news(0x0123_4567_89ab_cdef, &mb, 42);
        assert_eq!(decode_news(&s), Some((0x0123_4567_89ab_cdef, mb, 42)));
        assert_eq!(decode_news("zz"), None);
        assert_eq!(decode_news(&s[..80]), None);
    }

    #[test]
    fn urls_lose_their_password() {
        assert_eq!(
            redacted("postgres://relay:secret@db.example:5432/sealpost"),
            "postgres://relay@db.example:5432/sealpost"
        );
        assert_eq!(
            redacted("postgres://relay@db.example/sealpost"),
            "postgres://relay@db.example/sealpost"
        );
    }
}
