//! The `sealpost` command line is the binary of this package
//! (`src/main.rs`). This library target is empty on purpose: it exists so
//! that the package's own tests can depend on the package with the
//! `test-tools` feature (the hostile relay mode and the load generator,
//! which the installed binary leaves out).
#![forbid(unsafe_code)]
