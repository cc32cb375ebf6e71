//! The gateway's HTTP routes: the `/v1` API, the batch endpoint, the
//! admin API and the metrics scrape, over one shared [`Gateway`].

use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post, put};
use axum::Router;

use crate::api::{
    confirm, get_issuer, get_reservation, get_token, health, not_found, open_reservations,
    put_issuer, release, reserve, resolve_token,
};
use crate::batch::reserve_batch;
use crate::cluster::{change_members, cluster, fault, metrics, transfer_leader};
use crate::feed_http::changefeed;
use crate::moves_http::{list_moves, move_bucket};
use crate::projection_http::{customer, exposure, projections, rebuild, search};
use crate::router::Gateway;

/// The gateway's routes.
pub fn routes(gateway: Arc<Gateway>) -> Router {
    let body_limit = gateway.config.body_bytes_max;
    Router::new()
        .route("/v1/health", get(health))
        .route("/v1/issuers/{issuer_id}", put(put_issuer).get(get_issuer))
        .route(
            "/v1/issuers/{issuer_id}/open-reservations",
            get(open_reservations),
        )
        .route("/v1/reservations", post(reserve))
        .route(
            "/v1/reservations:batch",
            post(reserve_batch).layer(DefaultBodyLimit::max(gateway.config.batch_body_bytes_max)),
        )
        .route("/v1/reservations/{reservation_id}", get(get_reservation))
        .route("/v1/reservations/{reservation_id}/confirm", post(confirm))
        .route("/v1/reservations/{reservation_id}/release", post(release))
        .route("/v1/reservation-tokens/{token}", get(get_token))
        .route(
            "/v1/reservation-tokens/{token}/resolve",
            post(resolve_token),
        )
        .route("/v1/changefeed", get(changefeed))
        .route("/v1/search/reservations", get(search))
        .route("/v1/reports/exposure", get(exposure))
        .route("/v1/customers/{customer_id}/reservations", get(customer))
        .route("/v1/admin/projections", get(projections))
        .route("/v1/admin/projections/{name}/rebuild", post(rebuild))
        .route("/v1/admin/cluster", get(cluster))
        .route(
            "/v1/admin/groups/{group}/transfer-leader",
            post(transfer_leader),
        )
        .route("/v1/admin/groups/{group}/members", post(change_members))
        .route(
            "/v1/admin/nodes/{node}/drain",
            post(crate::drain::drain_node),
        )
        .route("/v1/admin/faults", post(fault))
        .route("/v1/admin/buckets/{bucket}/move", post(move_bucket))
        .route("/v1/admin/moves", get(list_moves))
        .route("/v1/admin/buckets/hot", get(crate::hot::hot_buckets))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(body_limit))
        .with_state(gateway)
}
