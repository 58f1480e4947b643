//! The bookie's HTTP endpoints: `/health`, `/metrics` (Prometheus text) and the admin API
//! `/api/v1/bookie/state` (GET: the state; PUT `{"read_only": bool}`: force read-only on or off).
//! `PUT /api/v1/bookie/state/readonly` with `{"readOnly": bool}` is accepted too, as in BookKeeper.

use crate::bookie::Bookie;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use std::sync::Arc;

pub fn router(bookie: Arc<Bookie>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/api/v1/bookie/state", get(state).put(set_state))
        .route("/api/v1/bookie/state/readonly", get(state).put(set_state))
        .with_state(bookie)
}

async fn health(State(b): State<Arc<Bookie>>) -> impl IntoResponse {
    if b.is_healthy() {
        (StatusCode::OK, "ok\n")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "unhealthy: journal failed or shutting down\n",
        )
    }
}

async fn metrics(State(b): State<Arc<Bookie>>) -> impl IntoResponse {
    b.refresh_gauges();
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        b.metrics().render(),
    )
}

async fn state(State(b): State<Arc<Bookie>>) -> impl IntoResponse {
    Json(b.info())
}

#[derive(Deserialize)]
struct SetState {
    #[serde(alias = "readOnly")]
    read_only: bool,
}

async fn set_state(State(b): State<Arc<Bookie>>, Json(s): Json<SetState>) -> impl IntoResponse {
    b.set_forced_read_only(s.read_only);
    Json(b.info())
}
