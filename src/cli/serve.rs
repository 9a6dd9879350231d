//! `serve` runs the node until SIGTERM/SIGINT; `check-config` validates the
//! configuration `serve` would run with and prints it, secrets redacted.
//! Both refuse the same configurations (including an empty `schools.ids`
//! without `schools.all`) and token files, with exit code 2.

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use crate::clock::{Clock, SystemClock};
use crate::config::{Config, ConfigError};

use super::{config_error, fail, init_logging, load};

pub(super) fn serve(config: Option<&Path>) -> ExitCode {
    let config = match load(config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    if let Err(e) = config.validate_serving() {
        return config_error(&e);
    }
    if let Err(code) = check_token_files(&config) {
        return code;
    }
    init_logging(&config);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => return fail(&anyhow::Error::new(e).context("cannot start the runtime")),
    };
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    match runtime.block_on(crate::node::serve(
        config,
        clock,
        crate::node::shutdown_signal(),
    )) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            fail(&e)
        }
    }
}

pub(super) fn check_config(path: &Path) -> ExitCode {
    match Config::load(Some(path), std::env::vars()).and_then(|c| {
        c.validate_serving()?;
        Ok(c)
    }) {
        Ok(c) => {
            if let Err(code) = check_token_files(&c) {
                return code;
            }
            print!("{}", c.to_redacted_toml());
            eprintln!("{}: valid", path.display());
            ExitCode::SUCCESS
        }
        Err(e) => config_error(&e),
    }
}

/// Token files are configuration: a missing, empty or world-readable one
/// is exit code 2 naming the key (systemd does not restart on it).
fn check_token_files(c: &Config) -> Result<(), ExitCode> {
    for (key, check) in [
        ("http.token_file", c.load_tokens().map(|_| ())),
        ("resync.token_file", c.resync_token().map(|_| ())),
        ("upstream.token_file", c.upstream_token().map(|_| ())),
    ] {
        if let Err(e) = check {
            return Err(config_error(&ConfigError {
                key: key.into(),
                message: format!("{e:#}"),
            }));
        }
    }
    Ok(())
}
