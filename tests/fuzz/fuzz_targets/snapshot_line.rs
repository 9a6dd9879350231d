//! The snapshot wire format: `SnapshotLine::parse` on each line and
//! `SnapshotReader` over the whole input, split at `\n` as resync and
//! import split a body or a file.
//!
//! Properties: no panic; a parsed line, written back by `record_line` or
//! `end_line`, parses to the same line; a school the reader accepts has
//! exactly its `end` line's count of records, all of that school; an error
//! names a line that was read.

#![no_main]

use emis_edge::domain::snapshot::{end_line, end_line_at, record_line};
use emis_edge::domain::{Record, SnapshotLine, SnapshotReader, SyncSource};
use libfuzzer_sys::fuzz_target;

/// A few dozen lines; `-max_len` is set lower still.
const MAX_INPUT: usize = 256 * 1024;

fuzz_target!(|data: &[u8]| {
    if data.len() > MAX_INPUT {
        return;
    }
    let mut reader = SnapshotReader::new();
    for raw in data.split(|b| *b == b'\n') {
        round_trip(raw.strip_suffix(b"\r").unwrap_or(raw));
        match reader.feed(raw) {
            Some(Ok(school)) => {
                assert!(school
                    .records
                    .iter()
                    .all(|(_, e)| e.school_id() == school.school_id));
                assert!(school.records.iter().all(|(k, _)| !k.delete));
            }
            Some(Err(e)) => {
                assert!(e.line >= 1 && e.line <= reader.lines());
                assert!(!e.to_string().is_empty());
            }
            None => {}
        }
    }
    let lines = reader.lines();
    if let Some(e) = reader.finish() {
        assert!(e.line <= lines);
    }
});

fn round_trip(raw: &[u8]) {
    let Ok(line) = SnapshotLine::parse(raw) else {
        return;
    };
    let written = match &line {
        SnapshotLine::Record { key, entity } => record_line(&Record {
            data: entity.clone(),
            key: *key,
            last_synced_at: 0,
            source: SyncSource::Resync,
        }),
        SnapshotLine::End {
            school_id,
            count,
            as_of,
            cursor: None,
        } => end_line(*school_id, *count, *as_of),
        SnapshotLine::End {
            school_id,
            count,
            as_of,
            cursor: Some(cursor),
        } => end_line_at(*school_id, *count, *as_of, cursor),
    };
    let text = String::from_utf8_lossy(&written);
    match SnapshotLine::parse(written.strip_suffix(b"\n").expect("a line ends in \\n")) {
        Ok(again) => assert_eq!(again, line, "re-parsed from {text}"),
        Err(e) => panic!("{text} does not parse again: {e}"),
    }
}
