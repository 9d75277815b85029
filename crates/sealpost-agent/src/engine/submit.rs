//! Submitting due outbox deliveries to their recipients' relays, pipelined, and recording what each relay answered.

use super::*;

/// The route of deliveries handed to the home relay to forward (not a
/// relay address: those never start with `(`).
const FORWARDED: &str = "(forwarded by the home relay)";

impl Engine {
    /// Hands deliveries `idxs` of `due` to the home relay as `Forward`s
    /// (PROTOCOL 6.8), pipelined, and records what it answered: accepted
    /// (state `forwarding`, retransmitted on the usual timer until a
    /// receipt), refused (signed by the home relay), or not reached.
    async fn forward_round(
        &mut self,
        due: &[crate::outbox::DeliveryRow],
        idxs: &[usize],
        sealed: &HashMap<MessageId, Vec<u8>>,
        stats: &mut PassStats,
        updates: &mut Vec<(
            MessageId,
            [u8; 32],
            sealpost_proto::delivery::Delivery,
            Option<String>,
        )>,
    ) {
        let mut items = Vec::with_capacity(idxs.len());
        let mut routes = Vec::with_capacity(idxs.len());
        for &i in idxs {
            let d = &due[i];
            let next = next_hop(&d.relay);
            let payload = sealed.get(&d.msg).cloned().unwrap_or_default();
            routes.push(next.is_some());
            if let Some(next) = next {
                items.push(sealpost_proto::relay::Forward {
                    hops: 0,
                    next,
                    mailbox: MailboxId::of(&d.recipient),
                    expires_at: d.delivery.expires_at / 1000,
                    payload_hash: *blake3::hash(&payload).as_bytes(),
                    payload,
                });
            }
        }
        let sent = items.len();
        let r = self
            .home
            .call(&self.agent.identity, async |c| {
                Ok(c.forward_many(items.clone()).await)
            })
            .await;
        let answers = match r {
            Ok(a) => {
                if a.iter()
                    .any(|x| matches!(x, Err(ClientError::Closed | ClientError::Io(_))))
                {
                    self.home.disconnect();
                }
                a
            }
            Err(e) => {
                self.home.disconnect();
                let msg = e.to_string();
                (0..sent)
                    .map(|_| Err(ClientError::Io(std::io::Error::other(msg.clone()))))
                    .collect()
            }
        };
        if answers.iter().any(refuses_forwarding) {
            self.home_does_not_forward();
        }
        let mut answers = answers.into_iter();
        let now = self.clock.now_ms();
        for (k, &i) in idxs.iter().enumerate() {
            let row = &due[i];
            let mut d = row.delivery.clone();
            let mut last_error = None;
            if !routes[k] {
                d.local_failure(
                    now,
                    "bad-relay",
                    &format!("the recipient's relay address {} does not parse", row.relay),
                );
                updates.push((row.msg, row.recipient, d, None));
                continue;
            }
            let answer = answers.next();
            if answer.as_ref().is_some_and(refuses_forwarding)
                || (!self.home_forwards && answer.as_ref().is_some_and(|a| a.is_err()))
            {
                // Submitted directly in the next round of this pass.
                last_error = Some("your relay does not forward; sending directly".into());
                updates.push((row.msg, row.recipient, d, last_error));
                continue;
            }
            match answer {
                Some(Ok(Submitted::Accepted { .. })) => {
                    d.forwarded(now, &self.timing, self.clock.unit_random());
                    stats.forwarded += 1;
                }
                Some(Ok(Submitted::Refused(r))) if !r.code.is_lasting() => {
                    d.transient_failure(now, &self.timing, self.clock.unit_random());
                    let why = format!(
                        "your relay: {} (trying again until the message expires)",
                        r.code.describe()
                    );
                    last_error = Some(why);
                    stats.submit_errors += 1;
                }
                Some(Ok(Submitted::Refused(r))) => {
                    d.refused(
                        now,
                        r.code.name(),
                        &format!("your relay (forwarding): {}", r.code.describe()),
                    );
                    stats.refused += 1;
                }
                Some(Err(e)) => {
                    d.transient_failure(now, &self.timing, self.clock.unit_random());
                    last_error = Some(format!("your relay: {e}"));
                    stats.submit_errors += 1;
                }
                None => {
                    d.transient_failure(now, &self.timing, self.clock.unit_random());
                    last_error = Some("cannot reach your relay".into());
                    stats.submit_errors += 1;
                }
            }
            updates.push((row.msg, row.recipient, d, last_error));
        }
    }

