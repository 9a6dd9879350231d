//! emis-edge: an EMIS edge node.
//!
//! It replicates the classes, teachers and teacher-class assignments of its
//! schools from Kafka into an embedded redb file and answers teacher-detail
//! lookups over HTTP from that file alone. See `docs/ARCHITECTURE.md` for the
//! map of the modules and the invariants they keep.

pub mod api;
pub mod cli;
pub mod clock;
pub mod config;
pub mod demo;
pub mod domain;
pub mod follower;
pub mod gen;
pub mod ingest;
pub mod maintenance;
pub mod metrics;
pub mod node;
pub mod resync;
pub mod server;
pub mod state;
pub mod status;
pub mod store;
pub mod systemd;
pub mod worker;
