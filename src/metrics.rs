//! Prometheus exposition (`GET /metrics`). Values are read at scrape time
//! from the store and the run-time sync state, so they cannot drift from
//! what status reports.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::api::AppState;
use crate::store::counter;

pub fn registry(state: AppState) -> Registry {
    let mut registry = Registry::with_prefix("emis_edge");
    registry.register_collector(Box::new(NodeCollector(state)));
    registry
}

pub fn render(registry: &Registry) -> String {
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, registry)
        .expect("writing to a String cannot fail");
    out
}

struct NodeCollector(AppState);

impl std::fmt::Debug for NodeCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NodeCollector")
    }
}

fn gauge(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    values: &[(&[(&str, &str)], f64)],
) -> std::fmt::Result {
    let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    if let [(&[], value)] = values {
        return ConstGauge::new(*value).encode(metric);
    }
    for (labels, value) in values {
        let labels: Vec<(String, String)> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        ConstGauge::new(*value).encode(metric.encode_family(&labels)?)?;
    }
    Ok(())
}

impl Collector for NodeCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let s = &self.0;
        let (stats, watermark, offsets) = match s
            .store
            .read()
            .and_then(|r| Ok((r.stats()?, r.watermark()?, r.offsets()?)))
        {
            Ok(v) => v,
            Err(e) => {
                tracing::error!(error = %e, "metrics: store read failed");
                return Ok(());
            }
        };
        let state = s.sync.get();

        let mut events = encoder.encode_descriptor(
            "events",
            "Kafka events handled, by outcome (persisted: survives restarts)",
            None,
            MetricType::Counter,
        )?;
        for (outcome, name) in [
            ("applied", counter::APPLIED),
            ("stale", counter::STALE),
            ("skipped", counter::SKIPPED),
            ("dead_lettered", counter::DEAD_LETTERED),
        ] {
            let n = stats.counters.get(name).copied().unwrap_or(0);
            let labels = vec![("outcome".to_string(), outcome.to_string())];
            ConstCounter::new(n).encode(events.encode_family(&labels)?)?;
        }

        gauge(
            &mut encoder,
            "entities",
            "Live entities in the local store",
            &[
                (&[("kind", "class")], stats.classes as f64),
                (&[("kind", "teacher")], stats.teachers as f64),
                (&[("kind", "assignment")], stats.assignments as f64),
            ],
        )?;
        gauge(
            &mut encoder,
            "tombstones",
            "Tombstones kept",
            &[(&[], stats.tombstones as f64)],
        )?;
        gauge(
            &mut encoder,
            "dead_letters",
            "Dead-lettered events kept in the store",
            &[(&[], stats.dead_letters as f64)],
        )?;
        if let Some(w) = watermark {
            gauge(
                &mut encoder,
                "last_event_timestamp_seconds",
                "Source timestamp of the newest event or snapshot record seen",
                &[(&[], w as f64 / 1e9)],
            )?;
        }
        let lags: Vec<(String, String, f64)> = offsets
            .iter()
            .filter_map(|o| {
                let hw = state.high_watermarks.get(&(o.topic.clone(), o.partition))?;
                Some((
                    o.topic.clone(),
                    o.partition.to_string(),
                    (hw - o.next_offset).max(0) as f64,
                ))
            })
            .collect();
        let lag_values: Vec<([(&str, &str); 2], f64)> = lags
            .iter()
            .map(|(t, p, v)| ([("topic", t.as_str()), ("partition", p.as_str())], *v))
            .collect();
        let lag_refs: Vec<(&[(&str, &str)], f64)> =
            lag_values.iter().map(|(l, v)| (l.as_slice(), *v)).collect();
        gauge(
            &mut encoder,
            "partition_lag",
            "Messages behind the high watermark",
            &lag_refs,
        )?;
        let ready = crate::api::is_ready(s).unwrap_or(false);
        gauge(
            &mut encoder,
            "ready",
            "1 when /health/ready answers 200",
            &[(&[], f64::from(u8::from(ready)))],
        )?;
        gauge(
            &mut encoder,
            "kafka_connected",
            "1 when the last contact with the broker succeeded",
            &[(&[], f64::from(u8::from(state.kafka_connected)))],
        )?;
        Ok(())
    }
}
