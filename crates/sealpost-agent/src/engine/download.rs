//! Downloading a received file's blob, verifying each chunk, and storing the file before its receipt.

use super::*;

impl Engine {
    /// Continues every unfinished download, and asks again for repairs
    /// that did not come.
    ///
    /// One download's failure on this machine (a name the file system
    /// refuses, a full disk) is that download's alone: it is logged and
    /// tried again after a wait that doubles each pass it fails (from 5 s
    /// up to an hour), and after [`MAX_LOCAL_ERRORS`] in a row it fails and
    /// its sender gets a signed rejection. The other downloads go on, and
    /// the pass always goes on to send its receipts.
    pub(super) async fn run_downloads(&mut self, stats: &mut PassStats) -> Result<(), EngineError> {
        let now = self.clock.now_ms();
        for d in self
            .agent
            .db
            .downloads(Some(DownloadState::Downloading), 64)?
        {
            if d.local_errors > 0 && now < d.changed_ms + local_retry_ms(d.local_errors) {
                continue;
            }
            let (msg, name) = (d.key(), d.name.clone());
            let kept = d.clone();
            match self.download(d, stats).await {
                Ok(()) => {}
                Err(EngineError::Relay(e)) => {
                    tracing::warn!("receiving {name}: {e}; going on next pass");
                    self.home.disconnect();
                }
                Err(e) => {
                    self.progress.finish();
                    stats.download_errors += 1;
                    let why = e.to_string();
                    let n = self
                        .agent
                        .db
                        .download_local_error(&msg, &why, self.clock.now_ms())?;
                    if n >= MAX_LOCAL_ERRORS {
                        tracing::error!("receiving {name}: {why}; failed {n} times in a row, giving up and telling the sender");
                        self.give_up_download(&kept, &why, stats)?;
                    } else {
                        tracing::warn!(
                            "receiving {name}: {why}; trying again in {} s",
                            local_retry_ms(n) / 1000
                        );
                    }
                }
            }
        }
        let now = self.clock.now_ms();
        for d in self
            .agent
            .db
            .downloads(Some(DownloadState::Repairing), 64)?
        {
            if now.saturating_sub(d.changed_ms) >= REPAIR_RETRY_MS {
                let bad = d.bad.clone();
                self.request_repair(&d, &bad).await?;
            }
        }
        Ok(())
    }

    /// Ends a download that cannot be stored here: failed, and its sender
    /// is sent a signed rejection `not-stored` (instead of retransmitting
    /// until the message expires).
    pub(super) fn give_up_download(
        &mut self,
        d: &crate::outbox::Download,
        why: &str,
        stats: &mut PassStats,
    ) -> Result<(), EngineError> {
        stats.files_failed += 1;
        let rejection = d
            .relay
            .clone()
            .map(|r| d.rejection(r, RejectReason::NotStored));
        self.agent.db.download_end(
            &d.key(),
            DownloadEnd::Failed,
            None,
            Some(why),
            rejection.as_ref(),
            self.clock.now_ms(),
        )?;
        Ok(())
    }

