//! What the attack binaries (`sealpost-hostile-clients`,
//! `sealpost-hostile-contact`) share: they aim only at a relay on loopback,
//! and run on a multi-thread runtime.

use sealpost_relay::RelayAddress;

/// The relay address given on the command line, if it is one and on
/// loopback (127.x); else the words to print before exiting with 2.
pub fn loopback_relay(text: &str) -> Result<RelayAddress, String> {
    let relay = RelayAddress::parse(text).ok_or_else(|| format!("not a relay address: {text}"))?;
    if !relay.host_port.starts_with("127.") {
        return Err(format!(
            "refusing to attack through {}: loopback only",
            relay.host_port
        ));
    }
    Ok(relay)
}

/// A multi-thread runtime, or the words to print before exiting with 2.
pub fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("runtime: {e}"))
}

/// The relay to aim at (on loopback only) and the runtime to do it on, or
/// the words to print before exiting with 2.
pub fn setup(relay: &str) -> Result<(RelayAddress, tokio::runtime::Runtime), String> {
    Ok((loopback_relay(relay)?, runtime()?))
}
