//! The agent's loop: passes on pushes, wake-ups from `sealpost send`, and timers; the wake socket.

use super::*;

/// Longest idle wait of the agent loop when subscribed.
pub(super) const IDLE: Duration = Duration::from_secs(30);

/// Wait between passes while the home relay cannot be reached.
pub(super) const RETRY: Duration = Duration::from_secs(1);

/// How long to wait before trying a home relay again after `failures`
/// failures in a row: 1 s, then 2 s. A try costs one connection attempt,
/// and the relay's return is noticed within 2 s (what waits for it then
/// goes at once); it is the log that backs off (see `run`).
pub(super) fn home_retry(failures: u32) -> Duration {
    if failures <= 1 {
        RETRY
    } else {
        RETRY * 2
    }
}

pub(super) async fn next_push(sub: &mut Option<UnboundedReceiver<u64>>) -> Option<u64> {
    match sub {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// What a client writes on the wake-up socket: one byte.
/// [`WAKE`]: the outbox changed, run a pass; the connection ends there.
pub const WAKE: u8 = 1;

/// [`WATCH`]: run a pass, and keep this connection: after every pass the
/// agent writes a byte on it, so that a command waiting for a state (as
/// `send --wait` does) re-reads the database when something may have
/// changed, instead of polling it.
pub const WATCH: u8 = 2;

/// Watching connections an agent keeps; the oldest is closed for a new one
/// (its command falls back to polling).
pub(super) const MAX_WATCHERS: usize = 64;

/// Waits for a client on the wake-up socket; a watching one is returned.
pub(super) async fn next_wake(wake: Option<&UnixListener>) -> Option<tokio::net::UnixStream> {
    match wake {
        Some(l) => {
            let (mut s, _) = l.accept().await.ok()?;
            // Reading the byte lets the client see its wake-up was taken.
            let mut b = [0u8; 1];
            let read = tokio::time::timeout(
                Duration::from_secs(1),
                tokio::io::AsyncReadExt::read(&mut s, &mut b),
            )
            .await;
            matches!(read, Ok(Ok(1)) if b[0] == WATCH).then_some(s)
        }
        None => std::future::pending().await,
    }
}

/// The path of the agent's wake-up socket in a home.
pub fn wake_socket(home: &std::path::Path) -> PathBuf {
    home.join("agent.sock")
}

/// Tells a running agent that the outbox changed. Returns false if no
/// agent is listening.
pub fn wake_agent(home: &std::path::Path) -> bool {
    use std::io::Write;
    match std::os::unix::net::UnixStream::connect(wake_socket(home)) {
        Ok(mut s) => s.write_all(&[WAKE]).is_ok(),
        Err(_) => false,
    }
}

/// Asks a running agent to run a pass and to tell this connection after
/// every pass ([`WATCH`]); `None` if no agent is listening. Read a byte
/// (with a timeout) to wait for the next pass; end of stream means the
/// agent stopped.
pub fn watch_agent(home: &std::path::Path) -> Option<std::os::unix::net::UnixStream> {
    use std::io::Write;
    let mut s = std::os::unix::net::UnixStream::connect(wake_socket(home)).ok()?;
    s.write_all(&[WATCH]).ok()?;
    Some(s)
}

/// Binds the wake-up socket (an old one left by a killed agent is
/// replaced: the caller holds the sync lock, so no live agent owns it).
pub fn bind_wake_socket(home: &std::path::Path) -> std::io::Result<UnixListener> {
    let path = wake_socket(home);
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    UnixListener::bind(&path)
}

impl Engine {
    /// Runs passes until `stop` completes or `done` says so: after each
    /// pass it waits for a push from the home relay, a wake-up on `wake`
    /// (`sealpost send` queued something), or the next retransmission or
    /// expiry, whichever comes first. Returns the summed statistics.
    pub async fn run<F>(
        &mut self,
        wake: Option<&UnixListener>,
        stop: impl std::future::Future<Output = ()>,
        mut done: F,
    ) -> Result<PassStats, EngineError>
    where
        F: FnMut(&Self) -> Result<bool, EngineError>,
    {
        let mut total = PassStats::default();
        let mut sub: Option<UnboundedReceiver<u64>> = None;
        let mut home_was_down = false;
        // Failures to reach the home relay in a row: the log says so at
        // the 1st, 2nd, 4th, 8th … failure only (it said two warnings a
        // second while a relay was down); tries are 1 then 2 s apart.
        let mut home_failures: u32 = 0;
        let mut home_down_since = std::time::Instant::now();
        tokio::pin!(stop);
        loop {
            // Subscribed before the pass, never after: whatever arrives
            // once the subscription stands is pushed, and whatever came
            // before it is fetched by the pass. (Subscribing after the
            // pass missed a receipt arriving in between until the idle
            // timer, 30 s.)
            if sub.is_none() {
                match self.subscribe().await {
                    Ok(rx) => {
                        sub = Some(rx);
                        if home_was_down {
                            // The home relay is back: what waits for it
                            // goes now, not after its backoff.
                            home_was_down = false;
                            let n = self.agent.db.relay_reachable(
                                &self.home_addr.to_string(),
                                self.clock.now_ms(),
                            )?;
                            if n > 0 {
                                tracing::info!(
                                    "{} is back: {n} messages waiting for it go now",
                                    self.home_addr
                                );
                            }
                        }
                    }
                    Err(e) => {
                        tracing::debug!("subscribing at {}: {e}", self.home_addr);
                        self.home.disconnect();
                        home_was_down = true;
                    }
                }
            }
            let s = match self.pass().await {
                Ok(s) => s,
                Err(e) => {
                    // A daemon keeps going: the database may be busy or the
                    // disk full for a while. Nothing was acknowledged that
                    // is not durable, so the next pass redoes the work.
                    tracing::error!("delivery pass failed: {e}; retrying in {RETRY:?}");
                    tokio::select! {
                        () = &mut stop => return Ok(total),
                        () = tokio::time::sleep(RETRY) => {}
                    }
                    continue;
                }
            };
            if !s.is_idle() {
                tracing::debug!("pass: {s:?}");
            }
            let home_down = sub.is_none() || s.home_errors > 0;
            if home_down {
                if home_failures == 0 {
                    home_down_since = std::time::Instant::now();
                }
                home_failures = home_failures.saturating_add(1);
                if home_failures.is_power_of_two() {
                    tracing::warn!(
                        "cannot reach the home relay {} ({}); {} in a row over {}, trying again in {}",
                        self.home_addr,
                        s.home_error.as_deref().unwrap_or("cannot subscribe"),
                        home_failures,
                        humantime::format_duration(Duration::from_secs(home_down_since.elapsed().as_secs())),
                        humantime::format_duration(home_retry(home_failures)),
                    );
                }
            } else if home_failures > 0 {
                tracing::info!(
                    "the home relay {} is reachable again (after {} failed tries)",
                    self.home_addr,
                    home_failures
                );
                home_failures = 0;
            }
            total.add(&s);
            self.tell_watchers();
            if done(self)? {
                return Ok(total);
            }
            let cap = if home_down {
                home_retry(home_failures)
            } else {
                IDLE
            };
            let mut wait = self.next_due_in()?.unwrap_or(cap).min(cap);
            if s.download_bytes > 0
                && !self
                    .agent
                    .db
                    .downloads(Some(DownloadState::Downloading), 1)?
                    .is_empty()
            {
                // A download was cut into slices: continue at once.
                wait = Duration::ZERO;
            }
            // Until the next pass is due: a push or a `send` starts it at
            // once; meanwhile free database pages left by a burst go back
            // a step at a time (each step short, so what arrives waits
            // little; without a pass, so no round trip to the relay).
            let until = tokio::time::Instant::now() + wait;
            loop {
                let left = until.saturating_duration_since(tokio::time::Instant::now());
                let nap = if self.giving_back {
                    left.min(GIVE_BACK_EVERY)
                } else {
                    left
                };
                let woken = tokio::select! {
                    () = &mut stop => return Ok(total),
                    pushed = next_push(&mut sub) => {
                        match pushed {
                            None => sub = None,
                            Some(_) => {
                                if let Some(rx) = sub.as_mut() {
                                    while rx.try_recv().is_ok() {}
                                }
                            }
                        }
                        true
                    }
                    watcher = next_wake(wake) => {
                        if let Some(w) = watcher {
                            if self.watchers.len() >= MAX_WATCHERS {
                                self.watchers.remove(0);
                            }
                            self.watchers.push(w);
                        }
                        true
                    }
                    () = tokio::time::sleep(nap) => false,
                };
                if woken || tokio::time::Instant::now() >= until {
                    break;
                }
                self.give_back_step();
            }
        }
    }

    /// Tells every watching command that a pass ended (a byte each; one
    /// that went away, or stopped reading, is dropped).
    pub(super) fn tell_watchers(&mut self) {
        self.watchers.retain(|w| match w.try_write(&[1]) {
            Ok(_) => true,
            // Its buffer is full of earlier news: it has something to read.
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => true,
            Err(_) => false,
        });
    }

    /// Submits what is due, without fetching (what `send` does when no
    /// agent is running).
    pub async fn submit_only(&mut self) -> Result<PassStats, EngineError> {
        let mut stats = PassStats::default();
        self.submit_due(&mut stats).await?;
        Ok(stats)
    }
}
