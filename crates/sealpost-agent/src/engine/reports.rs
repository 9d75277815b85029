//! Receipts and rejections this agent owes, and other control messages, sent to the relays they go to.

use super::*;

/// What became of a control message (report, repair request or offer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Control {
    Accepted,
    /// Refused for good (signed refusal, or not a relay address).
    Refused,
    /// Not delivered this time (connection); try again later.
    Failed,
}

impl Engine {
    pub(super) async fn send_reports(&mut self, stats: &mut PassStats) -> Result<(), EngineError> {
        let pending = self.agent.db.pending_reports(REPORT_BATCH)?;
        if pending.is_empty() {
            return Ok(());
        }
        let now_s = self.clock.now_ms() / 1000;
        for (group, entries) in PendingReport::group(pending) {
            let done: Vec<([u8; 32], MessageId)> =
                group.ids.iter().map(|id| (group.subject, *id)).collect();
            let Ok(subject) = PublicIdentity::from_bytes(&group.subject, &group.agreement) else {
                self.agent.db.remove_pending_reports(&done)?;
                continue;
            };
            let kind = match entries {
                Entries::Receipt(_) => Kind::Receipt,
                Entries::Rejection(_) => Kind::Rejection,
            };
            let report = Report::sign(&self.agent.identity, &subject, now_s, entries)
                .map_err(AgentError::from)?;
            match self
                .send_control(&subject, &group.relay, kind, report.as_bytes())
                .await?
            {
                Control::Accepted => {
                    stats.reports_sent += 1;
                    self.agent.db.remove_pending_reports(&done)?;
                }
                // A report the relay will never take (unknown mailbox, not
                // a relay address): forget it, the sender retransmits.
                Control::Refused => self.agent.db.remove_pending_reports(&done)?,
                Control::Failed => {}
            }
        }
        Ok(())
    }

    /// Seals `content` as a message of `kind` to `to` and submits it to
    /// `relay`. For messages that are not tracked as deliveries (reports,
    /// repairs): a lost one is asked for, or answered, again.
    pub(super) async fn send_control(
        &mut self,
        to: &PublicIdentity,
        relay: &str,
        kind: Kind,
        content: &[u8],
    ) -> Result<Control, EngineError> {
        let now = self.clock.now_ms();
        let now_s = now / 1000;
        let pin = pin_of(&self.home_addr);
        let recipients = [*to];
        let req = SealRequest {
            kind,
            id: MessageId::time_ordered(now, &mut OsRng),
            created_at: now_s,
            expires_at: now_s + REPORT_LIFETIME_SECS,
            in_reply_to: None,
            recipients: &recipients,
            reply_relay: Some(&pin),
            pad_for_len: Some(content.len() as u64),
        };
        let mut sealed = std::io::Cursor::new(Vec::new());
        message::seal_stream(&self.agent.identity, &req, content, &mut sealed).map_err(|e| {
            AgentError::Io {
                what: "sealing a control message",
                path: PathBuf::new(),
                source: std::io::Error::other(e.to_string()),
            }
        })?;
        let payload = sealed.into_inner();
        let mailbox = MailboxId::of(to.signing_bytes());
        let expires = now_s + REPORT_LIFETIME_SECS;
        // Forwarding on, and the relay is another: through the home relay
        // (PROTOCOL 6.8), as messages go.
        let forward_to = if self.forwards_to(relay) {
            next_hop(relay)
        } else {
            None
        };
        if let Some(next) = forward_to {
            let item = sealpost_proto::relay::Forward {
                hops: 0,
                next,
                mailbox,
                expires_at: expires,
                payload_hash: *blake3::hash(&payload).as_bytes(),
                payload: payload.clone(),
            };
            let r = self
                .home
                .call(&self.agent.identity, async |c| {
                    c.forward_many(vec![item.clone()])
                        .await
                        .pop()
                        .unwrap_or(Err(ClientError::Closed))
                })
                .await;
            if refuses_forwarding(&r) {
                // Sent directly below instead.
                self.home_does_not_forward();
            } else {
                return Ok(match r {
                    Ok(Submitted::Accepted { .. }) => Control::Accepted,
                    Ok(Submitted::Refused(rf)) if rf.code.is_lasting() => {
                        tracing::warn!(
                            "your relay refused to forward a {}: {}",
                            kind.name(),
                            rf.code.describe()
                        );
                        Control::Refused
                    }
                    Ok(Submitted::Refused(_)) => Control::Failed,
                    Err(e) => {
                        tracing::warn!(
                            "handing a {} to your relay for {relay}: {e}; will retry",
                            kind.name()
                        );
                        Control::Failed
                    }
                });
            }
        }
        let Some(link) = link_for(&mut self.home, &mut self.links, &self.home_addr, relay) else {
            tracing::warn!(
                "cannot send a {} to {relay:?}: not a relay address",
                kind.name()
            );
            return Ok(Control::Refused);
        };
        let r = link
            .call(&self.agent.identity, async |c| {
                c.submit_many(vec![(mailbox, expires, payload.clone())])
                    .await
                    .pop()
                    .unwrap_or(Err(ClientError::Closed))
            })
            .await;
        match r {
            Ok(Submitted::Accepted { .. }) => Ok(Control::Accepted),
            Ok(Submitted::Refused(rf)) => {
                tracing::warn!(
                    "relay {relay} refused a {}: {}",
                    kind.name(),
                    rf.code.describe()
                );
                if rf.code.is_lasting() {
                    Ok(Control::Refused)
                } else {
                    Ok(Control::Failed)
                }
            }
            Err(e) => {
                tracing::warn!("sending a {} to {relay}: {e}; will retry", kind.name());
                if matches!(e, ClientError::ForgedRefusal(_)) {
                    self.found.push((
                        Caught::ForgedRefusal,
                        blake3::hash(&payload).to_hex().to_string(),
                    ));
                }
                link.disconnect();
                Ok(Control::Failed)
            }
        }
    }
}
