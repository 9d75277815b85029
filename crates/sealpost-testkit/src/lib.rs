//! Testing tools for sealpost — **not for production use**.
//!
//! - [`hostile`]: a relay that misbehaves on purpose (drops, duplicates,
//!   reorders, delays, flips bits, truncates, replays, moves, substitutes,
//!   forges refusals and reports), seeded and logged, so tests can show
//!   that the endpoints catch every fault.
//! - [`netfault`]: a TCP proxy on loopback that cuts connections mid-frame,
//!   leaves them half-open or accepts and never answers.
//! - [`soak`]: the adversary soak and crash campaign over real processes.
//! - [`clients`]: hostile clients — strangers flooding a relay at every
//!   stage of a connection, stuffing quotas, registering en masse, probing
//!   blobs and storming requests — while honest clients are measured.
//! - [`contact`]: a hostile contact — a pinned sender that sends an agent
//!   everything the format allows and more.
//! - [`tool`]: what the attack binaries share.
#![forbid(unsafe_code)]

pub mod clients;
pub mod contact;
pub mod hostile;
pub mod idle;
pub mod netfault;
pub mod pairing;
pub mod soak;
pub mod tool;

pub use hostile::{Fault, Hostile, Spec, SpecError};
pub use netfault::{FaultyProxy, NetFault};
