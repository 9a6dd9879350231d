//! The domain core: what an EMIS replica *is*, with no I/O and no clock.
//!
//! Everything here is pure: events are parsed from bytes handed in, the
//! convergence rule compares order keys, and teacher details are assembled
//! from records the caller looked up. Kafka, redb, HTTP and the wall clock
//! live in the adapters around this module (`ingest`, `store`, `api`), which
//! pass the current time in where a rule needs it.

pub mod detail;
pub mod entity;
pub mod event;
pub mod feed;
pub mod school;
pub mod snapshot;
pub mod time;

pub use detail::{assemble_teacher_detail, AssignmentView, ClassLookup, TeacherDetail};
pub use entity::{
    format_timestamp, Assignment, Change, Class, Entity, EntityKind, OrderKey, Record, Role,
    SyncSource, Teacher, TeacherStatus, Timestamp, Tombstone,
};
pub use event::{Event, EventError, EventType};
pub use feed::{Cursor, CursorError, FeedLine};
pub use school::SchoolFilter;
pub use snapshot::{SchoolSnapshot, SnapshotError, SnapshotLine, SnapshotReader};
pub use time::{seconds_between, FutureSkew};
