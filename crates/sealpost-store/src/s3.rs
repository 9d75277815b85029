//! The cluster's blob store on S3-compatible object storage (issue 16):
//! every relay node reads and writes the same bucket.
//!
//! **Layout.** Objects are immutable, blobs grow piece by piece: each run
//! of pieces a node stores is one object, `PREFIX/<blob id, hex>/<offset,
//! 16 hex>-<length, 16 hex>`, written with one `PUT` that the store
//! confirmed before the ledger commits the new length (so what the ledger
//! says is stored is in the bucket). A blob's bytes are the chain of runs
//! from offset 0: the ledger's committed length is the truth, and reads
//! never pass it. A run a node wrote but did not commit (it crashed, or
//! lost the ledger's compare-and-set to another node) is an object off the
//! chain or one that repeats the same bytes at the same offset; removing
//! the blob removes everything under its prefix.
//!
//! **Work.** The trait is blocking (the relay calls it on blocking
//! threads); requests go to a small runtime of the store's own, so a call
//! from any thread, inside a runtime or not, works. A run's BLAKE3 is
//! carried between runs in memory for the blob's uploader; a node that did
//! not see the earlier runs (another node took them, or it restarted)
//! reads them back once to rebuild it.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::TryStreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use sealpost_proto::relay::{BlobId, BlobPiece};

use crate::ledger::BlobStore;

/// Where a bucket is and how to sign for it, from `s3://BUCKET?…`.
#[derive(Clone, PartialEq, Eq)]
pub struct S3Config {
    pub bucket: String,
    /// `http://host:port` or `https://…`; `None`: AWS's own endpoint.
    pub endpoint: Option<String>,
    pub region: String,
    pub access_key_id: String,
    pub secret_access_key: String,
    /// Object names start with this (no leading or trailing `/`).
    pub prefix: String,
}

impl std::fmt::Debug for S3Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "S3Config(s3://{}/{} at {})",
            self.bucket,
            self.prefix,
            self.endpoint.as_deref().unwrap_or("AWS")
        )
    }
}

impl S3Config {
    /// Parses `s3://BUCKET[/PREFIX][?endpoint=URL&region=R]`; the keys
    /// come from `$AWS_ACCESS_KEY_ID` and `$AWS_SECRET_ACCESS_KEY` (kept
    /// out of URLs, process lists and the printed settings).
    pub fn parse(url: &str) -> Result<Self, String> {
        let rest = url
            .strip_prefix("s3://")
            .ok_or("a blob store URL starts with s3:// (s3://BUCKET?endpoint=http://HOST:PORT)")?;
        let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (bucket, prefix) = path.split_once('/').unwrap_or((path, ""));
        if bucket.is_empty()
            || !bucket
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        {
            return Err(format!(
                "{bucket:?} is not a bucket name (lower-case letters, digits, '-' and '.')"
            ));
        }
        let mut endpoint = None;
        let mut region = "us-east-1".to_owned();
        for kv in query.split('&').filter(|s| !s.is_empty()) {
            match kv.split_once('=') {
                Some(("endpoint", v)) if v.starts_with("http://") || v.starts_with("https://") => {
                    endpoint = Some(v.to_owned())
                }
                Some(("region", v)) if !v.is_empty() => region = v.to_owned(),
                _ => {
                    return Err(format!(
                        "unknown or malformed {kv:?} in the blob store URL (endpoint=http(s)://…, region=…)"
                    ))
                }
            }
        }
        let key = |name: &str| {
            std::env::var(name).map_err(|_| {
                format!("{name} is not set: the blob store's key is read from $AWS_ACCESS_KEY_ID and $AWS_SECRET_ACCESS_KEY")
            })
        };
        Ok(Self {
            bucket: bucket.to_owned(),
            endpoint,
            region,
            access_key_id: key("AWS_ACCESS_KEY_ID")?,
            secret_access_key: key("AWS_SECRET_ACCESS_KEY")?,
            prefix: prefix.trim_matches('/').to_owned(),
        })
    }
}

/// A run of a blob: bytes `offset .. offset + len`, one object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Run {
    offset: u64,
    len: u64,
}

/// A running hash, for the uploader of one blob.
struct Hashing {
    hasher: blake3::Hasher,
    upto: u64,
}

/// Uploads whose running hash is kept, and blobs whose chain of runs is
/// kept (both caches: lost ones are rebuilt from the bucket).
const KEPT: usize = 256;

