//! What the relay's store and the agent share about SQLite: a database in
//! incremental auto-vacuum mode gives its free pages back to the file
//! system in steps whose cost stays bounded however long the free list is.
//!
//! SQLite's incremental steps (`PRAGMA incremental_vacuum(n)`) look each
//! page they give back up in the free list, so a step costs more the
//! longer the list: a step of 512 pages took up to 95 ms with 100,000
//! pages free, and a relay giving back what a million-message burst left
//! spent 1.87 G instructions on it; an agent's 1,024-page step after a
//! backlog of 130,000 messages held its loop about 80 ms, which every
//! message sent meanwhile waited. So:
//!
//! - while the pages in use are few ([`Policy::all_at_once_live_pages`]),
//!   every free page goes back at once, by SQLite's full auto-vacuum
//!   turned on for one commit, which moves the pages in use at the end of
//!   the file into free ones below and cuts the rest off without that
//!   search (400 MB of free pages in 3.4 ms);
//! - otherwise in steps that are halved while one takes longer than
//!   [`Policy::step_target`] and doubled (up to
//!   [`Policy::max_step_pages`]) while one takes under a quarter of it
//!   ([`Pace`]).
#![forbid(unsafe_code)]

use std::time::{Duration, Instant};

use rusqlite::Connection;

/// How a database gives its free pages back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// Free pages kept for reuse instead of given back.
    pub keep_pages: i64,
    /// While at most this many pages are in use, every free page goes
    /// back in one commit.
    pub all_at_once_live_pages: i64,
    /// The most pages one step gives back.
    pub max_step_pages: i64,
    /// The fewest pages one step gives back.
    pub min_step_pages: i64,
    /// How long one step should take at most (what a write arriving
    /// meanwhile may wait).
    pub step_target: Duration,
}

/// How many pages the next step gives back: halved after a step longer
/// than the policy's target, doubled after one under a quarter of it.
#[derive(Debug, Clone)]
pub struct Pace {
    policy: Policy,
    pages: i64,
}

impl Pace {
    /// Starts at the policy's largest step.
    pub fn new(policy: Policy) -> Self {
        Self {
            pages: policy.max_step_pages.max(policy.min_step_pages).max(1),
            policy,
        }
    }

    /// The pages the next step gives back, at most.
    pub fn pages(&self) -> i64 {
        self.pages
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Learns from a step that took `took`.
    pub fn after(&mut self, took: Duration) {
        let p = &self.policy;
        if took > p.step_target {
            self.pages = (self.pages / 2).max(p.min_step_pages).max(1);
        } else if took < p.step_target / 4 {
            self.pages = (self.pages * 2).min(p.max_step_pages.max(p.min_step_pages).max(1));
        }
    }
}

/// What one step did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Step {
    /// Pages given back.
    pub given: i64,
    /// Whether more than the kept pages may still be free.
    pub more: bool,
}

/// One step of giving free pages back (none while at most the kept pages
/// are free). After the last step the log is checkpointed, which is when
/// a database in WAL mode shrinks.
pub fn give_back_step(conn: &Connection, pace: &mut Pace) -> rusqlite::Result<Step> {
    let policy = pace.policy;
    let counts = || -> rusqlite::Result<(i64, i64)> {
        conn.query_row(
            "SELECT page_count, freelist_count FROM pragma_page_count, pragma_freelist_count",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
    };
    let (pages, free) = counts()?;
    if free <= policy.keep_pages {
        return Ok(Step {
            given: 0,
            more: false,
        });
    }
    let step = if pages - free <= policy.all_at_once_live_pages {
        let all = conn.execute_batch("PRAGMA auto_vacuum = FULL");
        // Back to steps whatever happened: a full auto-vacuum at every
        // commit would move pages in every transaction.
        let back = conn.execute_batch("PRAGMA auto_vacuum = INCREMENTAL");
        all?;
        back?;
        let (_, free_after) = counts()?;
        Step {
            given: (free - free_after).max(0),
            more: false,
        }
    } else {
        let n = (free - policy.keep_pages).min(pace.pages);
        let started = Instant::now();
        // Each step of the statement gives back one page: run it to its end.
        let mut stmt = conn.prepare(&format!("PRAGMA incremental_vacuum({n})"))?;
        let mut rows = stmt.query([])?;
        while rows.next()?.is_some() {}
        pace.after(started.elapsed());
        // What it did, not what it was asked: a step that gave nothing
        // back says no more (a caller that steps while `more` must not
        // spin on a step that cannot progress).
        let (_, free_after) = counts()?;
        let given = (free - free_after).max(0);
        Step {
            given,
            more: given > 0 && free_after > policy.keep_pages,
        }
    };
    if !step.more {
        // In WAL mode the file shrinks when the log is copied back.
        conn.execute_batch("PRAGMA wal_checkpoint(PASSIVE)")?;
    }
    Ok(step)
}

/// What [`incremental_vacuum_on`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VacuumMode {
    /// Already incremental.
    Incremental,
    /// Full, left by a give-back all at once that stopped between its two
    /// settings: switched back without a rewrite (the file is laid out
    /// for it already).
    SwitchedFromFull,
    /// None, or an empty database: switched (a new database must be so
    /// before its first table).
    SwitchedEmpty,
    /// None, in a database with pages: rewritten once (`VACUUM`), which
    /// takes time that grows with the file.
    Rewritten,
}

