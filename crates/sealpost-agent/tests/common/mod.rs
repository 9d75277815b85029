//! What the engine tests share: a relay on the in-memory store reached
//! over a memory net, engines on it (on a fake clock or the system's),
//! pinning, and reading the outbox.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rand_core::OsRng;
use sealpost_agent::engine::{self, Clock, Engine, FakeClock};
use sealpost_agent::Home;
use sealpost_proto::delivery::{Delivery, State};
use sealpost_proto::MessageId;
use sealpost_relay::client::RelayClient;
use sealpost_relay::memory::MemoryNet;
use sealpost_relay::tamper::Tamper;
use sealpost_relay::{Config, Relay, RelayAddress, RunningRelay};
use sealpost_store::memory::{MemBlobs, MemLedger};
use sealpost_store::{LocalNotifier, Store};

/// The system's time, unix milliseconds.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The system's time, unix seconds.
pub fn now() -> u64 {
    now_ms() / 1000
}

/// A relay on the in-memory store (no disk), on a memory net of its own
/// (no socket), with `tamper`'s hooks if given.
pub async fn relay(
    dir: &std::path::Path,
    tamper: Option<Arc<dyn Tamper>>,
) -> (RunningRelay, Arc<MemoryNet>) {
    let mut cfg = Config::new("127.0.0.1:0".parse().expect("addr"), dir.join("relay"));
    cfg.tamper = tamper;
    let relay = spawn_in_memory(cfg).await;
    let net = MemoryNet::new();
    net.add(relay.door());
    (relay, net)
}

/// A relay configured by `cfg`, on the in-memory store, serving.
pub async fn spawn_in_memory(cfg: Config) -> RunningRelay {
    let store = Store::new(
        Arc::new(MemLedger::new(cfg.limits)),
        Arc::new(MemBlobs::default()),
        Arc::new(LocalNotifier::default()),
        cfg.limits,
        "memory".into(),
    );
    Relay::bind_with(cfg, store).await.expect("bind").spawn()
}

/// A bare client of the relay at `addr` over `net`, as any stranger
/// (no mailbox key, default options): for tests that act as one.
pub async fn client(net: &MemoryNet, addr: &RelayAddress) -> RelayClient {
    RelayClient::connect_via(net, addr, None, Default::default())
        .await
        .expect("connect")
}

/// An identity with its home on `addr`, reached over `net`, on `clock`
/// (the system's if none), after an empty pass (which registers its
/// mailbox).
pub async fn engine(
    dir: &std::path::Path,
    name: &str,
    addr: &RelayAddress,
    net: &Arc<MemoryNet>,
    clock: Option<&Arc<FakeClock>>,
) -> Engine {
    let now_s = clock.map_or_else(now, |c| c.now_ms() / 1000);
    let home = Home::new(dir.join(name));
    let mut agent = home.init(name, &mut OsRng, now_s).expect("init");
    agent
        .set_home_relay(&addr.to_string(), engine::pin_of(addr), now_s)
        .expect("relay");
    let mut e = Engine::new(agent)
        .expect("engine")
        .with_transport(net.clone());
    if let Some(c) = clock {
        e = e.with_clock(c.clone());
    }
    e.pass().await.expect("first pass");
    e
}

/// `a` pins `b`'s card as `name`.
pub fn pin(a: &mut Engine, name: &str, b: &Engine) {
    let card = b.agent().card().clone();
    a.agent_mut()
        .db_mut()
        .add_contact(name, &card, false, now())
        .expect("pin");
}

/// The first delivery of a sent message.
pub fn delivery(e: &Engine, id: &MessageId) -> Delivery {
    let m = e.agent().db().outbox(Some(id), 1).expect("outbox");
    m[0].deliveries[0].delivery.clone()
}

/// The first delivery's state and failure class.
pub fn state(e: &Engine, id: &MessageId) -> (State, Option<String>) {
    let d = delivery(e, id);
    (d.state, d.failure.as_ref().map(|f| f.code()))
}

/// Moves `clock` up to the system's time if it is behind: `send` queues
/// by the system's clock (composing is outside the engine), and a message
/// queued after the fake clock was set would not be due yet by it.
pub fn catch_up(clock: &FakeClock) {
    let real = now_ms();
    let now = clock.now_ms();
    if real > now {
        clock.advance(Duration::from_millis(real - now));
    }
}
