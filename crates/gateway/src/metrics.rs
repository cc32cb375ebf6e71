//! `GET /metrics`: the gateway's counters and, gathered at scrape time from
//! every replica's status, each group's replication lag and staleness, in
//! the OpenMetrics text format Prometheus scrapes.

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response as HttpResponse};
use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::admin::ClusterView;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReadLabels {
    consistency: &'static str,
    /// `leader`, `follower`, or `fallback` (the leader, after a local
    /// replica could not serve the read).
    served_by: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReplicaLabels {
    group: u32,
    node: String,
    region: String,
    role: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FollowerLabels {
    group: u32,
    node: String,
    local: bool,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProjectionLabels {
    projection: &'static str,
}

/// The gateway's one projection (search, reports) is named this in metrics.
const PROJECTION: ProjectionLabels = ProjectionLabels {
    projection: "reservations",
};

pub struct Metrics {
    registry: Registry,
    reads: Family<ReadLabels, Counter>,
    stale_reads: Family<ReadLabels, Counter>,
    staleness_ms: Family<ReplicaLabels, Gauge>,
    replica_up: Family<ReplicaLabels, Gauge>,
    lag_entries: Family<FollowerLabels, Gauge>,
    lag_ms: Family<FollowerLabels, Gauge>,
    changes_retained_bytes: Family<ReplicaLabels, Gauge>,
    feeds_open: Gauge,
    feed_changes: Counter,
    feed_resolved_lag_ms: Gauge,
    projection_lag_ms: Family<ProjectionLabels, Gauge>,
    projection_changes: Family<ProjectionLabels, Counter>,
    projection_scanned_rows: Family<ProjectionLabels, Counter>,
    projection_rescans: Family<ProjectionLabels, Counter>,
    projection_saved_bytes: Family<ProjectionLabels, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("harbor");
        let reads = Family::default();
        registry.register(
            "reads",
            "Reads answered, by consistency and by who served them",
            reads.clone(),
        );
        let stale_reads = Family::default();
        registry.register(
            "stale_reads",
            "Bounded reads with allow_stale answered over their budget (flagged stale)",
            stale_reads.clone(),
        );
        let staleness_ms = Family::default();
        registry.register(
            "replica_staleness_ms",
            "How old a replica's state may be: 0 for a leader under a lease, the age of its \
             closed timestamp for a follower, -1 when it knows no bound (at scrape time)",
            staleness_ms.clone(),
        );
        let replica_up = Family::default();
        registry.register(
            "replica_up",
            "1 if the replica answered its status at scrape time",
            replica_up.clone(),
        );
        let lag_entries = Family::default();
        registry.register(
            "follower_lag_entries",
            "Entries the leader holds that the follower has not acknowledged",
            lag_entries.clone(),
        );
        let lag_ms = Family::default();
        registry.register(
            "follower_lag_ms",
            "Age of the oldest entry the follower has not acknowledged",
            lag_ms.clone(),
        );
        let changes_retained_bytes = Family::default();
        registry.register(
            "changes_retained_bytes",
            "Estimated bytes of changes a replica keeps for change feeds (at scrape time)",
            changes_retained_bytes.clone(),
        );
        let feeds_open = Gauge::default();
        registry.register(
            "changefeeds_open",
            "Change feeds this gateway is serving",
            feeds_open.clone(),
        );
        let feed_changes = Counter::default();
        registry.register(
            "changefeed_changes",
            "Changes this gateway's feeds sent",
            feed_changes.clone(),
        );
        let feed_resolved_lag_ms = Gauge::default();
        registry.register(
            "changefeed_resolved_lag_ms",
            "How far behind this gateway's wall clock the newest resolved mark it sent was, \
             when it was sent",
            feed_resolved_lag_ms.clone(),
        );
        let projection_lag_ms = Family::default();
        registry.register(
            "projection_lag_ms",
            "Now minus the projection's watermark (every change at or before the watermark is in), \
             at scrape time; -1 while it has none (being built)",
            projection_lag_ms.clone(),
        );
        let projection_changes = Family::default();
        registry.register(
            "projection_changes",
            "Changes the projection applied from the groups' change streams",
            projection_changes.clone(),
        );
        let projection_scanned_rows = Family::default();
        registry.register(
            "projection_scanned_rows",
            "Rows the projection read from scans of the groups' state (at start, a rebuild, or \
             after a group's stream expired)",
            projection_scanned_rows.clone(),
        );
        let projection_rescans = Family::default();
        registry.register(
            "projection_rescans",
            "Groups scanned again because their change stream no longer reached back to the \
             projection's position",
            projection_rescans.clone(),
        );
        let projection_saved_bytes = Family::default();
        registry.register(
            "projection_saved_bytes",
            "Size of the projection's last save in the gateway's data directory",
            projection_saved_bytes.clone(),
        );
        Metrics {
            registry,
            projection_saved_bytes,
            projection_lag_ms,
            projection_changes,
            projection_scanned_rows,
            projection_rescans,
            changes_retained_bytes,
            feeds_open,
            feed_changes,
            feed_resolved_lag_ms,
            reads,
            stale_reads,
            staleness_ms,
            replica_up,
            lag_entries,
            lag_ms,
        }
    }
}

impl Metrics {
    pub(crate) fn read(
        &self,
        consistency: &'static str,
        served_by: &'static str,
        fallback: bool,
        stale: bool,
    ) {
        let labels = ReadLabels {
            consistency,
            served_by: if fallback { "fallback" } else { served_by },
        };
        self.reads.get_or_create(&labels).inc();
        if stale {
            self.stale_reads.get_or_create(&labels).inc();
        }
    }
}

impl Metrics {
    pub(crate) fn feed_opened(&self) {
        self.feeds_open.inc();
    }

    pub(crate) fn feed_closed(&self) {
        self.feeds_open.dec();
    }

    pub(crate) fn feed_sent(&self, changes: u64) {
        self.feed_changes.inc_by(changes);
    }

    pub(crate) fn feed_resolved(&self, lag_ms: i64) {
        self.feed_resolved_lag_ms.set(lag_ms);
    }

    pub(crate) fn projection_lag(&self, lag_ms: i64) {
        self.projection_lag_ms
            .get_or_create(&PROJECTION)
            .set(lag_ms);
    }

    pub(crate) fn projection_applied(&self, changes: u64) {
        self.projection_changes
            .get_or_create(&PROJECTION)
            .inc_by(changes);
    }

    pub(crate) fn projection_scanned(&self, rows: u64) {
        self.projection_scanned_rows
            .get_or_create(&PROJECTION)
            .inc_by(rows);
    }

    pub(crate) fn projection_rescanned(&self) {
        self.projection_rescans.get_or_create(&PROJECTION).inc();
    }

    pub(crate) fn projection_saved(&self, bytes: u64) {
        self.projection_saved_bytes
            .get_or_create(&PROJECTION)
            .set(bytes as i64);
    }
}

impl Metrics {
    /// The scrape: the counters, and gauges of this view of the cluster.
    pub(crate) fn render(&self, view: &ClusterView) -> HttpResponse {
        let m = self;
        // Replicas and followers come and go: the gauges show this scrape only.
        m.staleness_ms.clear();
        m.replica_up.clear();
        m.lag_entries.clear();
        m.lag_ms.clear();
        m.changes_retained_bytes.clear();
        for group in &view.groups {
            for replica in &group.replicas {
                let labels = ReplicaLabels {
                    group: group.shard,
                    node: replica.node.to_string(),
                    region: replica.region.to_string(),
                    role: replica.role.clone(),
                };
                m.replica_up
                    .get_or_create(&labels)
                    .set(i64::from(replica.answering));
                if replica.answering {
                    let staleness = replica.staleness_ms.map_or(-1, |s| s as i64);
                    m.staleness_ms.get_or_create(&labels).set(staleness);
                    m.changes_retained_bytes
                        .get_or_create(&labels)
                        .set(replica.changes_retained_bytes as i64);
                }
            }
            for follower in &group.followers {
                let labels = FollowerLabels {
                    group: group.shard,
                    node: follower.node.to_string(),
                    local: follower.local,
                };
                m.lag_entries
                    .get_or_create(&labels)
                    .set(follower.lag_entries as i64);
                m.lag_ms.get_or_create(&labels).set(follower.lag_ms as i64);
            }
        }
        let mut text = String::new();
        if let Err(e) = encode(&mut text, &m.registry) {
            tracing::error!(error = %e, "metrics did not encode");
            return (StatusCode::INTERNAL_SERVER_ERROR, "metrics did not encode").into_response();
        }
        (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
            .into_response()
    }
}
