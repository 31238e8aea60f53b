//! The gateway's HTTP API: provider progress reports, health, readiness and
//! metrics.
//!
//! `POST /v1/alarms/{alarm_id}/progress` is checked in the order DESIGN.md
//! gives: 401 without a valid provider token (compared in constant time);
//! 404 for an unknown or malformed alarm id; 403 when the alarm was never
//! offered to that provider; 400 (not JSON) or 422 (breaks the contract,
//! including an `at` before the alarm was received or more than 60 s in the
//! future); 409 for a state that goes backwards; otherwise 200. A repeat of
//! the same state is 200 and keeps the first `at`. A provider only ever
//! learns about alarms offered to it (guarantee 8).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use serde_json::{json, Value};
use subtle::ConstantTimeEq;

use crate::clock::SharedClock;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::model::AlarmId;
use crate::source::Readiness;
use crate::store::{ProgressReport, ProgressResult, ProgressState, Store};

/// How far in the future a reported `at` may be.
const MAX_FUTURE: chrono::Duration = chrono::Duration::seconds(60);
/// Longest `outcome` text kept.
const MAX_OUTCOME: usize = 1024;

/// What the handlers share.
#[derive(Clone)]
pub struct ApiState {
    store: Store,
    /// (provider id, bearer token) pairs.
    tokens: Arc<Vec<(String, Vec<u8>)>>,
    clock: SharedClock,
    metrics: Arc<Metrics>,
    ready: Readiness,
}

impl ApiState {
    pub fn new(
        config: &Config,
        store: Store,
        clock: SharedClock,
        metrics: Arc<Metrics>,
        ready: Readiness,
    ) -> ApiState {
        let tokens = config
            .providers
            .iter()
            .map(|p| (p.id.clone(), p.token.expose().as_bytes().to_vec()))
            .collect();
        ApiState {
            store,
            tokens: Arc::new(tokens),
            clock,
            metrics,
            ready,
        }
    }

    /// The provider whose token this is. Every token is compared, in
    /// constant time, so timing tells nothing about which one was close.
    fn provider_for(&self, headers: &HeaderMap) -> Option<String> {
        let given = headers
            .get(axum::http::header::AUTHORIZATION)?
            .to_str()
            .ok()?
            .strip_prefix("Bearer ")?
            .as_bytes();
        let mut found = None;
        for (id, token) in self.tokens.iter() {
            if bool::from(token.as_slice().ct_eq(given)) {
                found = Some(id.clone());
            }
        }
        found
    }
}

/// The API's routes.
pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/v1/alarms/{alarm_id}/progress", post(progress))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
}

async fn readyz(State(state): State<ApiState>) -> Response {
    if state.ready.is_ready() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "sources are not up yet\n").into_response()
    }
}

async fn metrics(State(state): State<ApiState>) -> Response {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        state.metrics.render(),
    )
        .into_response()
}

async fn progress(
    State(state): State<ApiState>,
    Path(alarm_id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Some(provider) = state.provider_for(&headers) else {
        return error(
            StatusCode::UNAUTHORIZED,
            "a valid provider bearer token is required",
        );
    };
    let Ok(id) = alarm_id.parse::<AlarmId>() else {
        return error(StatusCode::NOT_FOUND, "no such alarm");
    };
    let alarm = match state.store.alarm(id).await {
        Ok(Some(alarm)) => alarm,
        Ok(None) => return error(StatusCode::NOT_FOUND, "no such alarm"),
        Err(e) => return store_failed(&e),
    };
    let now = state.clock.now();
    match state.store.offered_to(id, &provider, now).await {
        Ok(true) => {}
        Ok(false) => return error(StatusCode::FORBIDDEN, "this alarm was not offered to you"),
        Err(e) => return store_failed(&e),
    }
    let report = match parse_report(&body, alarm.received_at, now) {
        Ok((state_, at, outcome)) => ProgressReport {
            alarm_id: id,
            provider,
            state: state_,
            at,
            reported_at: now,
            outcome,
        },
        Err((status, message)) => return error(status, message),
    };
    match state.store.record_progress(&report).await {
        Ok(ProgressResult::Backwards) => error(
            StatusCode::CONFLICT,
            "the alarm is already resolved; a state cannot go backwards",
        ),
        Ok(result) => {
            if result == ProgressResult::Recorded {
                Metrics::inc(&state.metrics.progress_reports);
                tracing::debug!(alarm_id = %id, provider = %report.provider, state = report.state.name(), "progress recorded");
            }
            (
                StatusCode::OK,
                Json(json!({"alarm_id": id.to_string(), "state": report.state.name()})),
            )
                .into_response()
        }
        Err(e) => store_failed(&e),
    }
}

fn store_failed(e: &crate::store::StoreError) -> Response {
    tracing::error!(error = %e, "progress API cannot reach the store");
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        "the store is unavailable; try again",
    )
}

