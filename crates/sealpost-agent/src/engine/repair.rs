//! Repair of damaged chunks: asking a file's sender for them again, and answering such requests.

use super::*;

impl Engine {
    /// Asks the sender of a download for its damaged chunks.
    pub(super) async fn request_repair(
        &mut self,
        d: &crate::outbox::Download,
        bad: &[u64],
    ) -> Result<(), EngineError> {
        let mut chunks: Vec<u64> = bad.to_vec();
        chunks.sort_unstable();
        chunks.dedup();
        chunks.truncate(sealpost_proto::repair::MAX_CHUNKS);
        let list: Vec<String> = chunks.iter().take(20).map(|b| b.to_string()).collect();
        let why = format!(
            "{} chunk(s) failed authentication at the relay (damaged there): {}; asked the sender for them again",
            bad.len(),
            list.join(", ")
        );
        tracing::warn!("receiving {}: {why}", d.name);
        self.agent.db.download_state(
            &d.key(),
            DownloadState::Repairing,
            Some(&why),
            self.clock.now_ms(),
        )?;
        let (Ok(req), Ok(sender), Some(relay)) = (
            sealpost_proto::repair::RepairRequest::new(d.blob_id, chunks),
            PublicIdentity::from_bytes(&d.sender, &d.agreement),
            d.relay.clone(),
        ) else {
            return Ok(());
        };
        self.send_control(&sender, &relay, Kind::RepairRequest, &req.encode())
            .await?;
        Ok(())
    }