/// Most bytes in one stored object (whole pieces; a piece is at most
/// 1 MiB, so an object is 3–4 MiB of a long upload).
const OBJECT_BYTES: usize = 4 << 20;

/// Blob bytes in an S3-compatible bucket.
pub struct S3Blobs {
    store: Arc<AmazonS3>,
    prefix: String,
    /// The store's own runtime (dropped in the background: a store may
    /// be dropped on an async task).
    rt: Option<tokio::runtime::Runtime>,
    hashing: Mutex<HashMap<BlobId, Hashing>>,
    chains: Mutex<HashMap<BlobId, Vec<Run>>>,
    name: String,
    /// Observes each run's PUT, until the store confirmed it (the relay's
    /// `blob_sync_duration_seconds`, as an fsync of a blob file is).
    put_latency: Option<prometheus_client::metrics::histogram::Histogram>,
}

impl std::fmt::Debug for S3Blobs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name)
    }
}

fn io_err(what: &str, e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(format!("the blob store: {what}: {e}"))
}

fn hex(id: &BlobId) -> String {
    id.0.iter().map(|b| format!("{b:02x}")).collect()
}

fn parse_hex_id(s: &str) -> Option<BlobId> {
    if s.len() != 32 {
        return None;
    }
    let mut id = [0u8; 16];
    for (i, b) in id.iter_mut().enumerate() {
        *b = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(BlobId(id))
}

/// A run's object name's last part: `offset-len`, 16 hex digits each.
fn parse_run(s: &str) -> Option<Run> {
    let (o, l) = s.split_once('-')?;
    if o.len() != 16 || l.len() != 16 {
        return None;
    }
    Some(Run {
        offset: u64::from_str_radix(o, 16).ok()?,
        len: u64::from_str_radix(l, 16).ok()?,
    })
}

/// A chain of runs from 0 covering `0 .. end`, from the runs found (at
/// most one per offset is used; any chain will do: two runs at one offset
/// hold the same bytes where both reach, the sender's bytes for that
/// offset).
fn chain(runs: &[Run], end: u64) -> Option<Vec<Run>> {
    let mut by_offset: HashMap<u64, Vec<u64>> = HashMap::new();
    for r in runs.iter().filter(|r| r.len > 0) {
        by_offset.entry(r.offset).or_default().push(r.len);
    }
    for lens in by_offset.values_mut() {
        lens.sort_unstable_by(|a, b| b.cmp(a));
        lens.dedup();
    }
    // Depth first, longest run first, without recursion (a blob may have
    // thousands of runs); offsets from which `end` cannot be reached are
    // remembered. Each entry: an offset and how many of its runs were tried.
    let mut dead = std::collections::HashSet::new();
    let mut stack: Vec<(u64, usize)> = vec![(0, 0)];
    while let Some(&(at, tried)) = stack.last() {
        if at >= end {
            stack.pop();
            return Some(
                stack
                    .iter()
                    .map(|(o, t)| Run {
                        offset: *o,
                        len: by_offset[o][t - 1],
                    })
                    .collect(),
            );
        }
        let lens = by_offset.get(&at).map(Vec::as_slice).unwrap_or(&[]);
        let next = lens
            .iter()
            .enumerate()
            .skip(tried)
            .find(|(_, l)| !dead.contains(&(at + **l)));
        match next {
            Some((i, l)) => {
                let top = stack.len() - 1;
                stack[top].1 = i + 1;
                stack.push((at + l, 0));
            }
            None => {
                dead.insert(at);
                stack.pop();
            }
        }
    }
    None
}

impl S3Blobs {
    /// A blob store on `config`'s bucket (checked now: a listing must
    /// succeed).
    pub fn open(config: &S3Config) -> std::io::Result<Self> {
        // reqwest's rustls has no provider of its own here (one crypto
        // provider in the tree): ring, as process default, unless one is.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut b = AmazonS3Builder::new()
            .with_bucket_name(&config.bucket)
            .with_region(&config.region)
            .with_access_key_id(&config.access_key_id)
            .with_secret_access_key(&config.secret_access_key)
            .with_retry(object_store::RetryConfig {
                max_retries: 5,
                retry_timeout: Duration::from_secs(30),
                ..Default::default()
            });
        if let Some(e) = &config.endpoint {
            b = b
                .with_endpoint(e)
                .with_allow_http(e.starts_with("http://"))
                .with_virtual_hosted_style_request(false);
        }
        let store = Arc::new(b.build().map_err(|e| io_err("its configuration", e))?);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("sealpost-s3")
            .enable_all()
            .build()?;
        let s = Self {
            store,
            prefix: config.prefix.clone(),
            rt: Some(rt),
            hashing: Mutex::new(HashMap::new()),
            chains: Mutex::new(HashMap::new()),
            name: format!("{config:?}"),
            put_latency: None,
        };
        // Reachable, and the key may list the bucket.
        let probe = s.path("probe");
        let store = s.store.clone();
        s.block_on(async move {
            store
                .list_with_delimiter(Some(&probe))
                .await
                .map_err(|e| io_err("listing the bucket", e))
        })?;
        Ok(s)
    }

    /// Observes every run's PUT in `h`.
    pub fn with_put_latency(mut self, h: prometheus_client::metrics::histogram::Histogram) -> Self {
        self.put_latency = Some(h);
        self
    }

    /// Runs `f` on the store's own runtime and waits for it, from any
    /// thread (a blocking one, as the relay calls; or a test's).
    fn block_on<T: Send + 'static>(
        &self,
        f: impl std::future::Future<Output = std::io::Result<T>> + Send + 'static,
    ) -> std::io::Result<T> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let Some(rt) = &self.rt else {
            return Err(io_err("a request", "the store is closed"));
        };
        rt.spawn(async move {
            let _ = tx.send(f.await);
        });
        rx.recv()
            .unwrap_or_else(|_| Err(io_err("a request", "was dropped")))
    }

    fn path(&self, rest: &str) -> ObjectPath {
        if self.prefix.is_empty() {
            ObjectPath::from(rest)
        } else {
            ObjectPath::from(format!("{}/{rest}", self.prefix))
        }
    }

    fn run_path(&self, id: &BlobId, run: Run) -> ObjectPath {
        self.path(&format!("{}/{:016x}-{:016x}", hex(id), run.offset, run.len))
    }

    /// The runs stored for blob `id`, as listed.
    fn list_runs(&self, id: &BlobId) -> std::io::Result<Vec<Run>> {
        let store = self.store.clone();
        let prefix = self.path(&hex(id));
        self.block_on(async move {
            let metas: Vec<_> = store
                .list(Some(&prefix))
                .try_collect()
                .await
                .map_err(|e| io_err("listing a blob's runs", e))?;
            Ok(metas
                .iter()
                .filter_map(|m| m.location.filename().and_then(parse_run))
                .collect())
        })
    }

    /// The chain of runs covering `0 .. end` of blob `id` (kept, or
    /// listed again when what is kept does not reach).
    fn chain_to(&self, id: &BlobId, end: u64) -> std::io::Result<Vec<Run>> {
        if let Ok(c) = self.chains.lock() {
            if let Some(runs) = c.get(id) {
                if runs.last().is_some_and(|r| r.offset + r.len >= end) {
                    return Ok(runs.clone());
                }
            }
        }
        let runs = self.list_runs(id)?;
        let found = chain(&runs, end).ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!(
                    "the blob store holds no bytes {end} long of blob {}",
                    hex(id)
                ),
            )
        })?;
        if let Ok(mut c) = self.chains.lock() {
            if c.len() >= KEPT {
                c.clear();
            }
            c.insert(*id, found.clone());
        }
        Ok(found)
    }

    fn get_ranges(&self, id: &BlobId, wanted: Vec<(Run, Range<u64>)>) -> std::io::Result<Vec<u8>> {
        let store = self.store.clone();
        let paths: Vec<(ObjectPath, Range<u64>)> = wanted
            .into_iter()
            .map(|(run, r)| (self.run_path(id, run), r))
            .collect();
        self.block_on(async move {
            let mut out = Vec::new();
            for (p, r) in paths {
                let bytes = store
                    .get_range(&p, r)
                    .await
                    .map_err(|e| io_err("reading a blob", e))?;
                out.extend_from_slice(&bytes);
            }
            Ok(out)
        })
    }

    /// Flips a bit of byte `at` of blob `id` at rest (for tests of the
    /// scrub): the run holding it is written again, changed.
    pub fn damage(&self, id: &BlobId, at: u64) -> std::io::Result<()> {
        let runs = self.list_runs(id)?;
        let run = chain(&runs, at + 1)
            .and_then(|c| {
                c.into_iter()
                    .find(|r| r.offset <= at && at < r.offset + r.len)
            })
            .ok_or_else(|| io_err("damaging", "no such byte"))?;
        let mut bytes = self.get_ranges(id, vec![(run, 0..run.len)])?;
        bytes[(at - run.offset) as usize] ^= 1;
        let store = self.store.clone();
        let p = self.run_path(id, run);
        self.block_on(async move {
            store
                .put(&p, PutPayload::from(bytes))
                .await
                .map(|_| ())
                .map_err(|e| io_err("writing", e))
        })
    }
}

