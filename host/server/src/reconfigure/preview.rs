//! Previewing an audience rule: its exact size over every stored profile, its overlap with each
//! configured audience, and sample profile ids; nothing changes.

use super::backfill::{for_each_profile, read_chunk};
use crate::api::{ApiError, AppState};
use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use std::sync::Arc;

/// Profiles whose ids a preview answers.
pub const SAMPLE: usize = 10;

/// `POST /v1/audiences/preview`: the body is a rule as written in the configuration file (TOML,
/// `rule = { ... }` or the inline table alone) or as JSON.
pub async fn post_preview(State(state): State<AppState>, body: String) -> Result<Json<serde_json::Value>, ApiError> {
    let model = state.config.model();
    let rule = starling_core::config::parse_rule(&model, &body).map_err(|errors| {
        let listed: Vec<String> = errors.0.iter().map(|d| d.to_string()).collect();
        ApiError::new(StatusCode::BAD_REQUEST, format!("the rule is not valid: {}", listed.join("; ")))
    })?;
    // Every answered request is in SQLite before the scan.
    state.ingest.materialize().await?;
    let started = std::time::Instant::now();
    let now = (state.clock)();
    let database = state.database.clone();
    let names: Vec<String> = model.audiences.iter().map(|a| a.name.clone()).collect();
    let scan_model = model.clone();
    let (size, profiles, overlap, sample) = tokio::task::spawn_blocking(move || {
        let conn = starling_store::open_reader(&database)?;
        let model = Arc::new(scan_model);
        let (mut size, mut profiles) = (0u64, 0u64);
        let mut overlap = vec![0u64; names.len()];
        let mut sample = Vec::new();
        let mut after = 0;
        loop {
            let (rows, last) = read_chunk(&conn, after)?;
            profiles += rows.len() as u64;
            // Each match: its id and the configured audiences it is in.
            let matched = for_each_profile(&rows, |stored| {
                let mut profile = stored.clone();
                starling_core::evolve::conform(&model, &mut profile);
                starling_core::engine::meets(&model, &profile, &rule, now).then(|| {
                    let member: Vec<bool> = names.iter().map(|n| profile.audiences.contains(n)).collect();
                    (profile.id, member)
                })
            })?;
            for (id, member) in matched {
                size += 1;
                for (i, m) in member.into_iter().enumerate() {
                    overlap[i] += u64::from(m);
                }
                if sample.len() < SAMPLE {
                    sample.push(id);
                }
            }
            match last {
                Some(last) => after = last,
                None => break,
            }
        }
        Ok::<_, starling_store::StoreError>((size, profiles, overlap, sample))
    })
    .await
    .map_err(|_| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "preview task failed"))??;
    let overlap: Vec<serde_json::Value> = model
        .audiences
        .iter()
        .zip(overlap)
        .map(|(a, n)| serde_json::json!({ "audience": a.name, "overlap": n }))
        .collect();
    Ok(Json(serde_json::json!({
        "size": size,
        "profiles": profiles,
        "overlap": overlap,
        "sample": sample,
        "elapsed_ms": started.elapsed().as_millis() as u64,
    })))
}