    /// Asks the home relay which forwarded deliveries still wait in its
    /// queue (and why) and records it for `status` (§6.8): "waiting at
    /// your relay" or "handed on toward the recipient's relay" (to it, or
    /// to the gateway the home relay forwards through). At most every
    /// 5 s and 512 deliveries per pass; the relay's word only (relays are
    /// trusted for availability), the receipt stays the proof.
    pub(super) async fn refresh_hops(&mut self) -> Result<(), EngineError> {
        let now = self.clock.now_ms();
        if !self.forward
            || self.hops_at == u64::MAX
            || now.saturating_sub(self.hops_at) < self.hops_every_ms
        {
            return Ok(());
        }
        self.hops_at = now;
        let rows = self
            .agent
            .db
            .forwarding(sealpost_proto::relay::MAX_FORWARD_STATUS)?;
        if rows.is_empty() {
            return Ok(());
        }
        let mut items = Vec::with_capacity(rows.len());
        for r in &rows {
            let sealed = self.agent.db.sealed(&r.msg)?.unwrap_or_default();
            items.push((
                MailboxId::of(&r.recipient),
                *blake3::hash(&sealed).as_bytes(),
            ));
        }
        let answers = match self
            .home
            .call(&self.agent.identity, async |c| {
                c.forward_status(items.clone()).await
            })
            .await
        {
            Ok(a) => a,
            Err(ClientError::Server {
                code: ErrorCode::BadRequest,
                ..
            }) => {
                // A relay that predates the question: not asked again.
                self.hops_at = u64::MAX;
                self.home.disconnect();
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        };
        let hops: Vec<(MessageId, [u8; 32], String)> = rows
            .iter()
            .zip(answers)
            .map(|(r, a)| {
                let next = RelayAddress::parse(&r.relay)
                    .map(|a| a.host_port)
                    .unwrap_or_else(|| r.relay.clone());
                let hop = match a {
                    // Not in the home relay's queue: handed to the next
                    // relay, which is the recipient's or, when the home
                    // relay forwards through a gateway, the gateway.
                    None => format!(
                        "handed on by your relay toward {}'s relay ({next}), your relay says",
                        r.name
                    ),
                    Some(w) => match w.error {
                        Some(e) => format!(
                            "waiting at your relay: it could not hand it to {next} yet ({} attempt{}; last: {e})",
                            w.attempts,
                            if w.attempts == 1 { "" } else { "s" }
                        ),
                        None => format!("waiting at your relay, which hands it to {next}"),
                    },
                };
                (r.msg, r.recipient, hop)
            })
            .collect();
        self.agent.db.set_hops(&hops)?;
        Ok(())
    }

    pub(super) async fn submit_due(&mut self, stats: &mut PassStats) -> Result<(), EngineError> {
        // Bounded: a pass submits at most this many rounds.
        for _ in 0..64 {
            let now = self.clock.now_ms();
            let due = self.agent.db.due(now, SUBMIT_BATCH)?;
            if due.is_empty() {
                return Ok(());
            }
            let mut sealed: HashMap<MessageId, Vec<u8>> = HashMap::new();
            let mut by_relay: HashMap<String, Vec<usize>> = HashMap::new();
            let mut bytes = 0usize;
            let mut take = 0usize;
            let mut updates = Vec::with_capacity(due.len());
            let mut streaming: Vec<usize> = Vec::new();
            for (i, d) in due.iter().enumerate() {
                // A file's manifest goes out only once its blob is whole at
                // the recipient's relay.
                let file = self.agent.db.file_out(&d.msg)?;
                let is_file = file.is_some();
                if let Some(f) = file {
                    let now = self.clock.now_ms();
                    let mut del = d.delivery.clone();
                    // The manifest goes out once the first window is at the
                    // relay, so the recipient downloads while the rest
                    // streams in (finished after the batch, below).
                    let head = (PIECE_WINDOW * sealpost_proto::relay::MAX_BLOB_PIECE) as u64;
                    match self.upload(d, &f, stats, head).await? {
                        Upload::Complete => {}
                        Upload::Enough => streaming.push(i),
                        Upload::Retry(e) => {
                            tracing::warn!("uploading {} to {}: {e}; will retry", f.path, d.name);
                            del.transient_failure(now, &self.timing, self.clock.unit_random());
                            stats.submit_errors += 1;
                            updates.push((d.msg, d.recipient, del, Some(e)));
                            take = i + 1;
                            continue;
                        }
                        Upload::Refused(code, detail) => {
                            tracing::warn!("uploading {} to {}: refused: {detail}", f.path, d.name);
                            del.refused(now, &code, &detail);
                            stats.refused += 1;
                            updates.push((d.msg, d.recipient, del, None));
                            take = i + 1;
                            continue;
                        }
                        Upload::Failed(code, detail) => {
                            tracing::warn!("sending {} to {}: {detail}", f.path, d.name);
                            del.local_failure(now, &code, &detail);
                            updates.push((d.msg, d.recipient, del, None));
                            take = i + 1;
                            continue;
                        }
                    }
                }
                if let std::collections::hash_map::Entry::Vacant(v) = sealed.entry(d.msg) {
                    let s = self.agent.db.sealed(&d.msg)?.unwrap_or_default();
                    bytes += s.len();
                    v.insert(s);
                }
                // Through the home relay, which forwards it, when
                // forwarding is on and the recipient is elsewhere (a
                // file's manifest always: its blob went the same way; a
                // message's retransmissions alternate with direct ones).
                let route = if self.forwards_to(&d.relay) && (is_file || d.delivery.forward_turn())
                {
                    FORWARDED.to_owned()
                } else {
                    d.relay.clone()
                };
                by_relay.entry(route).or_default().push(i);
                take = i + 1;
                if bytes >= SUBMIT_BATCH_BYTES {
                    break;
                }
            }
            // Relays that took something in this round: what waits for
            // them after a failure is tried again now, not after its
            // backoff (a relay that came back is used at once).
            let mut reachable: Vec<String> = Vec::new();
            let mut again = false;
            for (relay, idxs) in by_relay {
                if relay == FORWARDED {
                    let before = self.home_forwards;
                    self.forward_round(&due, &idxs, &sealed, stats, &mut updates)
                        .await;
                    // The home relay said it does not forward: what it
                    // refused goes directly in another round.
                    again |= before && !self.home_forwards;
                    continue;
                }
                let items: Vec<(MailboxId, u64, Vec<u8>)> = idxs
                    .iter()
                    .map(|&i| {
                        let d = &due[i];
                        (
                            MailboxId::of(&d.recipient),
                            d.delivery.expires_at / 1000,
                            sealed.get(&d.msg).cloned().unwrap_or_default(),
                        )
                    })
                    .collect();
                let answers =
                    match link_for(&mut self.home, &mut self.links, &self.home_addr, &relay) {
                        None => Vec::new(),
                        Some(link) => {
                            let r = link
                                .call(&self.agent.identity, async |c| {
                                    Ok(c.submit_many(items.clone()).await)
                                })
                                .await;
                            match r {
                                Ok(a) => {
                                    if a.iter().any(|x| {
                                        matches!(x, Err(ClientError::Closed | ClientError::Io(_)))
                                    }) {
                                        link.disconnect();
                                    }
                                    a
                                }
                                Err(e) => {
                                    link.disconnect();
                                    let msg = e.to_string();
                                    idxs.iter()
                                        .map(|_| {
                                            Err(ClientError::Io(std::io::Error::other(msg.clone())))
                                        })
                                        .collect()
                                }
                            }
                        }
                    };
                let now = self.clock.now_ms();
                for (k, &i) in idxs.iter().enumerate() {
                    let row = &due[i];
                    let mut d = row.delivery.clone();
                    let mut last_error = None;
                    match answers.get(k) {
                        Some(Ok(Submitted::Accepted { .. })) => {
                            d.accepted(now, &self.timing, self.clock.unit_random());
                            stats.submitted += 1;
                            if !reachable.contains(&relay) {
                                reachable.push(relay.clone());
                            }
                        }
                        Some(Ok(Submitted::Refused(r))) if !r.code.is_lasting() => {
                            d.transient_failure(now, &self.timing, self.clock.unit_random());
                            let why = format!(
                                "relay {relay}: {} (trying again until the message expires)",
                                r.code.describe()
                            );
                            tracing::warn!("message {} to {}: {why}", row.msg, row.name);
                            last_error = Some(why);
                            stats.submit_errors += 1;
                        }
                        Some(Ok(Submitted::Refused(r))) => {
                            d.refused(now, r.code.name(), r.code.describe());
                            stats.refused += 1;
                            tracing::warn!(
                                "message {} to {}: refused by relay {}: {}",
                                row.msg,
                                row.name,
                                relay,
                                r.code.describe()
                            );
                        }
                        Some(Err(e)) => {
                            if let ClientError::ForgedRefusal(why) = &e {
                                tracing::warn!("relay {relay}: {why}: forged, ignored");
                                if let Some((_, _, p)) = items.get(k) {
                                    self.found.push((
                                        Caught::ForgedRefusal,
                                        blake3::hash(p).to_hex().to_string(),
                                    ));
                                }
                            }
                            d.transient_failure(now, &self.timing, self.clock.unit_random());
                            last_error = Some(e.to_string());
                            stats.submit_errors += 1;
                        }
                        None => {
                            d.transient_failure(now, &self.timing, self.clock.unit_random());
                            last_error = Some(format!("cannot reach relay {relay}"));
                            stats.submit_errors += 1;
                        }
                    }
                    updates.push((row.msg, row.recipient, d, last_error));
                }
            }
            tracing::trace!("submit: {} answered", updates.len());
            // Files whose manifest went out with their blob still
            // streaming: if this process dies now, resume within seconds,
            // not at the retransmission time.
            let mut finish = Vec::new();
            for u in updates.iter_mut() {
                if let Some(&i) = streaming
                    .iter()
                    .find(|&&i| due[i].msg == u.0 && due[i].recipient == u.1)
                {
                    if matches!(
                        u.2.state,
                        sealpost_proto::delivery::State::Submitted
                            | sealpost_proto::delivery::State::Forwarding
                    ) {
                        finish.push((i, u.2.next_at));
                        u.2.next_at = self.clock.now_ms() + 10_000;
                    }
                }
            }
            self.agent.db.save_deliveries(&updates)?;
            for relay in &reachable {
                let n = self.agent.db.relay_reachable(relay, self.clock.now_ms())?;
                if n > 0 {
                    tracing::info!("relay {relay} takes messages again: {n} waiting for it go now");
                }
            }
            tracing::trace!("submit: saved");
            for (i, next_at) in finish {
                let d = &due[i];
                let Some(f) = self.agent.db.file_out(&d.msg)? else {
                    continue;
                };
                let mut del = self
                    .agent
                    .db
                    .outbox(Some(&d.msg), 1)?
                    .into_iter()
                    .next()
                    .and_then(|m| {
                        m.deliveries
                            .into_iter()
                            .find(|x| x.recipient == d.recipient)
                    })
                    .map(|x| x.delivery)
                    .unwrap_or_else(|| d.delivery.clone());
                let now = self.clock.now_ms();
                let err = match self.upload(d, &f, stats, u64::MAX).await? {
                    Upload::Complete | Upload::Enough => {
                        del.next_at = next_at;
                        None
                    }
                    Upload::Retry(e) => {
                        tracing::warn!("uploading {} to {}: {e}; will retry", f.path, d.name);
                        del.transient_failure(now, &self.timing, self.clock.unit_random());
                        Some(e)
                    }
                    Upload::Refused(code, detail) => {
                        del.refused(now, &code, &detail);
                        None
                    }
                    Upload::Failed(code, detail) => {
                        del.local_failure(now, &code, &detail);
                        None
                    }
                };
                self.agent
                    .db
                    .save_deliveries(&[(d.msg, d.recipient, del, err)])?;
            }
            if again || take < due.len() || due.len() == SUBMIT_BATCH {
                continue;
            }
            return Ok(());
        }
        Ok(())
    }
}
