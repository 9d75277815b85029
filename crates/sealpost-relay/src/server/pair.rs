//! Pairing requests (PROTOCOL §10): a connection opens, joins, writes to,
//! waits on and leaves rendezvous slots ([`crate::pairing`]).

use super::*;
use crate::pairing::PairFail;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn refused(f: PairFail) -> Response {
    let code = match f {
        PairFail::Full | PairFail::OwnerLimit => ErrorCode::RateLimited,
        PairFail::NoSuchSlot | PairFail::Used | PairFail::OtherLeft => ErrorCode::PairGone,
        PairFail::NotYours | PairFail::TooMany | PairFail::BadMessage => ErrorCode::BadRequest,
    };
    err(code, f.describe())
}

/// A closing connection leaves every slot it was a side of.
pub(crate) fn connection_closed(s: &Shared, conn: u64) {
    let Ok(mut z) = s.pairing.lock() else { return };
    if z.holds(conn) {
        z.leave(None, conn);
        drop(z);
        s.pairing_changed.notify_waiters();
    }
}

pub(crate) async fn handle(
    s: &Arc<Shared>,
    session: &mut Session,
    out: &Out,
    id: u32,
    req: Request,
) -> io::Result<()> {
    let offered = s.pairing.lock().map(|z| z.offered()).unwrap_or(false);
    if !offered {
        return send(
            out,
            id,
            err(
                ErrorCode::NotOffered,
                "this relay does not offer pairing by code (its operator turned it off); exchange cards with `sealpost id` and `sealpost contact add` instead",
            ),
        )
        .await;
    }
    let conn = session.conn;
    // Opens and joins count against the source address: each join is
    // one guess at somebody's code.
    if matches!(req, Request::PairOpen { .. } | Request::PairJoin { .. }) {
        let ok = match s.pairing_rate.lock() {
            Ok(mut r) => r.try_take(session.source, std::time::Instant::now()),
            Err(_) => false,
        };
        if !ok {
            s.metrics.rate_limited.fetch_add(1, Ordering::Relaxed);
            return send(
                out,
                id,
                err(
                    ErrorCode::RateLimited,
                    "too many pairing attempts from your address; wait a minute",
                ),
            )
            .await;
        }
    }
    let answer = match req {
        Request::PairOpen { ttl } => {
            let Some(owner) = session.mailbox else {
                return send(
                    out,
                    id,
                    err(
                        ErrorCode::NotAuthenticated,
                        "only this relay's mailbox owners may open a pairing invitation here; authenticate first",
                    ),
                )
                .await;
            };
            let r = match s.pairing.lock() {
                Ok(mut z) => z.open(owner, conn, ttl, now_ms(), &mut OsRng),
                Err(_) => Err(PairFail::Full),
            };
            match r {
                Ok((slot, until_ms)) => {
                    s.metrics.pair_opened.fetch_add(1, Ordering::Relaxed);
                    Response::PairOpened {
                        slot,
                        expires_at: until_ms / 1000,
                    }
                }
                Err(f) => refused(f),
            }
        }
        Request::PairJoin { slot, mut data } => {
            if let Some(t) = &s.config.tamper {
                t.pair(slot, false, &mut data);
            }
            let r = match s.pairing.lock() {
                Ok(mut z) => z.join(slot, conn, data, now_ms()),
                Err(_) => Err(PairFail::NoSuchSlot),
            };
            if r.is_ok() {
                s.metrics.pair_joined.fetch_add(1, Ordering::Relaxed);
                s.pairing_changed.notify_waiters();
            }
            r.map(|()| Response::Ok).unwrap_or_else(refused)
        }
        Request::PairSend { slot, mut data } => {
            let r = match s.pairing.lock() {
                Ok(mut z) => {
                    if let (Some(t), Some(opener)) = (&s.config.tamper, z.is_opener(slot, conn)) {
                        t.pair(slot, opener, &mut data);
                    }
                    z.send(slot, conn, data, now_ms())
                }
                Err(_) => Err(PairFail::NoSuchSlot),
            };
            if r.is_ok() {
                s.pairing_changed.notify_waiters();
            }
            r.map(|()| Response::Ok).unwrap_or_else(refused)
        }
        Request::PairLeave { slot } => {
            if let Ok(mut z) = s.pairing.lock() {
                z.leave(Some(slot), conn);
            }
            s.pairing_changed.notify_waiters();
            Response::Ok
        }
        Request::PairWait { slot, wait_ms } => {
            // Answered in place: the connection reads its next request
            // after this one (a pairing connection does nothing else), so
            // a client cannot pile up waits.
            let deadline = tokio::time::Instant::now()
                + Duration::from_millis(wait_ms as u64).min(MAX_PAIR_WAIT);
            let stop = s.stopping.subscribe();
            loop {
                let changed = s.pairing_changed.notified();
                tokio::pin!(changed);
                changed.as_mut().enable();
                let r = match s.pairing.lock() {
                    Ok(mut z) => z.take(slot, conn, now_ms()),
                    Err(_) => Err(PairFail::NoSuchSlot),
                };
                match r {
                    Ok(Some(data)) => break Response::PairMessage { data },
                    Err(f) => break refused(f),
                    Ok(None) => {}
                }
                if *stop.borrow() {
                    break err(ErrorCode::Internal, "the relay is stopping");
                }
                // Woken by any slot's change, or at the deadline (a
                // slot's expiry is seen at the next look).
                let wake = deadline.min(tokio::time::Instant::now() + Duration::from_secs(1));
                tokio::select! {
                    _ = &mut changed => {}
                    _ = tokio::time::sleep_until(wake) => {}
                }
                if tokio::time::Instant::now() >= deadline {
                    break Response::PairMessage { data: Vec::new() };
                }
            }
        }
        _ => err(ErrorCode::BadRequest, "not a pairing request"),
    };
    send(out, id, answer).await
}
