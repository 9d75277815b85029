//! Pushes to subscribed connections: a table of each mailbox's subscribers, with one owed notice per full queue.

use super::*;

/// A subscribed connection: its id, its answer queue, and whether a push
/// is owed to it (its queue was full when an item came).
pub(crate) type Subscriber = (u64, Out, Arc<std::sync::atomic::AtomicBool>);

/// A connection's subscription to its mailbox, in
/// [`Shared::subscribers`] for as long as this lives (dropped with the
/// connection, however it ends).
pub(crate) struct Subscription {
    pub(crate) shared: Arc<Shared>,
    pub(crate) mailbox: MailboxId,
    pub(crate) id: u64,
}

impl Subscription {
    pub(crate) fn new(s: &Arc<Shared>, mailbox: MailboxId, out: Out) -> Self {
        let id = s.next_connection.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut subs) = s.subscribers.lock() {
            subs.entry(mailbox)
                .or_default()
                .push((id, out, Arc::default()));
        }
        Self {
            shared: s.clone(),
            mailbox,
            id,
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if let Ok(mut subs) = self.shared.subscribers.lock() {
            if let Some(list) = subs.get_mut(&self.mailbox) {
                list.retain(|(id, _, _)| *id != self.id);
                if list.is_empty() {
                    subs.remove(&self.mailbox);
                }
            }
        }
    }
}

/// Pushes `Notify { seq }` to the connections subscribed to `mailbox`. A
/// connection whose queue is full (it does not read its answers) is owed
/// one `Notify { seq: 0 }` ("fetch from your cursor"), sent by one task
/// when there is room: however many items arrive meanwhile, a connection
/// has at most one push waiting.
pub(crate) fn push(s: &Shared, mailbox: &MailboxId, seq: u64) {
    let subs: Vec<(Out, Arc<std::sync::atomic::AtomicBool>)> = match s.subscribers.lock() {
        Ok(subs) => match subs.get(mailbox) {
            Some(list) => list
                .iter()
                .map(|(_, o, owed)| (o.clone(), owed.clone()))
                .collect(),
            None => return,
        },
        Err(_) => return,
    };
    for (out, owed) in subs {
        let frame = Outgoing::Frame(Response::Notify { seq }.encode(0));
        let full = matches!(out.try_send(frame), Err(super::outq::TrySendError::Full));
        if full && !owed.swap(true, Ordering::AcqRel) {
            tokio::spawn(async move {
                if let Ok(room) = out.reserve().await {
                    // Cleared before the push is queued: an item that
                    // comes after this is pushed (or owed) anew, one that
                    // came before is covered by this push.
                    owed.store(false, Ordering::Release);
                    room.send(Outgoing::Frame(Response::Notify { seq: 0 }.encode(0)));
                }
            });
        }
    }
}