    pub(super) async fn download(
        &mut self,
        d: crate::outbox::Download,
        stats: &mut PassStats,
    ) -> Result<(), EngineError> {
        use crate::transfer;
        // A file that cannot be stored here fails, and its sender is told
        // so with a signed rejection (instead of retrying until expiry).
        let fail =
            |this: &mut Self, stats: &mut PassStats, why: String| -> Result<(), EngineError> {
                tracing::warn!("receiving {}: {why}", d.name);
                this.give_up_download(&d, &why, stats)
            };
        let layout = match d.layout() {
            Ok(l) => l,
            Err(e) => return fail(self, stats, e.to_string()),
        };
        let dir = PathBuf::from(&d.dir);
        if let Err(e) = crate::fsutil::ensure_private_dir(&dir) {
            return fail(self, stats, format!("cannot create {}: {e}", dir.display()));
        }
        // Room for the rest of the file, and the reserve kept free: else
        // this download waits (a local error, retried with its backoff).
        let still = d
            .size
            .saturating_sub((d.next_chunk * d.chunk_size as u64).min(d.size));
        if still > 0 {
            if let Ok(st) = rustix::fs::statvfs(&dir) {
                let free = st.f_bavail.saturating_mul(st.f_frsize);
                if free < still.saturating_add(self.keep_free) {
                    return Err(AgentError::Io {
                        what: "finding room in",
                        path: dir.clone(),
                        source: std::io::Error::new(
                            std::io::ErrorKind::StorageFull,
                            format!(
                                "{free} bytes free; the file needs {still} more and {} are kept free (--keep-free)",
                                self.keep_free
                            ),
                        ),
                    }
                    .into());
                }
            }
        }
        let cipher = d.key.cipher();
        let part_path = transfer::part_path(&dir, &d.sender, &d.blob_id.0);
        let keep = (d.next_chunk * d.chunk_size as u64).min(d.size);
        if keep > 0 && std::fs::symlink_metadata(&part_path).is_err() {
            // A download under way when partial files were named by the
            // blob id alone: its chunks move to the new name (if another
            // sender's download took the old one first, the read-back at
            // the end finds it wrong and the download starts again).
            let legacy = transfer::legacy_part_path(&dir, &d.blob_id.0);
            if std::fs::symlink_metadata(&legacy).is_ok_and(|m| m.is_file()) {
                let dir_err = |what: &'static str| {
                    let dir = dir.clone();
                    move |source| AgentError::Io {
                        what,
                        path: dir,
                        source,
                    }
                };
                std::fs::rename(&legacy, &part_path).map_err(dir_err("renaming in"))?;
                crate::fsutil::sync_dir(&dir).map_err(dir_err("syncing"))?;
            }
        }
        let new_part = std::fs::symlink_metadata(&part_path).is_err();
        let part = transfer::open_part(&part_path, keep).map_err(|source| AgentError::Io {
            what: "opening",
            path: part_path.clone(),
            source,
        })?;
        if new_part {
            // The partial file's name is durable before any progress in
            // it is committed (a crash could otherwise lose the name with
            // the chunks the database says are there; the read-back would
            // catch it, at the cost of a whole download again).
            crate::fsutil::sync_dir(&dir).map_err(|source| AgentError::Io {
                what: "syncing",
                path: dir.clone(),
                source,
            })?;
        }
        let io_err = |what: &'static str, source: std::io::Error| AgentError::Io {
            what,
            path: part_path.clone(),
            source,
        };
        let writer = transfer::PartWriter::new(
            part.try_clone().map_err(|e| io_err("opening", e))?,
            &part_path,
        );
        let count = layout.chunk_count();
        let mut i = d.next_chunk;
        let mut bad = d.bad.clone();
        let bars = self.progress.clone();
        let progress = crate::transfer::FileBytes::new(bars.clone(), layout);
        progress.start(
            &format!("download {}", d.name),
            layout.blob_len(),
            layout.offset(i.min(count)),
        );
        let mut since_commit = 0u64;
        let blob_id = d.blob_id;
        let expires_at = self.agent.db.inbox_entry(&d.key())?.map(|e| e.expires_at);
        let mut idle_since: Option<std::time::Instant> = None;
        if i >= count && !bad.is_empty() {
            // Repair: only the damaged chunks, from the repair blob the
            // sender uploaded for them.
            let Some(offer) = self
                .agent
                .db
                .repair_offer(&d.key())?
                .and_then(|o| sealpost_proto::repair::RepairOffer::decode(&o).ok())
                .filter(|o| o.blob_id == d.blob_id)
            else {
                progress.finish();
                return self.request_repair(&d, &bad).await;
            };
            let valid_len: Option<u64> = offer
                .chunks
                .iter()
                .map(|&c| (c < count).then(|| layout.sealed_len(c)))
                .sum();
            if valid_len != Some(offer.repair_len) {
                tracing::warn!(
                    "receiving {}: a repair offer that does not fit the file; asking again",
                    d.name
                );
                progress.finish();
                return self.request_repair(&d, &bad).await;
            }
            let mut ranges = Vec::with_capacity(offer.chunks.len());
            let mut pos = 0u64;
            for &c in &offer.chunks {
                ranges.push((pos, layout.sealed_len(c) as u32));
                pos += layout.sealed_len(c);
            }
            let repair_id = offer.repair_blob_id;
            // A repair forwarded relay to relay may arrive after its
            // offer: wait for it (while the message lives) rather than ask
            // for another — while it arrives, or for a minute if none of
            // it is there: an offer whose blob the relay lost, or one that
            // arrived late (a newer one came first), is then asked again.
            let here = self
                .home
                .call(&self.agent.identity, async |c| {
                    c.blob_status(repair_id).await
                })
                .await;
            let live = expires_at.is_none_or(|e| self.clock.now_ms() / 1000 < e);
            let waited = self.clock.now_ms().saturating_sub(d.changed_ms);
            if let Ok((stored, false)) = here {
                if live && (stored > 0 || waited < REPAIR_RETRY_MS) {
                    tracing::info!(
                        "receiving {}: waiting for the repaired chunks to arrive at your relay",
                        d.name
                    );
                    progress.finish();
                    return Ok(());
                }
                if stored == 0 {
                    tracing::warn!(
                        "receiving {}: the repaired chunks never reached your relay; asking again",
                        d.name
                    );
                    progress.finish();
                    return self.request_repair(&d, &bad).await;
                }
            }
            let mut still: Vec<u64> = bad
                .iter()
                .copied()
                .filter(|b| !offer.chunks.contains(b))
                .collect();
            for (window, idx) in ranges.chunks(64).zip(offer.chunks.chunks(64)) {
                let answers = self
                    .home
                    .call(&self.agent.identity, async |c| {
                        Ok(c.blob_get_many(repair_id, window).await)
                    })
                    .await;
                match answers {
                    Ok(list) => {
                        for ((a, &j), &(at, _)) in list.into_iter().zip(idx).zip(window) {
                            match a {
                                Ok(mut data) if bad.contains(&j) => {
                                    stats.download_bytes += data.len() as u64;
                                    let damaged = transfer::write_chunks(
                                        &part, &cipher, &layout, j, &mut data,
                                    )
                                    .map_err(|e| io_err("writing", e))?;
                                    sealpost_proto::buffers::give(data);
                                    if !damaged.is_empty() {
                                        self.found.push((
                                            Caught::DamagedChunk,
                                            format!("blob:{}@{at}", repair_id),
                                        ));
                                    }
                                    still.extend(damaged);
                                }
                                Ok(_) => {}
                                Err(_) => still.push(j),
                            }
                        }
                    }
                    Err(_) => still.extend(idx.iter().filter(|j| bad.contains(j))),
                }
            }
            still.sort_unstable();
            still.dedup();
            tracing::info!(
                "receiving {}: {} of {} damaged chunks repaired",
                d.name,
                bad.len() - still.len(),
                bad.len()
            );
            let _ = self
                .home
                .call(&self.agent.identity, async |c| {
                    c.blob_delete(repair_id).await
                })
                .await;
            bad = still;
        }
        // Read back what is durable while the rest downloads (from the
        // start: a resumed download reads back what earlier passes wrote).
        // Not after a repair: repaired chunks rewrite bytes already read.
        let kept = self
            .read_backs
            .iter()
            .position(|(m, _)| *m == d.key())
            .map(|k| self.read_backs.remove(k).1);
        let mut verifier = if d.bad.is_empty() {
            match kept {
                Some(v) if v.continues(&part, keep) => Some(v),
                _ => transfer::ReadBack::start(&part, &part_path).ok(),
            }
        } else {
            None
        };
        // How much of the blob the relay holds, while the sender is still
        // uploading: only whole stored ranges are asked for.
        let mut stored_known = 0u64;
        let mut complete_known = false;
        let mut this_pass = 0u64;
        // Up to PIECE_WINDOW ranges in flight (`next` is the chunk after
        // the last one asked for); each answer is handed to a thread that
        // decrypts and writes it (`i` is the chunk after the last one
        // handed over) while the next answers arrive.
        let mut sink = transfer::PieceSink::start(writer, d.key.cipher(), layout)
            .map_err(|e| io_err("starting a writer for", e))?;
        let mut in_flight = std::collections::VecDeque::with_capacity(PIECE_WINDOW);
        let mut next = i;
        let chunks_in = |from: u64, n: u64| {
            let (mut k, mut consumed) = (from, 0u64);
            while consumed < n && k < count {
                consumed += layout.sealed_len(k);
                k += 1;
            }
            k
        };
        // What the writing threads did, in order: damaged chunks found,
        // and checkpoints reached (the file fsync'd up to a chunk), whose
        // progress is committed then: everything before the checkpoint is
        // durable, and every damaged chunk before it is known.
        let record = |this: &mut Self,
                      bad: &mut Vec<u64>,
                      verifier: &mut Option<transfer::ReadBack>,
                      events: Vec<transfer::SinkEvent>|
         -> Result<(), EngineError> {
            for event in events {
                match event {
                    transfer::SinkEvent::Written(off, damaged) => {
                        if !damaged.is_empty() {
                            this.found
                                .push((Caught::DamagedChunk, format!("blob:{}@{off}", blob_id)));
                        }
                        bad.extend(damaged);
                    }
                    transfer::SinkEvent::Durable(upto) => {
                        this.agent.db.download_progress(
                            &d.key(),
                            upto,
                            bad,
                            this.clock.now_ms(),
                        )?;
                        if let Some(v) = verifier.as_mut() {
                            v.durable((upto * d.chunk_size as u64).min(d.size));
                        }
                    }
                }
            }
            Ok(())
        };
        'pieces: while i < count {
            if !complete_known
                && next < count
                && stored_known
                    < layout.offset(next) + transfer::piece_len(&layout, layout.offset(next)) as u64
            {
                match self
                    .home
                    .call(&self.agent.identity, async |c| c.blob_status(blob_id).await)
                    .await
                {
                    Ok((stored, complete)) => {
                        stored_known = stored;
                        complete_known = complete;
                    }
                    Err(e) => {
                        tracing::warn!("downloading {}: {e}; continuing next pass", d.name);
                        self.home.disconnect();
                        break;
                    }
                }
            }
            let client = match self.home.client(&self.agent.identity).await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!("downloading {}: {e}; continuing next pass", d.name);
                    self.home.disconnect();
                    break;
                }
            };
            while in_flight.len() < PIECE_WINDOW && next < count {
                let off = layout.offset(next);
                let n = transfer::piece_len(&layout, off);
                if !complete_known && off + n as u64 > stored_known {
                    break;
                }
                let p = client.blob_get_send(blob_id, off, n as u32).await;
                in_flight.push_back((off, n, p));
                next = chunks_in(next, n as u64);
            }
            let mut short = false;
            match in_flight.pop_front() {
                // Nothing stored to ask for yet.
                None => short = true,
                Some((off, n, p)) => match client.blob_get_answer(p).await {
                    Ok(data) if data.len() == n => {
                        idle_since = None;
                        sink.put(off, i, data).map_err(|e| io_err("writing", e))?;
                        i = chunks_in(i, n as u64);
                        progress.advance(n as u64);
                        stats.download_bytes += n as u64;
                        since_commit += n as u64;
                        this_pass += n as u64;
                    }
                    // Short although the relay said the range is stored.
                    Ok(v) if complete_known || off + n as u64 <= stored_known => {
                        self.found
                            .push((Caught::ShortBlobData, format!("blob:{}@{off}", blob_id)));
                        tracing::warn!(
                            "receiving {}: the relay sent {} of {n} bytes at {off} of a whole blob",
                            d.name,
                            v.len()
                        );
                        short = true;
                    }
                    // Not there yet: the sender streams the blob while we
                    // read it (or has not started to upload it again).
                    Ok(_)
                    | Err(ClientError::Server {
                        code: sealpost_proto::relay::ErrorCode::NotFound,
                        ..
                    }) => short = true,
                    Err(e) => {
                        tracing::warn!("downloading {}: {e}; continuing next pass", d.name);
                        self.home.disconnect();
                        break 'pieces;
                    }
                },
            }
            if short {
                // Ask again from the first piece not received.
                in_flight.clear();
                next = i;
            }
            let events = sink.events().map_err(|e| io_err("writing", e))?;
            record(self, &mut bad, &mut verifier, events)?;
            if self.download_slice.is_some_and(|max| this_pass >= max) && i < count {
                // Enough for this pass: other mail goes first, the next
                // pass (right away) continues from here.
                break 'pieces;
            }
            if short {
                if expires_at.is_some_and(|e| self.clock.now_ms() / 1000 >= e) {
                    progress.finish();
                    return fail(self, stats,
                        "its data did not arrive at the relay before the message expired; ask the sender to send it again".into(),
                    );
                }
                let since = *idle_since.get_or_insert_with(std::time::Instant::now);
                // Waiting is for a blob that is streaming in; one of which
                // nothing came in this pass is left to a later pass at once
                // (a sender that never uploads must not cost every pass
                // the wait).
                if this_pass == 0 || since.elapsed() > STREAM_WAIT {
                    if this_pass > 0 {
                        tracing::info!(
                            "receiving {}: waiting for the sender to upload the rest ({} of {count} chunks here)",
                            d.name,
                            i
                        );
                    } else {
                        tracing::debug!("receiving {}: nothing new at the relay yet", d.name);
                    }
                    break 'pieces;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            if since_commit >= DOWNLOAD_COMMIT_BYTES {
                // Made durable and committed by `record` once the writing
                // thread got there; meanwhile the next pieces arrive.
                sink.checkpoint(i).map_err(|e| io_err("writing", e))?;
                since_commit = 0;
            }
        }
        let events = sink.drain().map_err(|e| io_err("writing", e))?;
        record(self, &mut bad, &mut verifier, events)?;
        drop(sink);
        progress.finish();
        part.sync_data().map_err(|e| io_err("syncing", e))?;
        self.agent
            .db
            .download_progress(&d.key(), i, &bad, self.clock.now_ms())?;
        if i < count {
            if let Some(v) = verifier.filter(|_| bad.is_empty()) {
                if self.read_backs.len() >= KEPT_READ_BACKS {
                    self.read_backs.remove(0);
                }
                self.read_backs.push((d.key(), v));
            }
            return Ok(());
        }
        if !bad.is_empty() {
            // Damaged at the relay: ask the sender for exactly those
            // chunks (the good ones are on our disk).
            return self.request_repair(&d, &bad).await;
        }
        let what = format!("verify {}", d.name);
        let h = match verifier {
            // Read back while downloading: only the last range is left.
            Some(v) => v.finish(&what, d.size, bars.as_ref()),
            None => {
                bars.start(&what, d.size, 0);
                transfer::read_back(&part, &part_path, d.size, bars.as_ref())
            }
        }
        .map_err(|e| io_err("reading back", e))?;
        bars.finish();
        if h.as_bytes() != &d.plaintext_hash {
            if d.attempts >= 2 {
                return fail(
                    self,
                    stats,
                    "the stored copy does not read back as written, three times; check the disk"
                        .into(),
                );
            }
            tracing::error!(
                "receiving {}: the stored copy does not read back as written; downloading it again",
                d.name
            );
            self.agent.db.download_end(
                &d.key(),
                DownloadEnd::Restart,
                None,
                Some("read-back mismatch"),
                None,
                self.clock.now_ms(),
            )?;
            return Ok(());
        }
        // A file from a directory keeps its place in the tree, created
        // inside the download directory; no existing component may be a
        // symbolic link (which could lead outside it).
        let (target_dir, leaf) = match d.name.rsplit_once('/') {
            Some((parent, leaf)) => {
                if sealpost_proto::manifest::validate_file_path(&d.name).is_err() {
                    return fail(self, stats, "its path is not a safe relative path".into());
                }
                let mut at = dir.clone();
                for part in parent.split('/') {
                    at.push(part);
                    match std::fs::symlink_metadata(&at) {
                        Ok(m) if m.file_type().is_symlink() || !m.is_dir() => {
                            return fail(
                                self,
                                stats,
                                format!("{} exists and is not a plain directory", at.display()),
                            );
                        }
                        Ok(_) => {}
                        Err(_) => {
                            std::fs::create_dir(&at).map_err(|source| AgentError::Io {
                                what: "creating",
                                path: at.clone(),
                                source,
                            })?;
                            if let Some(p) = at.parent() {
                                crate::fsutil::sync_dir(p).map_err(|e| io_err("syncing", e))?;
                            }
                        }
                    }
                }
                (at, leaf.to_owned())
            }
            None => (dir.clone(), d.name.clone()),
        };
        let final_path = match transfer::place(&part_path, &target_dir, &leaf) {
            Ok(Some(p)) => p,
            Ok(None) => {
                return fail(
                    self,
                    stats,
                    format!(
                        "no free name for {} in {} ({} tried)",
                        leaf,
                        target_dir.display(),
                        transfer::MAX_NAME_TRIES
                    ),
                );
            }
            Err(e) => return Err(io_err("linking", e).into()),
        };
        std::fs::remove_file(&part_path).map_err(|e| io_err("removing", e))?;
        crate::fsutil::sync_dir(&target_dir).map_err(|e| io_err("syncing", e))?;
        crate::fsutil::sync_dir(&dir).map_err(|e| io_err("syncing", e))?;
        let receipt = d
            .relay
            .clone()
            .map(|relay| d.receipt(relay, self.clock.now_ms() / 1000));
        self.agent.db.download_end(
            &d.key(),
            DownloadEnd::Done,
            Some(&final_path.to_string_lossy()),
            None,
            receipt.as_ref(),
            self.clock.now_ms(),
        )?;
        stats.files_received += 1;
        let from = match self.agent.db.contact_by_key(&d.sender) {
            Ok(Some(c)) => c.name,
            _ => "a stranger".to_owned(),
        };
        tracing::info!(
            "file {} from {from} ({}), verified from disk: {}",
            d.name,
            bytesize::ByteSize(d.size).display().iec(),
            final_path.display()
        );
        // The relay may forget the blob once the receipt is out.
        self.blob_deletes.push(blob_id);
        Ok(())
    }
}
