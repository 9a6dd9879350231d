//! The configuration parser and its validation, `Config::from_toml_str`:
//! the text of a configuration file over the built-in defaults, with no
//! environment (the process's environment never reaches this target).
//!
//! Properties: no panic; an error names a key; an accepted configuration
//! validates, prints (`check-config`'s output, secrets redacted), and that
//! output loads again to the same configuration but for the redacted
//! values.

#![no_main]

use emis_edge::config::{is_secret, Config};
use libfuzzer_sys::fuzz_target;

/// Larger than the commented example file; `-max_len` is set lower still.
const MAX_INPUT: usize = 64 * 1024;

fuzz_target!(|data: &[u8]| {
    if data.len() > MAX_INPUT {
        return;
    }
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let config = match Config::from_toml_str(text) {
        Ok(config) => config,
        Err(e) => {
            assert!(!e.key.is_empty(), "no key in {e}");
            return;
        }
    };
    config.validate().expect("a loaded configuration validates");
    let _ = (
        config.group_id(),
        config.school_filter(),
        config.store_path(),
    );

    let shown = config.to_redacted_toml();
    let mut again = match Config::from_toml_str(&shown) {
        Ok(again) => again,
        Err(e) => panic!("check-config's output does not load again: {e}\n{shown}"),
    };
    for (name, value) in &mut again.kafka.properties {
        if is_secret(name) {
            assert_eq!(value, "<redacted>");
            value.clone_from(&config.kafka.properties[name]);
        }
    }
    assert_eq!(
        again, config,
        "check-config's output loads differently:\n{shown}"
    );
});
