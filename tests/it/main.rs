//! The integration tests: one binary, one module per area. Each test starts
//! real parts (a redb file or redb's in-memory backend, an HTTP listener on
//! port 0, the built binary) and asserts what a user would notice.

mod cli;
mod convergence;
mod demo;
mod e2e;
mod faults;
mod fuzz;
mod hostile;
mod http;
mod kafka;
mod openapi;
mod resync;
mod store;
mod support;