impl Drop for S3Blobs {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

impl BlobStore for S3Blobs {
    fn write_run(
        &self,
        id: &BlobId,
        offset: u64,
        _new: bool,
        run: &[BlobPiece],
        complete: bool,
    ) -> std::io::Result<Option<[u8; 32]>> {
        // The running hash: kept from this node's earlier runs, else
        // rebuilt from the bucket (what precedes `offset` is committed).
        let mut h = self
            .hashing
            .lock()
            .ok()
            .and_then(|mut m| m.remove(id))
            .filter(|h| h.upto == offset);
        if h.is_none() {
            let mut hasher = blake3::Hasher::new();
            if offset > 0 {
                let c = self.chain_to(id, offset)?;
                let wanted: Vec<(Run, Range<u64>)> = c
                    .iter()
                    .map(|run| (*run, 0..run.len.min(offset - run.offset)))
                    .collect();
                hasher.update(&self.get_ranges(id, wanted)?);
            }
            h = Some(Hashing {
                hasher,
                upto: offset,
            });
        }
        let Some(mut h) = h else {
            return Err(io_err("hashing", "no state"));
        };
        // One object per group of pieces of at most OBJECT_BYTES, PUT one
        // after another: the bytes copied for a request stay small (a
        // relay's run is up to 16 pieces; one 16 MiB object held a 16 MiB
        // copy besides the pieces themselves).
        let mut at = offset;
        let mut rest = run;
        while !rest.is_empty() {
            let mut take = 0;
            let mut bytes = 0;
            while take < rest.len() && (take == 0 || bytes + rest[take].data.len() <= OBJECT_BYTES)
            {
                bytes += rest[take].data.len();
                take += 1;
            }
            let (group, more) = rest.split_at(take);
            rest = more;
            let mut data = Vec::with_capacity(bytes);
            for p in group {
                data.extend_from_slice(&p.data);
            }
            h.hasher.update(&data);
            let r = Run {
                offset: at,
                len: data.len() as u64,
            };
            at += r.len;
            let store = self.store.clone();
            let p = self.run_path(id, r);
            let t = std::time::Instant::now();
            self.block_on(async move {
                store
                    .put(&p, PutPayload::from(data))
                    .await
                    .map(|_| ())
                    .map_err(|e| io_err("storing a run of pieces", e))
            })?;
            if let Some(lat) = &self.put_latency {
                lat.observe(t.elapsed().as_secs_f64());
            }
            if let Ok(mut c) = self.chains.lock() {
                if let Some(runs) = c.get_mut(id) {
                    if runs.last().map(|l| l.offset + l.len) == Some(r.offset) {
                        runs.push(r);
                    } else {
                        c.remove(id);
                    }
                }
            }
        }
        h.upto = at;
        if complete {
            return Ok(Some(*h.hasher.finalize().as_bytes()));
        }
        if let Ok(mut m) = self.hashing.lock() {
            if m.len() >= KEPT {
                m.clear();
            }
            m.insert(*id, h);
        }
        Ok(None)
    }

