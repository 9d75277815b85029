//! The store the relay tests run on: the embedded default (SQLite and
//! blob files), or with `SEALPOST_TEST_BACKEND=cluster` (as `.ci/run`
//! runs them a second time) PostgreSQL and an S3 bucket (Garage) — one
//! fresh database and bucket per data directory, so a relay restarted on
//! the same directory finds what it stored.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;

use sealpost_relay::Config;

static STORES: Mutex<Option<HashMap<PathBuf, (String, String)>>> = Mutex::new(None);

/// Whether the tests run on PostgreSQL and S3.
pub fn cluster() -> bool {
    match std::env::var("SEALPOST_TEST_BACKEND").as_deref() {
        Ok("cluster") => true,
        Ok("embedded") | Err(_) => false,
        Ok(other) => panic!("SEALPOST_TEST_BACKEND={other}: say embedded or cluster"),
    }
}

/// Points `cfg` at the backend the tests run on.
pub fn on_backend(cfg: &mut Config) {
    if !cluster() {
        return;
    }
    let mut stores = STORES.lock().unwrap_or_else(|e| e.into_inner());
    let (database, blobs) = stores
        .get_or_insert_with(HashMap::new)
        .entry(cfg.data.clone())
        .or_insert_with(|| {
            let what = "relay tests on the cluster backend (SEALPOST_TEST_BACKEND=cluster)";
            let url = sealpost_store::test_postgres::database(what)
                .unwrap_or_else(|| panic!("{what} need PostgreSQL"));
            let blobs = sealpost_store::test_s3::bucket_url(what)
                .unwrap_or_else(|| panic!("{what} need an S3 server"));
            (url, blobs)
        })
        .clone();
    cfg.database = Some(database);
    cfg.blobs = Some(blobs);
}

/// Says a test is skipped on the cluster backend, and why; true if so.
#[allow(dead_code)] // each test binary includes this file; forwarding.rs skips nothing
pub fn skipped_on_cluster(test: &str, why: &str) -> bool {
    if cluster() {
        eprintln!("SKIPPED {test} on the cluster backend: {why}");
        true
    } else {
        false
    }
}
