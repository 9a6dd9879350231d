//! `resync`: one resync (or, with `--dry-run`, a drift audit) of the served
//! schools against `resync.central_url` (a follower without one: its
//! parent, `upstream.url`) — posted to the running node's admin route if
//! there is one, else run by `crate::resync` on the store directly.

use crate::clock::{Clock, SystemClock};
use crate::config::{Config, ConfigError};

use super::{ask_node, config_error, open_store, print_outcomes, runtime, Ask};

pub(super) fn resync(
    config: &Config,
    schools: Vec<uuid::Uuid>,
    dry_run: bool,
) -> anyhow::Result<bool> {
    let Some((base, client)) = crate::resync::source(config)? else {
        config_error(&ConfigError {
            key: "resync.central_url".into(),
            message: "must be set to resync (or upstream.url, on a follower)".into(),
        });
        std::process::exit(2);
    };
    let rt = runtime()?;
    rt.block_on(async {
        let mut path = format!("/api/admin/resync?dryRun={dry_run}");
        if !schools.is_empty() {
            let ids: Vec<String> = schools.iter().map(|s| s.to_string()).collect();
            path.push_str(&format!("&school={}", ids.join(",")));
        }
        let doc = match ask_node(config, Ask::Admin, reqwest::Method::POST, &path, None).await? {
            Some(doc) => doc,
            None => {
                let store = open_store(config)?;
                let schools = store.schools_to_sync(&config.school_filter(), schools)?;
                anyhow::ensure!(
                    !schools.is_empty(),
                    "no school to resync: set schools.ids or name --school"
                );
                let report = crate::resync::run(
                    &store,
                    &client,
                    &base,
                    schools,
                    config.max_future_skew(),
                    || SystemClock.now(),
                    dry_run,
                )
                .await;
                serde_json::to_value(report)?
            }
        };
        Ok(print_outcomes(&doc))
    })
}
