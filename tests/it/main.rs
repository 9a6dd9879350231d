//! The integration tests: one binary, one module per area. Each test starts
//! real parts (a redb file or redb's in-memory backend, an HTTP listener on
//! port 0, the built binary) and asserts what a user would notice.

mod bad_parent;
mod changes;
mod cli;
mod convergence;
mod dashboard;
mod demo;
mod e2e;
mod faults;
mod feed;
mod follow_prop;
mod follower;
mod fuzz;
mod generated;
mod hostile;
mod http;
mod kafka;
mod layering;
mod openapi;
mod page;
mod resync;
mod store;
mod support;
mod transfer;
