//! Handler tests through `tower::ServiceExt::oneshot`: the router on a real SQLite file, no
//! network and no plugins.

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use starling_server::{App, Options};
use tower::ServiceExt;

const CONFIG: &str = r#"
[server]
audience_size_interval = "50ms"

[[attribute]]
name = "spend"
scope = "visitor"
type = "number"

[[enrichment]]
attribute = "spend"
op = "increment"
event = "total"

[[audience]]
name = "spenders"
rule = { attribute = "spend", op = ">", value = 10 }
"#;

async fn app(dir: &std::path::Path) -> App {
    let model = starling_core::parse(CONFIG).unwrap();
    App::start(Options { model, database: dir.join("t.db"), plugins: None, test_clock: false, admin_token: None }).await.unwrap()
}

async fn call(app: &App, method: &str, uri: &str, body: &str) -> (StatusCode, serde_json::Value, Option<String>) {
    let request = Request::builder()
        .method(method)
        .uri(uri)
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .unwrap();
    let response = app.router().oneshot(request).await.unwrap();
    let status = response.status();
    let retry_after = response.headers().get("retry-after").map(|v| v.to_str().unwrap().to_string());
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null), retry_after)
}

#[tokio::test(flavor = "multi_thread")]
async fn events_are_applied_and_visible() {
    let dir = tempfile::tempdir().unwrap();
    let app = app(dir.path()).await;
    let (status, body, _) = call(
        &app,
        "POST",
        "/v1/events",
        r#"{"events":[{"event":"buy","visitor_id":"a","data":{"total":7}},{"event":"buy","visitor_id":"a","data":{"total":5}}]}"#,
    )
    .await;
    assert_eq!((status, body), (StatusCode::ACCEPTED, serde_json::json!({"accepted": 2, "duplicates": 0})));
    let (status, profile, _) = call(&app, "GET", "/v1/profiles/a", "").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(profile["attributes"]["spend"], 12.0);
    assert_eq!(profile["audiences"], serde_json::json!(["spenders"]));
    let (_, audiences, _) = call(&app, "GET", "/v1/audiences", "").await;
    assert_eq!(
        audiences["audiences"][0],
        serde_json::json!({
            "name": "spenders",
            "size": 1,
            "reads": ["spend"],
            "time_relative": false,
            "rule": {"attribute": "spend", "op": ">", "value": 10.0},
        })
    );
    let (status, why, _) = call(&app, "GET", "/v1/profiles/a/explain/spenders", "").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!((why["member"].clone(), why["rule"]["actual"].clone()), (true.into(), 12.0.into()));
    let (status, _, _) = call(&app, "GET", "/v1/profiles/a/explain/nobody", "").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    // Sizes are sampled every 50 ms: the history goes from 0 (at start) to 1.
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let (status, history, _) = call(&app, "GET", "/v1/audiences/spenders/history", "").await;
    assert_eq!(status, StatusCode::OK);
    let sizes: Vec<i64> = history["samples"].as_array().unwrap().iter().map(|s| s["size"].as_i64().unwrap()).collect();
    assert!(sizes.len() >= 2 && sizes.last() == Some(&1), "{history}");
    let (status, body, _) = call(&app, "GET", "/v1/audiences/spenders/history?since=yesterday", "").await;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::BAD_REQUEST, Some("since: `yesterday` is not an RFC 3339 timestamp"))
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_event_id_is_applied_once() {
    let dir = tempfile::tempdir().unwrap();
    let app = app(dir.path()).await;
    let event = r#"{"event":"buy","visitor_id":"a","id":"order-1","data":{"total":7}}"#;
    let (_, first, _) = call(&app, "POST", "/v1/events", event).await;
    let (_, again, _) = call(&app, "POST", "/v1/events", &format!(r#"{{"events":[{event},{event}]}}"#)).await;
    assert_eq!(first, serde_json::json!({"accepted": 1, "duplicates": 0}));
    assert_eq!(again, serde_json::json!({"accepted": 0, "duplicates": 2}));
    let (_, profile, _) = call(&app, "GET", "/v1/profiles/a", "").await;
    assert_eq!(profile["attributes"]["spend"], 7.0);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_is_refused_with_the_field_named() {
    let dir = tempfile::tempdir().unwrap();
    let app = app(dir.path()).await;
    let (status, body, _) =
        call(&app, "POST", "/v1/events", r#"{"events":[{"event":"buy","visitor_id":"a"},{"event":"buy"}]}"#).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::BAD_REQUEST, Some("events[1].visitor_id: missing field"))
    );
    let (status, _, _) = call(&app, "GET", "/v1/profiles/a", "").await;
    assert_eq!(status, StatusCode::NOT_FOUND, "nothing from the rejected request was applied");
    let (status, body, _) = call(&app, "GET", "/v1/actions?status=lost", "").await;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::BAD_REQUEST, Some("status: `lost` is not one of pending, delivered, failed, cancelled"))
    );
    let big = format!(r#"{{"event":"buy","visitor_id":"a","data":{{"x":"{}"}}}}"#, "y".repeat(1_100_000));
    let (status, body, _) = call(&app, "POST", "/v1/events", &big).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::PAYLOAD_TOO_LARGE, Some("request body is larger than 1048576 bytes"))
    );
    app.stop().await;
}