    fn read(&self, id: &BlobId, offset: u64, n: usize, out: &mut Vec<u8>) -> std::io::Result<()> {
        if n == 0 {
            return Ok(());
        }
        let end = offset + n as u64;
        let c = self.chain_to(id, end)?;
        let wanted: Vec<(Run, Range<u64>)> = c
            .iter()
            .filter(|r| r.offset < end && offset < r.offset + r.len)
            .map(|r| {
                let a = offset.max(r.offset) - r.offset;
                let b = end.min(r.offset + r.len) - r.offset;
                (*r, a..b)
            })
            .collect();
        let bytes = self.get_ranges(id, wanted)?;
        if bytes.len() != n {
            return Err(io_err("reading a blob", "short read"));
        }
        out.extend_from_slice(&bytes);
        Ok(())
    }

    fn remove(&self, id: &BlobId) {
        if let Ok(mut c) = self.chains.lock() {
            c.remove(id);
        }
        if let Ok(mut m) = self.hashing.lock() {
            m.remove(id);
        }
        let store = self.store.clone();
        let prefix = self.path(&hex(id));
        let r = self.block_on(async move {
            let metas: Vec<_> = store
                .list(Some(&prefix))
                .try_collect()
                .await
                .map_err(|e| io_err("listing", e))?;
            for m in metas {
                store
                    .delete(&m.location)
                    .await
                    .map_err(|e| io_err("deleting", e))?;
            }
            Ok(())
        });
        if let Err(e) = r {
            tracing::warn!("could not remove blob {}'s bytes: {e}", hex(id));
        }
    }

