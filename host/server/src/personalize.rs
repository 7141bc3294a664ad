//! On-site personalization: `GET /v1/visitor/{id}`, a page reading its own visitor's audiences,
//! badges and the attributes `[personalization] expose` names (nothing else of the profile),
//! with a data source's key, from the origins the configuration allows, at a bounded rate per key.

use crate::api::{ApiError, AppState, read};
use crate::live::Live;
use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use starling_core::{Model, Profile};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const WINDOW: Duration = Duration::from_secs(60);

/// Requests per key in the current minute: a fixed window per key.
#[derive(Default)]
pub struct RateLimits {
    windows: Mutex<HashMap<String, (Instant, u32)>>,
}

impl RateLimits {
    /// Counts a request of `key`; `Err(seconds)` to wait when it is over `per_minute`.
    fn admit(&self, key: &str, per_minute: u32, now: Instant) -> Result<(), u64> {
        let mut windows = self.windows.lock().expect("rate windows");
        if windows.len() > 10_000 {
            windows.retain(|_, (start, _)| now.duration_since(*start) < WINDOW);
        }
        let (start, count) = windows.entry(key.to_string()).or_insert((now, 0));
        if now.duration_since(*start) >= WINDOW {
            (*start, *count) = (now, 0);
        }
        if *count >= per_minute {
            return Err((WINDOW - now.duration_since(*start)).as_secs().max(1));
        }
        *count += 1;
        Ok(())
    }
}

pub fn routes(state: &AppState) -> Router<AppState> {
    Router::new().route("/v1/visitor/{id}", get(get_visitor)).layer(cors(state.config.clone()))
}

/// Which pages may read their visitor: the allowed origins are read from the running
/// configuration at each request, so a reloaded list applies at once.
pub(crate) fn cors(live: Arc<Live>) -> tower_http::cors::CorsLayer {
    let origins = tower_http::cors::AllowOrigin::predicate(move |origin: &HeaderValue, _| {
        let origins = &live.model().personalization.origins;
        origins.iter().any(|o| o == "*" || origin.as_bytes() == o.as_bytes())
    });
    tower_http::cors::CorsLayer::new()
        .allow_origin(origins)
        .allow_methods([axum::http::Method::GET])
        .allow_headers([header::AUTHORIZATION, header::HeaderName::from_static("x-api-key")])
        .max_age(Duration::from_secs(600))
}

async fn get_visitor(State(state): State<AppState>, Path(id): Path<String>, headers: HeaderMap) -> Response {
    if let Some(refused) = refusal(&state.config, &state.personalization, &headers) {
        return refused;
    }
    let lookup = id.clone();
    match read(&state, move |c| starling_store::find_profile(c, &lookup)).await {
        Ok(profile) => view(&state.config.model(), &id, profile),
        Err(e) => e.into_response(),
    }
}

/// Checks a personalization request's source key and counts it against the key's minute: the
/// answer refusing it, if it is refused.
pub(crate) fn refusal(live: &Live, limits: &RateLimits, headers: &HeaderMap) -> Option<Response> {
    let key_source = match live.keys().check_source(headers) {
        Ok(source) => source,
        Err(denied) => {
            let mut response = ApiError::new(StatusCode::UNAUTHORIZED, denied.message()).into_response();
            response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("ApiKey"));
            return Some(response);
        }
    };
    let per_minute = live.model().personalization.requests_per_minute;
    if let Err(wait) = limits.admit(key_source.as_deref().unwrap_or(""), per_minute, Instant::now()) {
        let message = format!("more than {per_minute} personalization requests this minute for this key");
        let mut response =
            (StatusCode::TOO_MANY_REQUESTS, axum::Json(serde_json::json!({"error": message}))).into_response();
        response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(wait));
        return Some(response);
    }
    None
}

/// What a page may read of its visitor `id`, whose profile (if any) was read.
pub(crate) fn view(model: &Model, id: &str, profile: Option<Profile>) -> Response {
    let view = match profile {
        None => serde_json::json!({"id": id, "known": false, "audiences": [], "badges": [], "attributes": {}}),
        Some(mut profile) => {
            starling_core::evolve::conform(model, &mut profile);
            let attributes: serde_json::Map<String, serde_json::Value> = model
                .personalization
                .expose
                .iter()
                .filter_map(|name| profile.attributes.get(name).map(|v| (name.clone(), v.to_json())))
                .collect();
            serde_json::json!({
                "id": id,
                "known": true,
                "audiences": profile.audiences,
                "badges": profile.badges,
                "attributes": attributes,
            })
        }
    };
    let mut response = axum::Json(view).into_response();
    // What a visitor is changes with every event: a page must not read a stale copy.
    response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store, private"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_key_has_its_own_minute() {
        let limits = RateLimits::default();
        let t0 = Instant::now();
        assert_eq!(limits.admit("web", 2, t0), Ok(()));
        assert_eq!(limits.admit("web", 2, t0), Ok(()));
        assert_eq!(limits.admit("web", 2, t0 + Duration::from_secs(15)), Err(45));
        assert_eq!(limits.admit("app", 2, t0), Ok(()), "another key is counted apart");
        assert_eq!(limits.admit("web", 2, t0 + WINDOW), Ok(()), "a new minute starts over");
    }
}