    /// A repair request (we sent the file) or offer (we receive it).
    pub(super) fn apply_repair(
        &mut self,
        m: &OpenedMessage,
        content: &[u8],
    ) -> Result<(), EngineError> {
        let signer = *m.header.sender.signing_bytes();
        match m.header.kind {
            Kind::RepairRequest => {
                let Ok(req) = sealpost_proto::repair::RepairRequest::decode(content) else {
                    tracing::warn!("discarded a malformed repair request");
                    return Ok(());
                };
                let Some((f, _)) = self.agent.db.file_out_by_blob(&req.blob_id, &signer)? else {
                    tracing::warn!(
                        "discarded a repair request for a file we did not send to its signer"
                    );
                    return Ok(());
                };
                let chunks = f.size.div_ceil(f.chunk_size.max(1) as u64).max(1);
                if req.chunks.iter().any(|&c| c >= chunks) {
                    tracing::warn!(
                        "discarded a repair request naming chunks the file does not have"
                    );
                    return Ok(());
                }
                tracing::info!(
                    "{} asks for {} chunk(s) of {} again",
                    self.agent.who(&m.header.sender),
                    req.chunks.len(),
                    f.path
                );
                self.agent.db.add_repair(&crate::outbox::RepairJob {
                    msg: f.msg,
                    recipient: signer,
                    request: content.to_vec(),
                })?;
            }
            Kind::Repair => {
                let Ok(offer) = sealpost_proto::repair::RepairOffer::decode(content) else {
                    tracing::warn!("discarded a malformed repair offer");
                    return Ok(());
                };
                let Some(d) = self.agent.db.download_by_blob(&offer.blob_id, &signer)? else {
                    tracing::warn!("discarded a repair offer for no download of ours");
                    return Ok(());
                };
                if d.state != DownloadState::Done {
                    self.agent
                        .db
                        .set_repair_offer(&d.key(), content, self.clock.now_ms())?;
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// Uploads the chunks recipients asked for again, as repair blobs, and
    /// tells them where they are.
    pub(super) async fn run_repairs(&mut self, stats: &mut PassStats) -> Result<(), EngineError> {
        for job in self.agent.db.repairs()? {
            let Ok(req) = sealpost_proto::repair::RepairRequest::decode(&job.request) else {
                self.agent.db.remove_repair(&job.msg, &job.recipient)?;
                continue;
            };
            let (Some(f), Some(contact)) = (
                self.agent.db.file_out(&job.msg)?,
                self.agent.db.contact_by_key(&job.recipient)?,
            ) else {
                self.agent.db.remove_repair(&job.msg, &job.recipient)?;
                continue;
            };
            let relay = self
                .agent
                .db
                .outbox(Some(&job.msg), 1)?
                .into_iter()
                .next()
                .and_then(|m| {
                    m.deliveries
                        .into_iter()
                        .find(|x| x.recipient == job.recipient)
                })
                .map(|x| x.relay);
            let (Some(relay), Ok(layout), Ok(src)) = (relay, f.layout(), File::open(&f.path))
            else {
                self.agent.db.remove_repair(&job.msg, &job.recipient)?;
                continue;
            };
            let Ok((len, hash)) =
                crate::transfer::repair_summary(&src, &f.key.cipher(), &layout, &req.chunks)
            else {
                self.agent.db.remove_repair(&job.msg, &job.recipient)?;
                continue;
            };
            let repair_id = sealpost_proto::manifest::BlobId::random(&mut OsRng);
            let mailbox = MailboxId::of(&job.recipient);
            let expires = self.clock.now_ms() / 1000 + REPORT_LIFETIME_SECS;
            // With forwarding on, through the home relay, as the file went.
            let route = if self.forwards_to(&relay) {
                next_hop(&relay)
            } else {
                None
            };
            let link = match route {
                Some(_) => Some(&mut self.home),
                None => link_for(&mut self.home, &mut self.links, &self.home_addr, &relay),
            };
            let Some(link) = link else {
                self.agent.db.remove_repair(&job.msg, &job.recipient)?;
                continue;
            };
            let mut off = 0u64;
            let mut ok = true;
            let cipher = f.key.cipher();
            while off < len {
                let piece = match crate::transfer::repair_range(
                    &src,
                    &cipher,
                    &layout,
                    &req.chunks,
                    off,
                    sealpost_proto::relay::MAX_BLOB_PIECE,
                ) {
                    Ok(p) if !p.is_empty() => p,
                    _ => {
                        ok = false;
                        break;
                    }
                };
                let n = piece.len() as u64;
                let at = off;
                let put = BlobPiece {
                    blob_id: repair_id,
                    mailbox,
                    total_len: len,
                    // Stated by the last piece (§6.6).
                    blob_hash: if at + n == len {
                        *hash.as_bytes()
                    } else {
                        [0; 32]
                    },
                    expires_at: expires,
                    offset: at,
                    data: piece,
                };
                let r = link
                    .call(&self.agent.identity, async |c| {
                        let p = c.blob_piece_send(route.as_ref(), put.clone()).await;
                        c.blob_put_answer(p).await
                    })
                    .await;
                match r {
                    Ok(Ok((stored, _))) if stored == at + n => {
                        stats.upload_bytes += n;
                        off = stored;
                    }
                    other => {
                        if matches!(other, Err(ClientError::ForgedRefusal(_))) {
                            self.found
                                .push((Caught::ForgedRefusal, format!("blob:{}", repair_id)));
                        }
                        ok = false;
                        break;
                    }
                }
            }
            if !ok {
                tracing::warn!("uploading a repair of {}: failed; will retry", f.path);
                continue;
            }
            let offer = sealpost_proto::repair::RepairOffer {
                blob_id: f.blob_id,
                repair_blob_id: repair_id,
                repair_len: len,
                repair_hash: *hash.as_bytes(),
                chunks: req.chunks.clone(),
            };
            if self
                .send_control(contact.card.public(), &relay, Kind::Repair, &offer.encode())
                .await?
                == Control::Accepted
            {
                tracing::info!("re-sent {} chunk(s) of {}", req.chunks.len(), f.path);
                self.agent.db.remove_repair(&job.msg, &job.recipient)?;
            }
        }
        Ok(())
    }
}