    fn older_than(&self, age: Duration) -> std::io::Result<Vec<BlobId>> {
        let store = self.store.clone();
        let prefix = if self.prefix.is_empty() {
            None
        } else {
            Some(ObjectPath::from(self.prefix.clone()))
        };
        let depth = if self.prefix.is_empty() {
            0
        } else {
            self.prefix.split('/').count()
        };
        let cutoff = chrono_now() - age.as_secs() as i64;
        self.block_on(async move {
            let metas: Vec<_> = store
                .list(prefix.as_ref())
                .try_collect()
                .await
                .map_err(|e| io_err("listing the bucket", e))?;
            // A blob is old when its newest run is.
            let mut newest: HashMap<BlobId, i64> = HashMap::new();
            for m in metas {
                let parts: Vec<_> = m.location.parts().collect();
                let Some(id) = parts.get(depth).and_then(|p| parse_hex_id(p.as_ref())) else {
                    continue;
                };
                let t = m.last_modified.timestamp();
                let e = newest.entry(id).or_insert(t);
                *e = (*e).max(t);
            }
            Ok(newest
                .into_iter()
                .filter(|(_, t)| *t <= cutoff)
                .map(|(id, _)| id)
                .collect())
        })
    }

    /// An object store does not say how much room it has.
    fn free_bytes(&self) -> std::io::Result<Option<u64>> {
        Ok(None)
    }
}

fn chrono_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(offset: u64, len: u64) -> Run {
        Run { offset, len }
    }

    #[test]
    fn chains_follow_runs_from_zero() {
        assert_eq!(
            chain(&[r(0, 10), r(10, 5)], 15),
            Some(vec![r(0, 10), r(10, 5)])
        );
        assert_eq!(
            chain(&[r(0, 10), r(10, 5)], 12),
            Some(vec![r(0, 10), r(10, 5)])
        );
        assert_eq!(chain(&[r(10, 5)], 15), None);
        assert_eq!(chain(&[], 0), Some(vec![]));
        // A run a node wrote and did not commit (a lost compare-and-set)
        // at the same offset with another length: the chain goes round.
        assert_eq!(
            chain(&[r(0, 10), r(10, 7), r(10, 5), r(15, 5)], 20),
            Some(vec![r(0, 10), r(10, 5), r(15, 5)])
        );
        assert_eq!(chain(&[r(0, 10), r(10, 7), r(10, 5)], 20), None);
    }

    #[test]
    fn names_parse_back() {
        assert_eq!(
            parse_run("0000000000000010-0000000000000005"),
            Some(r(16, 5))
        );
        assert_eq!(parse_run("10-5"), None);
        let id = BlobId([0xab; 16]);
        assert_eq!(parse_hex_id(&hex(&id)), Some(id));
        assert_eq!(parse_hex_id("zz"), None);
    }

    #[test]
    fn urls_parse() {
        std::env::set_var("AWS_ACCESS_KEY_ID", "k");
        std::env::set_var("AWS_SECRET_ACCESS_KEY", "s");
        let c =
            S3Config::parse("s3://mail-blobs/relay?endpoint=http://127.0.0.1:3900&region=garage")
                .expect("parses");
        assert_eq!(c.bucket, "mail-blobs");
        assert_eq!(c.prefix, "relay");
        assert_eq!(c.endpoint.as_deref(), Some("http://127.0.0.1:3900"));
        assert_eq!(c.region, "garage");
        assert!(S3Config::parse("http://x").is_err());
        assert!(S3Config::parse("s3://Bad_Bucket").is_err());
        assert!(S3Config::parse("s3://b?endpoint=ftp://x").is_err());
        assert!(S3Config::parse("s3://b?what=1").is_err());
    }
}