type Parsed = (ProgressState, DateTime<Utc>, Option<String>);

/// Checks a progress body against the contract.
fn parse_report(
    body: &[u8],
    received_at: DateTime<Utc>,
    now: DateTime<Utc>,
) -> Result<Parsed, (StatusCode, String)> {
    let unprocessable = |m: &str| (StatusCode::UNPROCESSABLE_ENTITY, m.to_owned());
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| (StatusCode::BAD_REQUEST, format!("body is not JSON: {e}")))?;
    let Value::Object(obj) = value else {
        return Err(unprocessable("body must be a JSON object"));
    };
    let state = match obj.get("state").and_then(Value::as_str) {
        Some("answered") => ProgressState::Answered,
        Some("resolved") => ProgressState::Resolved,
        _ => return Err(unprocessable("state must be \"answered\" or \"resolved\"")),
    };
    let at = obj
        .get("at")
        .and_then(Value::as_str)
        .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
        .map(|t| t.with_timezone(&Utc))
        .ok_or_else(|| unprocessable("at must be an RFC 3339 timestamp"))?;
    // The store keeps milliseconds; compare at that precision.
    if at.timestamp_millis() < received_at.timestamp_millis() {
        return Err(unprocessable("at is before the alarm was received"));
    }
    if at > now + MAX_FUTURE {
        return Err(unprocessable("at is more than 60 s in the future"));
    }
    let outcome = match obj.get("outcome") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.chars().count() <= MAX_OUTCOME => Some(s.clone()),
        Some(_) => {
            return Err(unprocessable(
                "outcome must be a string of at most 1024 characters",
            ))
        }
    };
    Ok((state, at, outcome))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn bodies_are_checked_against_the_contract() {
        let recv = t("2026-11-22T10:00:00.000Z");
        let now = t("2026-11-22T10:05:00.000Z");
        let ok = parse_report(
            br#"{"state":"answered","at":"2026-11-22T10:00:30.000Z","outcome":"spoke"}"#,
            recv,
            now,
        )
        .unwrap();
        assert_eq!(ok.0, ProgressState::Answered);
        assert_eq!(ok.2.as_deref(), Some("spoke"));
        let code = |b: &str| parse_report(b.as_bytes(), recv, now).unwrap_err().0;
        assert_eq!(code("nope"), StatusCode::BAD_REQUEST);
        assert_eq!(code("[]"), StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(
            code(r#"{"state":"closed","at":"2026-11-22T10:00:30Z"}"#),
            StatusCode::UNPROCESSABLE_ENTITY
        );
        assert_eq!(
            code(r#"{"state":"answered"}"#),
            StatusCode::UNPROCESSABLE_ENTITY
        );
        assert_eq!(
            code(r#"{"state":"answered","at":"2026-11-22T09:59:59.999Z"}"#),
            StatusCode::UNPROCESSABLE_ENTITY
        );
        assert_eq!(
            code(r#"{"state":"answered","at":"2026-11-22T10:06:00.001Z"}"#),
            StatusCode::UNPROCESSABLE_ENTITY
        );
        assert!(parse_report(
            br#"{"state":"resolved","at":"2026-11-22T10:06:00.000Z"}"#,
            recv,
            now
        )
        .is_ok());
        assert_eq!(
            code(r#"{"state":"answered","at":"2026-11-22T10:01:00Z","outcome":5}"#),
            StatusCode::UNPROCESSABLE_ENTITY
        );
    }
}
