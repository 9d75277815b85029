//! Uploading a file's encrypted blob to a recipient's relay, resuming where the relay stands.

use super::*;

/// How an upload attempt ended.
#[derive(Debug)]
pub(super) enum Upload {
    Complete,
    /// The relay holds at least what was asked for, not all yet.
    Enough,
    Retry(String),
    Refused(String, String),
    Failed(String, String),
}

impl Engine {
    /// Uploads a file's blob to the recipient's relay, from what the relay
    /// already holds, until it holds it whole — or, with forwarding on, to
    /// the home relay, which forwards it (§6.8); a home relay that does not
    /// forward makes it go to the recipient's relay at once.
    pub(super) async fn upload(
        &mut self,
        row: &crate::outbox::DeliveryRow,
        f: &crate::outbox::FileOut,
        stats: &mut PassStats,
        until: u64,
    ) -> Result<Upload, EngineError> {
        let forwarding = self.forwards_to(&row.relay);
        let r = self.upload_on(row, f, stats, until).await?;
        if forwarding && !self.home_forwards {
            // The home relay said it does not forward: directly now.
            return self.upload_on(row, f, stats, until).await;
        }
        Ok(r)
    }

    /// [`Engine::upload`] on the route of now: the home relay forwarding
    /// (the next relay is `Some`), or the recipient's relay.
    async fn upload_on(
        &mut self,
        row: &crate::outbox::DeliveryRow,
        f: &crate::outbox::FileOut,
        stats: &mut PassStats,
        until: u64,
    ) -> Result<Upload, EngineError> {
        let route = if self.forwards_to(&row.relay) {
            next_hop(&row.relay)
        } else {
            None
        };
        let layout = match f.layout() {
            Ok(l) => l,
            Err(e) => return Ok(Upload::Failed("bad-file".into(), e.to_string())),
        };
        let total = layout.blob_len();
        // What the relay of this route held at the last call (the row may
        // be older than this pass's first upload call).
        let uploaded = match route {
            Some(_) => self.agent.db.uploaded(&row.msg, &row.recipient)?,
            None => 0,
        };
        if route.is_some() && uploaded >= total {
            // Whole at the home relay, which forwards it: not uploaded
            // again (it lets its copy go once the next relay holds it).
            return Ok(Upload::Complete);
        }
        let cipher = f.key.cipher();
        let src = match File::open(&f.path) {
            Ok(s) => s,
            Err(e) => {
                return Ok(Upload::Failed(
                    "source-unreadable".into(),
                    format!("cannot read {}: {e}", f.path),
                ))
            }
        };
        if src.metadata().map(|m| m.len()).ok() != Some(f.size) {
            return Ok(Upload::Failed(
                "source-changed".into(),
                format!("{} changed size after it was queued; send it again", f.path),
            ));
        }
        let mailbox = MailboxId::of(&row.recipient);
        let expires = row.delivery.expires_at / 1000;
        let progress = crate::transfer::FileBytes::new(self.progress.clone(), layout);
        let link = match route {
            Some(_) => Some(&mut self.home),
            None => link_for(&mut self.home, &mut self.links, &self.home_addr, &row.relay),
        };
        let Some(link) = link else {
            return Ok(Upload::Failed(
                "bad-relay".into(),
                format!("{:?} is not a relay address", row.relay),
            ));
        };
        let me = &self.agent.identity;
        let blob_id = f.blob_id;
        // The recipient's blob at its relay (a blob is named by its id
        // within a mailbox); at the home relay, which forwards it, the
        // sender's own (§6.6, §6.8).
        let status_of = match route {
            Some(_) => None,
            None => Some(mailbox),
        };
        let (mut stored, mut complete) = match link
            .call(me, async |c| c.blob_status_of(blob_id, status_of).await)
            .await
        {
            Ok(v) => v,
            Err(e) => return Ok(Upload::Retry(e.to_string())),
        };
        if let (Some(next), 0, true) = (&route, uploaded, stored > 0) {
            // The home relay holds this blob for another recipient: its
            // first piece, sent again, queues it for this one too (§6.8);
            // the relay answers with the length it holds.
            let mut first = crate::transfer::UploadHashes::default();
            let n = crate::transfer::piece_len(&layout, 0);
            let data = match first.seal_next(&src, &cipher, &layout, n) {
                Ok(d) => d,
                Err(e) => {
                    return Ok(Upload::Failed(
                        "source-changed".into(),
                        format!("{}: {e}", f.path),
                    ))
                }
            };
            let blob_hash = if n as u64 == total {
                *first.finish().1.as_bytes()
            } else {
                [0; 32]
            };
            let piece = BlobPiece {
                blob_id,
                mailbox,
                total_len: total,
                blob_hash,
                expires_at: expires,
                offset: 0,
                data,
            };
            let answer = link
                .call(me, async |c| {
                    let p = c.blob_piece_send(Some(next), piece.clone()).await;
                    c.blob_put_answer(p).await
                })
                .await;
            match answer {
                Ok(Ok(_)) => {}
                Ok(Err(Submitted::Refused(r))) if r.code == RefusalCode::NotForwarded => {
                    self.home_does_not_forward();
                    return Ok(Upload::Retry("your relay does not forward".into()));
                }
                Ok(Err(_)) | Err(_) => {}
            }
            (stored, complete) = match link
                .call(me, async |c| c.blob_status_of(blob_id, status_of).await)
                .await
            {
                Ok(v) => v,
                Err(e) => return Ok(Upload::Retry(e.to_string())),
            };
        }
        if complete {
            if route.is_some() {
                self.agent
                    .db
                    .set_uploaded(&row.msg, &row.recipient, total)?;
            }
            return Ok(Upload::Complete);
        }
        let name = std::path::Path::new(&f.path)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        progress.start(&format!("upload {name} → {}", row.name), total, stored);
        let mut stalls = 0;
        let mut reconnects = 0;
        let mut not_forwarded = false;
        let mut noted = stored;
        // The blob's and the file's hashes over the pieces sealed so far
        // (kept from the last call for this upload, which ended where the
        // relay's length now is), and copies of them at the end of each
        // piece still unanswered, to go on from whichever length the
        // relay holds after a lost connection.
        let key = (row.msg, row.recipient);
        let mut hashes = self
            .upload_hashes
            .iter()
            .position(|(k, _)| *k == key)
            .map(|i| self.upload_hashes.remove(i).1)
            .unwrap_or_default();
        let mut marks: std::collections::VecDeque<crate::transfer::UploadHashes> =
            std::collections::VecDeque::with_capacity(PIECE_WINDOW + 1);
        let result = loop {
            if complete {
                break Upload::Complete;
            }
            if stored >= until {
                break Upload::Enough;
            }
            if hashes.at() != stored {
                match marks.iter().find(|m| m.at() == stored) {
                    Some(m) => hashes = m.clone(),
                    // A restarted sender resuming an upload: hash what the
                    // relay holds (re-encrypting it, sending nothing).
                    None => {
                        if let Err(e) = hashes.catch_up(&src, &cipher, &layout, stored) {
                            break Upload::Failed(
                                "source-changed".into(),
                                format!("{}: {e}", f.path),
                            );
                        }
                    }
                }
            }
            marks.clear();
            marks.push_back(hashes.clone());
            // A sliding window of consecutive pieces: up to PIECE_WINDOW
            // are in flight (the relay stores them in order) while the
            // next one is read and encrypted.
            let before = stored;
            let client = match link.client(me).await {
                Ok(c) => c,
                Err(e) => {
                    link.disconnect();
                    break Upload::Retry(e.to_string());
                }
            };
            let mut in_flight = std::collections::VecDeque::with_capacity(PIECE_WINDOW);
            let mut at = stored;
            let mut outcome = None;
            let mut lost = None;
            loop {
                while in_flight.len() < PIECE_WINDOW && at < total && at < until {
                    let n = crate::transfer::piece_len(&layout, at);
                    if n == 0 {
                        break;
                    }
                    let data = match hashes.seal_next(&src, &cipher, &layout, n) {
                        Ok(d) => d,
                        Err(e) => {
                            outcome = Some(Upload::Failed(
                                "source-changed".into(),
                                format!("{}: {e}", f.path),
                            ));
                            break;
                        }
                    };
                    // The last piece states the blob's hash, once the file
                    // proved to be the one that was queued.
                    let mut blob_hash = [0u8; 32];
                    if at + n as u64 == total {
                        let (file_hash, blob) = hashes.finish();
                        if file_hash.as_bytes() != &f.plaintext_hash {
                            sealpost_proto::buffers::give(data);
                            outcome = Some(Upload::Failed(
                                "source-changed".into(),
                                format!("{} changed since it was queued; send it again", f.path),
                            ));
                            break;
                        }
                        blob_hash = *blob.as_bytes();
                    }
                    if marks.len() > PIECE_WINDOW {
                        marks.pop_front();
                    }
                    marks.push_back(hashes.clone());
                    stats.upload_bytes += n as u64;
                    let piece = BlobPiece {
                        blob_id,
                        mailbox,
                        total_len: total,
                        blob_hash,
                        expires_at: expires,
                        offset: at,
                        data,
                    };
                    let p = client.blob_piece_send(route.as_ref(), piece).await;
                    in_flight.push_back((at + n as u64, p));
                    at += n as u64;
                }
                if outcome.is_some() {
                    break;
                }
                let Some((end, p)) = in_flight.pop_front() else {
                    break;
                };
                match client.blob_put_answer(p).await {
                    Ok(Ok((now_stored, done))) => {
                        if now_stored > stored {
                            progress.advance(now_stored - stored);
                        }
                        stored = now_stored;
                        complete = done;
                        if complete {
                            break;
                        }
                        if stored != end {
                            // The relay holds another length than this
                            // piece's end (another upload of the same blob,
                            // or a lost piece): resume from its length.
                            break;
                        }
                    }
                    Ok(Err(Submitted::Refused(r)))
                        if route.is_some() && r.code == RefusalCode::NotForwarded =>
                    {
                        not_forwarded = true;
                        outcome = Some(Upload::Retry("your relay does not forward".into()));
                        break;
                    }
                    Err(ClientError::Server {
                        code: ErrorCode::BadRequest,
                        ..
                    }) if route.is_some() => {
                        // A home relay that predates forwarding.
                        not_forwarded = true;
                        link.disconnect();
                        outcome = Some(Upload::Retry("your relay does not forward".into()));
                        break;
                    }
                    Ok(Err(Submitted::Refused(r))) if !r.code.is_lasting() => {
                        outcome = Some(Upload::Retry(format!(
                            "{} (trying again until the message expires)",
                            r.code.describe()
                        )));
                        break;
                    }
                    Ok(Err(Submitted::Refused(r))) => {
                        let limits = if r.code == RefusalCode::TooLarge {
                            client.limits().await.ok().flatten()
                        } else {
                            None
                        };
                        outcome = Some(Upload::Refused(
                            r.code.name().to_owned(),
                            refusal_words(r.code, total, limits.map(|l| l.max_blob)),
                        ));
                        break;
                    }
                    Ok(Err(Submitted::Accepted { .. })) => {
                        outcome = Some(Upload::Retry("unexpected answer".into()));
                        break;
                    }
                    Err(ClientError::Server {
                        code: ErrorCode::BlobHashMismatch,
                        message,
                    }) => {
                        // The relay says the blob does not match the hash
                        // the last piece stated. That hash was computed
                        // over exactly the bytes sent, in order, and the
                        // file's bytes matched the queued hash: the relay
                        // stored something else (or says so falsely). It
                        // discarded the blob; the next attempt starts over.
                        self.found
                            .push((Caught::FalseHashMismatch, format!("blob:{}", blob_id)));
                        outcome = Some(Upload::Retry(format!(
                            "the relay claims the blob does not match its hash, which was computed over the bytes sent: {message}"
                        )));
                        break;
                    }
                    Err(e @ ClientError::ForgedRefusal(_)) => {
                        self.found
                            .push((Caught::ForgedRefusal, format!("blob:{}", blob_id)));
                        outcome = Some(Upload::Retry(e.to_string()));
                        break;
                    }
                    Err(e) => {
                        lost = Some(e.to_string());
                        break;
                    }
                }
                if stored - noted >= 64 << 20 {
                    self.agent
                        .db
                        .set_uploaded(&row.msg, &row.recipient, stored)?;
                    noted = stored;
                }
            }
            if let Some(o) = outcome {
                break o;
            }
            if let Some(e) = lost {
                // The connection failed (a relay restart, a network cut):
                // reconnect (with backoff) and go on from the relay's
                // durable length, a few times, before leaving it to the
                // next pass.
                link.disconnect();
                reconnects += 1;
                if reconnects > MAX_UPLOAD_RECONNECTS {
                    break Upload::Retry(e);
                }
                match link
                    .call(me, async |c| c.blob_status_of(blob_id, status_of).await)
                    .await
                {
                    Ok((s, c)) => {
                        if s > stored {
                            progress.advance(s - stored);
                        }
                        (stored, complete) = (s, c);
                        continue;
                    }
                    Err(e) => break Upload::Retry(e.to_string()),
                }
            }
            if stored <= before && !complete {
                stalls += 1;
                if stalls > 3 {
                    break Upload::Retry("the relay does not take the blob's pieces".into());
                }
            } else {
                stalls = 0;
            }
        };
        progress.finish();
        if not_forwarded {
            self.home_does_not_forward();
        }
        if matches!(result, Upload::Enough | Upload::Retry(_)) {
            // The rest of the upload (the next call, right after the
            // manifest went out, or a later attempt) goes on from here.
            if self.upload_hashes.len() >= KEPT_UPLOAD_HASHES {
                self.upload_hashes.remove(0);
            }
            self.upload_hashes.push((key, hashes));
        }
        let link_stored = if matches!(result, Upload::Complete) {
            total
        } else {
            stored
        };
        self.agent
            .db
            .set_uploaded(&row.msg, &row.recipient, link_stored)?;
        Ok(result)
    }
}
