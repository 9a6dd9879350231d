//! The integration tests: one binary, one module per area. Each test starts
//! real parts (a redb file or redb's in-memory backend, an HTTP listener on
//! port 0, the built binary) and asserts what a user would notice.

mod bad_parent;
mod changes;
mod cli;
mod convergence;
mod demo;
mod e2e;
mod faults;
mod feed;
mod follow_prop;
mod follower;
mod fuzz;
mod hostile;
mod http;
mod kafka;
mod resync;
mod store;
mod support;
mod transfer;
