//! `[cluster]`: NATS servers, node name, lease, replicas, advertised address, snapshots, intake,
//! placement, how long the stream waits for an absent node.

use super::Validator;
use super::raw::RawCluster;
use crate::literal::parse_duration;
use crate::model::ClusterSettings;
use toml::Spanned;

const DEFAULT_LEASE_MS: i64 = 5_000;
const DEFAULT_SNAPSHOT_EVERY_MS: i64 = 60_000;
/// The new owner applies what the intake holds before what it is sent next: 30,000 events take
/// about two and a half seconds on a 2-core machine (BENCHMARKS.md).
const DEFAULT_INTAKE_LIMIT: u64 = 30_000;
/// A stream's messages beyond this would outgrow what one takeover applies in a lease period.
const MOST_INTAKE_LIMIT: i64 = 10_000_000;
const SNAPSHOT_RANGE_MS: std::ops::RangeInclusive<i64> = 1_000..=86_400_000;
/// Long enough for a node's restart or a NATS election; a week of stream is the most kept for
/// a node that may never come back.
const DEFAULT_WAIT_FOR_ABSENT_MS: i64 = 600_000;
const WAIT_FOR_ABSENT_RANGE_MS: std::ops::RangeInclusive<i64> = 1_000..=604_800_000;
/// A lease shorter than this is renewed more often than a NATS round trip under load allows;
/// a longer one leaves a dead node's partitions unserved for longer than clients wait.
const LEASE_RANGE_MS: std::ops::RangeInclusive<i64> = 1_000..=60_000;

impl Validator<'_> {
    pub(super) fn cluster(&mut self, raw: &RawCluster) -> Option<ClusterSettings> {
        let errors = self.errors.len();
        if raw.nats.is_empty() {
            self.error(raw.node.span(), "cluster.nats: name at least one NATS server (nats://host:port)");
        }
        for url in &raw.nats {
            let u = url.get_ref();
            let well_formed = ["nats://", "tls://"]
                .iter()
                .any(|scheme| u.strip_prefix(scheme).is_some_and(|rest| !rest.is_empty() && !rest.contains('/')));
            if !well_formed {
                self.error(url.span(), format!("cluster.nats: `{u}` is not a NATS server URL (nats://host:port)"));
            }
        }
        let node = raw.node.get_ref();
        if node.is_empty() || !node.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
            self.error(
                raw.node.span(),
                format!("cluster.node: `{node}` must be letters, digits, `-` and `_` (it names the node's keys)"),
            );
        }
        let lease_ms =
            self.bounded_duration(&raw.lease, "lease", LEASE_RANGE_MS, "between 1s and 60s", DEFAULT_LEASE_MS);
        let replicas = match &raw.replicas {
            None => raw.nats.len().clamp(1, 3),
            Some(n) if !(1..=5).contains(n.get_ref()) => {
                self.error(n.span(), "cluster.replicas must be between 1 and 5 (JetStream's limit)");
                1
            }
            Some(n) => *n.get_ref() as usize,
        };
        if let Some(url) = &raw.advertise {
            let u = url.get_ref();
            let well_formed = ["http://", "https://"]
                .iter()
                .any(|scheme| u.strip_prefix(scheme).is_some_and(|rest| !rest.is_empty() && !rest.ends_with('/')));
            if !well_formed {
                self.error(
                    url.span(),
                    format!("cluster.advertise: `{u}` is not a base URL (http://host:port, no trailing `/`)"),
                );
            }
        }
        let snapshot_every_ms = self.bounded_duration(
            &raw.snapshot_every,
            "snapshot_every",
            SNAPSHOT_RANGE_MS,
            "between 1s and 1d",
            DEFAULT_SNAPSHOT_EVERY_MS,
        );
        let intake_limit = match &raw.intake_limit {
            None => DEFAULT_INTAKE_LIMIT,
            Some(n) if !(0..=MOST_INTAKE_LIMIT).contains(n.get_ref()) => {
                self.error(n.span(), format!("cluster.intake_limit must be between 0 and {MOST_INTAKE_LIMIT} events"));
                DEFAULT_INTAKE_LIMIT
            }
            Some(n) => *n.get_ref() as u64,
        };
        let spread = match raw.placement.as_ref().map(|p| (p, p.get_ref().as_str())) {
            None | Some((_, "whole")) => false,
            Some((_, "spread")) => true,
            Some((p, other)) => {
                self.error(p.span(), format!("cluster.placement: `{other}` is not `whole` or `spread`"));
                false
            }
        };
        let wait_for_absent_ms = self.bounded_duration(
            &raw.wait_for_absent,
            "wait_for_absent",
            WAIT_FOR_ABSENT_RANGE_MS,
            "between 1s and 7d",
            DEFAULT_WAIT_FOR_ABSENT_MS,
        );
        (self.errors.len() == errors).then(|| ClusterSettings {
            nats: raw.nats.iter().map(|u| u.get_ref().clone()).collect(),
            node: node.clone(),
            lease_ms,
            replicas,
            advertise: raw.advertise.as_ref().map(|u| u.get_ref().clone()),
            snapshot_every_ms,
            intake_limit,
            spread,
            wait_for_absent_ms,
        })
    }

    /// `cluster.<key>`, a duration within `range` (`within` says which in words); the default
    /// when it is absent or wrong (the error is reported).
    fn bounded_duration(
        &mut self,
        raw: &Option<Spanned<String>>,
        key: &str,
        range: std::ops::RangeInclusive<i64>,
        within: &str,
        default: i64,
    ) -> i64 {
        let Some(value) = raw else { return default };
        match parse_duration(value.get_ref()) {
            Ok(ms) if range.contains(&ms) => ms,
            Ok(_) => {
                self.error(value.span(), format!("cluster.{key} must be {within}"));
                default
            }
            Err(e) => {
                self.error(value.span(), format!("cluster.{key}: {e}"));
                default
            }
        }
    }
}