/// Makes the database give free pages back in steps (`auto_vacuum =
/// INCREMENTAL`); `before_rewrite` is told the pages of a database that
/// must be rewritten for it, before the rewrite starts.
pub fn incremental_vacuum_on(
    conn: &Connection,
    before_rewrite: impl FnOnce(i64),
) -> rusqlite::Result<VacuumMode> {
    let mode: i64 = conn.pragma_query_value(None, "auto_vacuum", |r| r.get(0))?;
    if mode == 2 {
        return Ok(VacuumMode::Incremental);
    }
    let pages: i64 = conn.pragma_query_value(None, "page_count", |r| r.get(0))?;
    conn.pragma_update(None, "auto_vacuum", 2i64)?;
    if mode == 1 {
        return Ok(VacuumMode::SwitchedFromFull);
    }
    if pages == 0 {
        return Ok(VacuumMode::SwitchedEmpty);
    }
    before_rewrite(pages);
    conn.execute_batch("VACUUM")?;
    Ok(VacuumMode::Rewritten)
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: Policy = Policy {
        keep_pages: 64,
        all_at_once_live_pages: 256,
        max_step_pages: 512,
        min_step_pages: 16,
        step_target: Duration::from_millis(20),
    };

    fn db(dir: &tempfile::TempDir) -> Connection {
        let conn = Connection::open(dir.path().join("t.db")).expect("open");
        assert_eq!(
            incremental_vacuum_on(&conn, |_| panic!("an empty database is not rewritten"))
                .expect("mode"),
            VacuumMode::SwitchedEmpty
        );
        conn.pragma_update(None, "journal_mode", "WAL")
            .expect("wal");
        conn.execute_batch("CREATE TABLE t (tag INTEGER, b BLOB)")
            .expect("table");
        conn
    }

    fn fill(conn: &Connection, tag: i64, rows: i64) {
        conn.execute(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?2)
             INSERT INTO t SELECT ?1, randomblob(3000) FROM n",
            rusqlite::params![tag, rows],
        )
        .expect("fill");
    }

    fn counts(conn: &Connection) -> (i64, i64) {
        conn.query_row(
            "SELECT page_count, freelist_count FROM pragma_page_count, pragma_freelist_count",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .expect("counts")
    }

    #[test]
    fn steps_halve_while_slow_and_double_while_quick_within_bounds() {
        let mut p = Pace::new(POLICY);
        assert_eq!(p.pages(), 512);
        for want in [256, 128, 64, 32, 16, 16] {
            p.after(Duration::from_millis(21));
            assert_eq!(p.pages(), want);
        }
        p.after(Duration::from_millis(10));
        assert_eq!(p.pages(), 16, "between a quarter and the target: kept");
        for want in [32, 64, 128, 256, 512, 512] {
            p.after(Duration::from_millis(4));
            assert_eq!(p.pages(), want);
        }
    }

    #[test]
    fn little_in_use_gives_every_free_page_back_at_once() {
        let dir = tempfile::tempdir().expect("dir");
        let conn = db(&dir);
        fill(&conn, 1, 20);
        fill(&conn, 2, 2000);
        conn.execute("DELETE FROM t WHERE tag = 2", [])
            .expect("delete");
        let (_, free) = counts(&conn);
        assert!(free > 1900, "{free}");
        let mut pace = Pace::new(POLICY);
        let step = give_back_step(&conn, &mut pace).expect("step");
        assert_eq!(
            step,
            Step {
                given: free,
                more: false
            }
        );
        let (pages, free) = counts(&conn);
        assert_eq!(free, 0);
        assert!(pages < 64, "{pages}");
        let mode: i64 = conn
            .pragma_query_value(None, "auto_vacuum", |r| r.get(0))
            .expect("mode");
        assert_eq!(mode, 2, "back to incremental");
        let len = std::fs::metadata(dir.path().join("t.db"))
            .expect("len")
            .len();
        assert!(len < 64 * 4096, "the file shrank: {len}");
        assert_eq!(
            give_back_step(&conn, &mut pace).expect("again"),
            Step {
                given: 0,
                more: false
            }
        );
    }

    #[test]
    fn much_in_use_gives_back_in_steps_down_to_the_kept_pages() {
        let dir = tempfile::tempdir().expect("dir");
        let conn = db(&dir);
        // Interleaved: what stays is spread through the file.
        for round in 0..10 {
            fill(&conn, 1, 60);
            fill(&conn, 2 + round, 200);
        }
        conn.execute("DELETE FROM t WHERE tag > 1", [])
            .expect("delete");
        let (pages, free) = counts(&conn);
        assert!(
            pages - free > POLICY.all_at_once_live_pages,
            "{pages} {free}"
        );
        let mut pace = Pace::new(POLICY);
        let mut steps = 0;
        loop {
            let s = give_back_step(&conn, &mut pace).expect("step");
            assert!(s.given <= POLICY.max_step_pages, "{s:?}");
            steps += 1;
            if !s.more {
                break;
            }
            assert!(steps < 1000);
        }
        assert!(steps >= 3, "{steps}");
        let (_, free) = counts(&conn);
        assert_eq!(free, POLICY.keep_pages);
        let rows: i64 = conn
            .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .expect("rows");
        assert_eq!(rows, 600, "every row still there");
    }

    /// A database that cannot give pages back (never switched to
    /// incremental mode) says it gave none and that no more will come,
    /// on either path: a caller stepping while `more` stops.
    #[test]
    fn a_step_that_cannot_progress_says_so() {
        let dir = tempfile::tempdir().expect("dir");
        let conn = Connection::open(dir.path().join("none.db")).expect("open");
        conn.execute_batch("CREATE TABLE t (tag INTEGER, b BLOB)")
            .expect("table");
        for (live, rows) in [(20, 2000), (2000, 2000)] {
            conn.execute("DELETE FROM t", []).expect("empty");
            fill(&conn, 1, live);
            fill(&conn, 2, rows);
            conn.execute("DELETE FROM t WHERE tag = 2", [])
                .expect("delete");
            let mut pace = Pace::new(POLICY);
            assert_eq!(
                give_back_step(&conn, &mut pace).expect("step"),
                Step {
                    given: 0,
                    more: false
                },
                "{live} rows in use"
            );
        }
    }

    #[test]
    fn a_database_left_in_full_mode_switches_back_without_a_rewrite() {
        let dir = tempfile::tempdir().expect("dir");
        let conn = db(&dir);
        fill(&conn, 1, 10);
        conn.execute_batch("PRAGMA auto_vacuum = FULL")
            .expect("full");
        assert_eq!(
            incremental_vacuum_on(&conn, |_| panic!("no rewrite")).expect("mode"),
            VacuumMode::SwitchedFromFull
        );
        assert_eq!(
            incremental_vacuum_on(&conn, |_| panic!("no rewrite")).expect("mode"),
            VacuumMode::Incremental
        );
        let old = Connection::open(dir.path().join("old.db")).expect("old");
        old.execute_batch("CREATE TABLE t (b BLOB); INSERT INTO t VALUES (randomblob(10000))")
            .expect("old table");
        let mut told = 0;
        assert_eq!(
            incremental_vacuum_on(&old, |p| told = p).expect("mode"),
            VacuumMode::Rewritten
        );
        assert!(told > 1, "{told}");
        let mode: i64 = old
            .pragma_query_value(None, "auto_vacuum", |r| r.get(0))
            .expect("mode");
        assert_eq!(mode, 2);
    }
}
