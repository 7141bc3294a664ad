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
    app_with(CONFIG, dir).await
}

/// A server on configuration `config` with its database in `dir`: no plugins, no admin token.
async fn app_with(config: &str, dir: &std::path::Path) -> App {
    let model = starling_core::parse(config).unwrap();
    App::start(Options {
        model,
        database: dir.join("t.db"),
        plugins: None,
        test_clock: false,
        admin_token: None,
        event_log: None,
        config_path: None,
        trusted_keys: None,
        outcomes: None,
        spread: None,
    })
    .await
    .unwrap()
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
            "backfill": null,
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

const OPERATIONS: &str = r#"
[server]
admin_token = "admin-token-0123456789"

[[source]]
name = "web"
api_key = "web-key-0123456789"

[[source]]
name = "store"
api_key = "store-key-0123456789"

[[attribute]]
name = "email_hash"
scope = "visitor"
type = "visitor_id"

[[attribute]]
name = "store_spend"
scope = "omnichannel"
type = "number"

[[attribute]]
name = "spend"
scope = "visitor"
type = "number"

[[enrichment]]
attribute = "email_hash"
op = "set"
event = "email_hash"

[[enrichment]]
attribute = "spend"
op = "increment"
event = "total"

[[enrichment]]
attribute = "store_spend"
op = "increment"
event = "amount"
when = "event:store_purchase"

[[audience]]
name = "store_buyers"
rule = { attribute = "store_spend", op = ">", value = 100 }

[[event_spec]]
event = "purchase"
fields = { order_id = "string", total = "number", coupon = "string?" }

[[event_spec]]
event = "search"
on_violation = "warn"
allow_other_fields = false
fields = { query = "string" }

[[import]]
name = "store_purchases"
event = "store_purchase"
match = "email_hash"
columns = { amount = "number", store = "string" }
"#;

const ADMIN: &str = "Bearer admin-token-0123456789";

async fn operations_app(dir: &std::path::Path) -> App {
    let model = starling_core::parse(OPERATIONS).unwrap();
    App::start(Options {
        model,
        database: dir.join("t.db"),
        plugins: None,
        test_clock: false,
        admin_token: None,
        event_log: None,
        config_path: None,
        trusted_keys: None,
        outcomes: None,
        spread: None,
    })
    .await
    .unwrap()
}

async fn send(
    app: &App,
    method: &str,
    uri: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (StatusCode, serde_json::Value, axum::http::HeaderMap) {
    let mut request = Request::builder().method(method).uri(uri);
    for (k, v) in headers {
        request = request.header(*k, *v);
    }
    let response = app.router().oneshot(request.body(Body::from(body.to_string())).unwrap()).await.unwrap();
    let (status, headers) = (response.status(), response.headers().clone());
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    let body = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(&bytes).into_owned()));
    (status, body, headers)
}

#[tokio::test(flavor = "multi_thread")]
async fn ingestion_needs_a_source_key_and_everything_else_the_admin_token() {
    let dir = tempfile::tempdir().unwrap();
    let app = operations_app(dir.path()).await;
    let event = r#"{"event":"view","visitor_id":"a"}"#;
    let (status, body, headers) = send(&app, "POST", "/v1/events", &[], event).await;
    assert_eq!((status, body["error"].as_str()), (StatusCode::UNAUTHORIZED, Some("API key (X-Api-Key) required")));
    assert_eq!(headers["www-authenticate"], "ApiKey");
    let (status, body, _) = send(&app, "POST", "/v1/events", &[("x-api-key", "nope-nope-nope-nope")], event).await;
    assert_eq!((status, body["error"].as_str()), (StatusCode::UNAUTHORIZED, Some("API key is not valid")));
    let (status, _, _) = send(&app, "POST", "/v1/events", &[("authorization", ADMIN)], event).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "the admin token is not an ingestion key");
    let (status, body, _) = send(&app, "POST", "/v1/events", &[("x-api-key", "web-key-0123456789")], event).await;
    assert_eq!((status, body), (StatusCode::ACCEPTED, serde_json::json!({"accepted": 1, "duplicates": 0})));
    // A key speaks for its own source only.
    let claimed =
        r#"{"events":[{"event":"view","visitor_id":"a"},{"event":"view","visitor_id":"a","source":"store"}]}"#;
    let (status, body, _) = send(&app, "POST", "/v1/events", &[("x-api-key", "web-key-0123456789")], claimed).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::BAD_REQUEST, Some("events[1].source: `store` is not the data source of this API key (`web`)"))
    );

    for uri in ["/v1/profiles/a", "/v1/audiences", "/metrics", "/v1/audit", "/v1/plugins"] {
        let (status, body, _) = send(&app, "GET", uri, &[], "").await;
        assert_eq!(
            (status, body["error"].as_str()),
            (StatusCode::UNAUTHORIZED, Some("admin token (Authorization: Bearer) required")),
            "{uri}"
        );
        let (status, _, _) = send(&app, "GET", uri, &[("authorization", "Bearer admin-token-012345678")], "").await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{uri}: a near miss is refused");
        let (status, _, _) = send(&app, "GET", uri, &[("authorization", ADMIN)], "").await;
        assert_eq!(status, StatusCode::OK, "{uri}");
    }
    let (_, profile, _) = send(&app, "GET", "/v1/profiles/a", &[("authorization", ADMIN)], "").await;
    assert_eq!(profile["event_count"], 1, "the refused batch left nothing behind");
    for open in ["/healthz", "/openapi.json", "/admin"] {
        assert_eq!(send(&app, "GET", open, &[], "").await.0, StatusCode::OK, "{open}");
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn event_specs_reject_or_warn_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let app = operations_app(dir.path()).await;
    let key = [("x-api-key", "web-key-0123456789")];
    let good = r#"{"event":"purchase","visitor_id":"a","data":{"order_id":"o1","total":5}}"#;
    assert_eq!(send(&app, "POST", "/v1/events", &key, good).await.0, StatusCode::ACCEPTED);
    let bad = r#"{"events":[{"event":"purchase","visitor_id":"b","data":{"order_id":"o2","total":5}},
        {"event":"purchase","visitor_id":"b","data":{"total":"5","coupon":7}}]}"#;
    let (status, body, _) = send(&app, "POST", "/v1/events", &key, bad).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(
        body["error"],
        "events[1].data.coupon: expected string by the `purchase` spec, found a number; \
         events[1].data.order_id: required by the `purchase` spec, missing; \
         events[1].data.total: expected number by the `purchase` spec, found a string"
    );
    assert_eq!(send(&app, "GET", "/v1/profiles/b", &[("authorization", ADMIN)], "").await.0, StatusCode::NOT_FOUND);
    let warned = r#"{"event":"search","visitor_id":"c","data":{"query":"shoes","page":2}}"#;
    let (status, body, _) = send(&app, "POST", "/v1/events", &key, warned).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(body["warnings"], serde_json::json!(["data.page: not a field of the `search` spec"]));
    assert_eq!(send(&app, "GET", "/v1/profiles/c", &[("authorization", ADMIN)], "").await.0, StatusCode::OK);
    let (_, metrics, _) = send(&app, "GET", "/metrics", &[("authorization", ADMIN)], "").await;
    let metrics = metrics.as_str().unwrap();
    for line in [
        "starling_events_accepted_total 2",
        "starling_events_rejected_total{reason=\"spec\"} 1",
        "starling_event_spec_warnings_total 1",
        "starling_ingest_queue_depth{partition=\"0\"} 0",
        "starling_audience_size{name=\"store_buyers\"} 0",
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line} not in\n{metrics}");
    }
    assert!(metrics.contains("starling_event_apply_seconds_count 2"), "{metrics}");
    assert!(metrics.contains("# TYPE starling_commit_seconds histogram"), "{metrics}");
    assert!(metrics.contains("# TYPE starling_early_write_seconds histogram"), "{metrics}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_offline_file_fills_omnichannel_attributes_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let app = operations_app(dir.path()).await;
    let key = [("x-api-key", "web-key-0123456789")];
    for (visitor, hash) in [("a", "hash-0001"), ("b", "hash-0002")] {
        let event = format!(r#"{{"event":"login","visitor_id":"{visitor}","data":{{"email_hash":"{hash}"}}}}"#);
        assert_eq!(send(&app, "POST", "/v1/events", &key, &event).await.0, StatusCode::ACCEPTED);
    }
    let file = "email_hash,amount,store\nhash-0001,80,Oslo\nhash-0002,oops,Oslo\nhash-0009,5,Oslo\nhash-0001,30,Bergen\nhash-0002,7,Oslo\n";
    let sha = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(file.as_bytes()));
    let admin = [("authorization", ADMIN), ("content-type", "text/csv")];
    // The first two rows arrive, then the upload is cut off.
    let part = "email_hash,amount,store\nhash-0001,80,Oslo\nhash-0002,oops,Oslo\n";
    let (status, summary, _) =
        send(&app, "POST", &format!("/v1/imports/store_purchases?file={sha}"), &admin, part).await;
    assert_eq!(status, StatusCode::OK, "{summary}");
    assert_eq!((summary["applied"].as_i64(), summary["rejected_count"].as_i64()), (Some(1), Some(1)));
    assert_eq!(
        summary["rejected"][0],
        serde_json::json!({"row": 2, "line": 3, "reason": "amount: `oops` is not a number"})
    );
    // Sent again whole, it continues after row 2.
    let (_, summary, _) = send(&app, "POST", "/v1/imports/store_purchases", &admin, file).await;
    assert_eq!(
        (summary["skipped"].as_i64(), summary["applied"].as_i64(), summary["unmatched"].as_i64()),
        (Some(2), Some(2), Some(1)),
        "{summary}"
    );
    assert_eq!(summary["progress"], serde_json::json!({"rows_done": 5, "applied": 3, "unmatched": 1, "rejected": 1}));
    let (_, progress, _) =
        send(&app, "GET", &format!("/v1/imports/store_purchases/{sha}"), &[("authorization", ADMIN)], "").await;
    assert_eq!(progress["progress"]["rows_done"], 5);
    let (_, a, _) = send(&app, "GET", "/v1/profiles/hash-0001", &[("authorization", ADMIN)], "").await;
    assert_eq!((a["id"].as_str(), a["attributes"]["store_spend"].as_f64()), (Some("a"), Some(110.0)));
    assert_eq!(a["audiences"], serde_json::json!(["store_buyers"]), "imports evaluate audiences");
    let (_, before, _) = send(&app, "GET", "/v1/profiles/b", &[("authorization", ADMIN)], "").await;
    assert_eq!(before["attributes"]["store_spend"], 7.0);
    assert_eq!(
        send(&app, "GET", "/v1/profiles/hash-0009", &[("authorization", ADMIN)], "").await.0,
        StatusCode::NOT_FOUND
    );

    // A form upload; the format comes from the file name.
    let form = "--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"more.jsonl\"\r\n\r\n\
        {\"email_hash\":\"hash-0002\",\"amount\":3}\n\r\n--XyZ--\r\n";
    let multipart = [("authorization", ADMIN), ("content-type", "multipart/form-data; boundary=XyZ")];
    let (status, summary, _) = send(&app, "POST", "/v1/imports/store_purchases", &multipart, form).await;
    assert_eq!((status, summary["applied"].as_i64()), (StatusCode::OK, Some(1)), "{summary}");
    let (_, b, _) = send(&app, "GET", "/v1/profiles/b", &[("authorization", ADMIN)], "").await;
    assert_eq!(b["attributes"]["store_spend"], 10.0);

    let (status, body, _) = send(&app, "POST", "/v1/imports/nope", &admin, file).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::NOT_FOUND, Some("no import definition `nope` (configured: store_purchases)"))
    );
    let (status, body, _) = send(&app, "POST", "/v1/imports/store_purchases", &admin, "id,amount\n1,2\n").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body["error"].as_str().unwrap().contains("no `email_hash` column"), "{body}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn deleting_a_person_removes_every_trace_and_keeps_an_anonymous_audit_record() {
    let dir = tempfile::tempdir().unwrap();
    let app = operations_app(dir.path()).await;
    let key = [("x-api-key", "web-key-0123456789")];
    let admin = [("authorization", ADMIN)];
    for (visitor, hash) in [("a", "hash-0001"), ("phone-a", "hash-0001"), ("b", "hash-0002")] {
        let event =
            format!(r#"{{"event":"login","visitor_id":"{visitor}","data":{{"email_hash":"{hash}","total":3}}}}"#);
        assert_eq!(send(&app, "POST", "/v1/events", &key, &event).await.0, StatusCode::ACCEPTED);
    }
    let (status, body, _) = send(&app, "DELETE", "/v1/profiles/phone-a", &admin, "").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["audit"]["reason"], "request");
    assert_eq!(body["audit"]["ids"], 3);
    assert_eq!(body["audit"]["removed"]["events"], 2);
    assert!(!body.to_string().contains("hash-0001") && !body.to_string().contains("phone-a"), "{body}");
    for id in ["a", "phone-a", "hash-0001"] {
        assert_eq!(send(&app, "GET", &format!("/v1/profiles/{id}"), &admin, "").await.0, StatusCode::NOT_FOUND, "{id}");
    }
    assert_eq!(send(&app, "GET", "/v1/profiles/b", &admin, "").await.0, StatusCode::OK, "others stay");
    assert_eq!(send(&app, "DELETE", "/v1/profiles/a", &admin, "").await.0, StatusCode::NOT_FOUND);
    let conn = rusqlite::Connection::open(dir.path().join("t.db")).unwrap();
    let dump: String = conn
        .query_row(
            "SELECT group_concat(x, '|') FROM (SELECT id || data AS x FROM profiles UNION ALL SELECT visitor_id || profile_id FROM identities
             UNION ALL SELECT profile_id || data || coalesce(visitor_id, '') FROM events
             UNION ALL SELECT profile_id || visitor_id || coalesce(other_id, '') FROM identity_links
             UNION ALL SELECT detail FROM audit_log)",
            [],
            |r| r.get(0),
        )
        .unwrap();
    for gone in ["phone-a", "hash-0001", "\"a\""] {
        assert!(!dump.contains(gone), "{gone} still in the database: {dump}");
    }
    assert!(dump.contains("hash-0002"), "the other person is still there");
    let (_, audit, _) = send(&app, "GET", "/v1/audit", &admin, "").await;
    assert_eq!(audit["audit"][0]["kind"], "profile_deleted");
    // A re-used id starts a new, empty profile.
    let event = r#"{"event":"view","visitor_id":"a"}"#;
    assert_eq!(send(&app, "POST", "/v1/events", &key, event).await.0, StatusCode::ACCEPTED);
    let (_, fresh, _) = send(&app, "GET", "/v1/profiles/a", &admin, "").await;
    assert_eq!((fresh["event_count"].as_i64(), fresh["attributes"].get("email_hash")), (Some(1), None));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_trace_streams_each_step_of_a_visitors_events() {
    let dir = tempfile::tempdir().unwrap();
    let app = operations_app(dir.path()).await;
    let request = Request::get("/v1/trace/hash-0001").header("authorization", ADMIN).body(Body::empty()).unwrap();
    let response = app.router().oneshot(request).await.unwrap();
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let mut body = response.into_body();
    let mut text = String::new();
    let mut read_until = async |marker: &str, text: &mut String| {
        while !text.contains(marker) {
            let frame =
                tokio::time::timeout(std::time::Duration::from_secs(10), body.frame()).await.unwrap().unwrap().unwrap();
            if let Ok(data) = frame.into_data() {
                text.push_str(&String::from_utf8_lossy(&data));
            }
        }
    };
    read_until("event: tracing", &mut text).await;
    let key = [("x-api-key", "web-key-0123456789")];
    let other = r#"{"event":"view","visitor_id":"zzz"}"#;
    assert_eq!(send(&app, "POST", "/v1/events", &key, other).await.0, StatusCode::ACCEPTED);
    let login = r#"{"event":"login","visitor_id":"hash-0001","data":{"email_hash":"hash-0001","total":4}}"#;
    assert_eq!(send(&app, "POST", "/v1/events", &key, login).await.0, StatusCode::ACCEPTED);
    read_until("event: committed", &mut text).await;
    let steps: Vec<serde_json::Value> =
        text.lines().filter_map(|l| l.strip_prefix("data: ")).map(|d| serde_json::from_str(d).unwrap()).collect();
    let names: Vec<&str> = steps.iter().map(|s| s["step"].as_str().unwrap()).collect();
    assert_eq!(names, ["tracing", "received", "enriched", "evaluated", "queued", "committed"]);
    assert_eq!(steps[1]["event"], "login");
    assert_eq!(steps[2]["changed"]["spend"], 4.0);
    assert_eq!(steps[2]["changed"]["email_hash"], "hash-0001");
    assert!(!text.contains("zzz"), "other visitors are not traced");
    app.stop().await;
}

/// Every route the router serves is in the OpenAPI document with the same methods, and every
/// operation of the document reaches a handler.
#[tokio::test(flavor = "multi_thread")]
async fn the_openapi_document_matches_the_router() {
    let doc: serde_json::Value = serde_json::from_str(starling_server::api::OPENAPI).unwrap();
    let source = [
        include_str!("../src/api.rs"),
        include_str!("../src/wire.rs"),
        include_str!("../src/personalize.rs"),
        include_str!("../src/node.rs"),
    ]
    .concat();
    let route = regex::Regex::new(r#"^\s*"([^"]+)",\s*([a-z]+)\(([^\n]*)"#).unwrap();
    let chained = regex::Regex::new(r"\)\.(get|post|delete|put|patch)\(").unwrap();
    let mut served = std::collections::BTreeSet::new();
    for path in starling_server::wire::SEGMENT_PATHS {
        served.insert((format!("/v1/{path}"), "post".to_string()));
    }
    for c in source.split(".route(").filter_map(|piece| route.captures(piece)) {
        let path = c[1].to_string();
        served.insert((path.clone(), c[2].to_string()));
        for m in chained.captures_iter(&c[3]) {
            served.insert((path.clone(), m[1].to_string()));
        }
    }
    let documented: std::collections::BTreeSet<(String, String)> = doc["paths"]
        .as_object()
        .unwrap()
        .iter()
        .flat_map(|(path, ops)| ops.as_object().unwrap().keys().map(move |m| (path.clone(), m.clone())))
        .collect();
    assert_eq!(served, documented, "routes in api.rs vs paths in openapi.json");

    let dir = tempfile::tempdir().unwrap();
    let model = starling_core::parse(OPERATIONS).unwrap();
    let app = App::start(Options {
        model,
        database: dir.path().join("t.db"),
        plugins: None,
        test_clock: true,
        admin_token: None,
        event_log: None,
        config_path: None,
        trusted_keys: None,
        outcomes: None,
        spread: None,
    })
    .await
    .unwrap();
    let parameter = regex::Regex::new(r"\{[^}]+\}").unwrap();
    for (path, method) in &documented {
        if path == "/v1/trace/{id}" {
            continue; // an endless stream; covered by its own test
        }
        let uri = parameter.replace_all(path, "x");
        let (status, body, _) = send(
            &app,
            &method.to_uppercase(),
            &uri,
            &[("authorization", ADMIN), ("x-api-key", "web-key-0123456789")],
            "{}",
        )
        .await;
        let unrouted = status == StatusCode::METHOD_NOT_ALLOWED || (status == StatusCode::NOT_FOUND && body.is_null());
        assert!(!unrouted, "{method} {path}: {status}");
        let declared = &doc["paths"][path][method]["responses"];
        assert!(declared.get(status.as_str()).is_some(), "{method} {path} answered {status}, not documented: {body}");
    }
    app.stop().await;
}

/// A log that forgets nothing, so that a test can apply it again from the start; it refuses
/// appends while `full` is set, as a full disk would.
#[derive(Default)]
struct KeepAll(starling_log::MemoryLog, std::sync::atomic::AtomicBool);

impl KeepAll {
    fn fill(&self, full: bool) {
        self.1.store(full, std::sync::atomic::Ordering::SeqCst);
    }
}

impl starling_log::EventLog for KeepAll {
    fn append(&self, records: &[(u16, &[u8])]) -> starling_log::Result<Vec<u64>> {
        if self.1.load(std::sync::atomic::Ordering::SeqCst) {
            let source = std::io::Error::from_raw_os_error(28);
            return Err(starling_log::LogError::Io { path: "test log".into(), source });
        }
        self.0.append(records)
    }
    fn sync(&self, position: u64) -> starling_log::Result<()> {
        self.0.sync(position)
    }
    fn read(&self, after: &[(u16, u64)], visit: &mut dyn FnMut(starling_log::Entry)) -> starling_log::Result<()> {
        self.0.read(after, visit)
    }
    fn truncate_before(&self, _position: u64) -> starling_log::Result<u64> {
        Ok(0)
    }
    fn seal(&self) -> starling_log::Result<()> {
        Ok(())
    }
    fn next_position(&self) -> u64 {
        self.0.next_position()
    }
    fn continue_after(&self, position: u64) {
        self.0.continue_after(position)
    }
    fn size_bytes(&self) -> u64 {
        self.0.size_bytes()
    }
}

/// A connector component from WAT that accepts every call (no guest toolchain needed).
fn hook_plugin(dir: &std::path::Path) -> std::path::PathBuf {
    const CONNECTOR: &str = r#"(module
      (memory (export "memory") 2)
      (global $next (mut i32) (i32.const 8192))
      (func (export "cabi_realloc") (param i32 i32 i32 i32) (result i32) (global.get $next))
      (func (export "starling:plugin/deliver@0.2.0#describe") (result i32) (i32.const 1024))
      (func (export "starling:plugin/deliver@0.2.0#deliver") (param i32 i32) (result i32) (i32.const 1024)))"#;
    let mut module = wat::parse_str(CONNECTOR).unwrap();
    let mut resolve = wit_parser::Resolve::default();
    let (package, _) = resolve.push_dir(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../wit")).unwrap();
    let world = resolve.select_world(&[package], Some("connector")).unwrap();
    wit_component::embed_component_metadata(&mut module, &resolve, world, wit_component::StringEncoding::UTF8).unwrap();
    let plugins = dir.join("plugins");
    std::fs::create_dir_all(plugins.join("hook")).unwrap();
    std::fs::write(plugins.join("hook/c.wasm"), starling_runtime::componentize(&module).unwrap()).unwrap();
    std::fs::write(
        plugins.join("hook/plugin.toml"),
        "name = \"hook\"\nversion = \"0.1.0\"\nkind = \"connector\"\nworld = \"starling:plugin/connector@0.2.0\"\ncomponent = \"c.wasm\"\n",
    )
    .unwrap();
    plugins
}

/// An enricher built against `starling:plugin@0.1.0`, which has no visit end, named in a
/// configuration that runs it at one: refused by name and position, not left never to run.
#[test]
fn an_enricher_of_the_first_interface_is_not_run_at_a_visits_end() {
    const OLD_ENRICHER: &str = r#"(module
      (memory (export "memory") 2)
      (global $next (mut i32) (i32.const 8192))
      (func (export "cabi_realloc") (param i32 i32 i32 i32) (result i32) (global.get $next))
      (func (export "starling:plugin/enrich@0.1.0#enrich") (param i32) (result i32) (i32.const 1024)))"#;
    let dir = tempfile::tempdir().unwrap();
    let mut module = wat::parse_str(OLD_ENRICHER).unwrap();
    let mut resolve = wit_parser::Resolve::default();
    let (package, _) = resolve.push_dir(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../wit")).unwrap();
    let world = resolve.select_world(&[package], Some("starling:plugin/enricher@0.1.0")).unwrap();
    wit_component::embed_component_metadata(&mut module, &resolve, world, wit_component::StringEncoding::UTF8).unwrap();
    std::fs::write(dir.path().join("c.wasm"), starling_runtime::componentize(&module).unwrap()).unwrap();
    let manifest = dir.path().join("plugin.toml");
    std::fs::write(
        &manifest,
        "name = \"old\"\nversion = \"0.1.0\"\nkind = \"enricher\"\nworld = \"starling:plugin/enricher@0.1.0\"\ncomponent = \"c.wasm\"\n",
    )
    .unwrap();
    let plugins = starling_runtime::PluginHost::new().unwrap();
    plugins.load(&manifest, Default::default()).unwrap();
    let config = |when: &str| {
        starling_core::parse(&format!("[[attribute]]\nname = \"tier\"\nscope = \"visitor\"\ntype = \"string\"\n\n[[enricher]]\nplugin = \"old\"\nwhen = {when}\n"))
            .unwrap()
    };
    let problems = starling_server::check_plugins(&config(r#"["any", "visit_ended"]"#), &plugins);
    let messages: Vec<String> = problems.iter().map(ToString::to_string).collect();
    assert_eq!(messages.len(), 1, "{messages:?}");
    assert!(messages[0].starts_with("7:10: plugin `old` implements `starling:plugin/enricher@0.1.0`"), "{messages:?}");
    assert!(messages[0].contains("visit_ended"), "{messages:?}");
    assert!(starling_server::check_plugins(&config(r#"["any"]"#), &plugins).is_empty(), "run on events, it is fine");
}

const REPLAYED: &str = r#"
[server]
partitions = 2

[[attribute]]
name = "email_hash"
scope = "visitor"
type = "visitor_id"

[[attribute]]
name = "spend"
scope = "visitor"
type = "number"

[[enrichment]]
attribute = "email_hash"
op = "set"
event = "email_hash"
when = "event:login"

[[enrichment]]
attribute = "spend"
op = "increment"
event = "total"

[[audience]]
name = "spenders"
rule = { attribute = "spend", op = ">", value = 10 }

[[action]]
name = "welcome"
trigger = "joined"
audience = "spenders"
connector = "hook"

[[action]]
name = "forget"
trigger = "deleted"
connector = "hook"
"#;

/// A server on `database` in `dir` running [`REPLAYED`] with `plugins`, over `log`.
async fn replaying(
    dir: &std::path::Path,
    plugins: &std::path::Path,
    log: &std::sync::Arc<KeepAll>,
    database: &str,
) -> App {
    App::start(Options {
        model: starling_core::parse(REPLAYED).unwrap(),
        database: dir.join(database),
        plugins: Some(plugins.to_path_buf()),
        test_clock: false,
        admin_token: None,
        event_log: Some(log.clone()),
        config_path: None,
        trusted_keys: None,
        outcomes: None,
        spread: None,
    })
    .await
    .unwrap()
}

/// Everything the state derived from the log holds, row by row, without what only says when
/// or in which order rows were written (row ids, delivery attempts, and how early a profile's
/// wake-up was scheduled, which depends on how its events fell into batches).
fn state_of(database: &std::path::Path) -> Vec<String> {
    let conn = rusqlite::Connection::open(database).unwrap();
    let mut rows = Vec::new();
    for sql in [
        "SELECT 'profile ' || id || ' ' || json_remove(data, '$.scheduled_wakeup_ms') || ' ' || updated_ms FROM profiles",
        "SELECT 'id ' || visitor_id || ' ' || profile_id FROM identities",
        "SELECT 'member ' || profile_id || ' ' || audience || ' ' || joined_ms FROM memberships",
        "SELECT 'action ' || action || ' ' || trigger || ' ' || audience || ' ' || profile_id || ' ' || occurred_ms
             || ' ' || payload || ' ' || origin FROM outbox",
        "SELECT 'event ' || profile_id || ' ' || name || ' ' || data || ' ' || coalesce(event_id, '') FROM events",
        "SELECT 'seen ' || event_id || ' ' || seen_ms FROM seen_events",
        "SELECT 'wakeup ' || profile_id FROM wakeups",
    ] {
        let mut stmt = conn.prepare(sql).unwrap();
        rows.extend(stmt.query_map([], |r| r.get::<_, String>(0)).unwrap().map(Result::unwrap));
    }
    rows.sort();
    rows
}

#[tokio::test(flavor = "multi_thread")]
async fn the_same_log_applied_twice_from_scratch_gives_the_same_state() {
    let dir = tempfile::tempdir().unwrap();
    let plugins = hook_plugin(dir.path());
    let log: std::sync::Arc<KeepAll> = Default::default();
    let start = |database: &'static str| replaying(dir.path(), &plugins, &log, database);
    let live = start("live.db").await;
    for person in 0..12 {
        let hash = format!("hash-{person:04}");
        for (device, total) in [("web", 4), ("phone", 9)] {
            let visitor = format!("{device}-{person}");
            let events = format!(
                r#"{{"events":[{{"event":"view","visitor_id":"{visitor}","id":"{visitor}-1","data":{{"total":{total}}}}},
                    {{"event":"login","visitor_id":"{visitor}","id":"{visitor}-2","data":{{"email_hash":"{hash}"}}}}]}}"#
            );
            assert_eq!(call(&live, "POST", "/v1/events", &events).await.0, StatusCode::ACCEPTED);
        }
    }
    let again = r#"{"events":[{"event":"view","visitor_id":"web-1","id":"web-1-1","data":{"total":100}}]}"#;
    assert_eq!(call(&live, "POST", "/v1/events", again).await.1["duplicates"], 1);
    assert_eq!(call(&live, "DELETE", "/v1/profiles/phone-3", "").await.0, StatusCode::OK);
    live.stop().await;
    let expected = state_of(&dir.path().join("live.db"));
    assert!(expected.iter().any(|r| r.starts_with("action welcome")), "{expected:#?}");
    assert!(expected.iter().any(|r| r.starts_with("action forget")), "{expected:#?}");
    assert!(expected.iter().filter(|r| r.starts_with("profile ")).count() < 24, "profiles were stitched");

    for database in ["first.db", "second.db"] {
        start(database).await.stop().await;
        let replayed = state_of(&dir.path().join(database));
        assert_eq!(replayed, expected, "{database} rebuilt from the log");
    }
}

/// Under concurrent load both workers apply side by side, and people's two devices stitch
/// while events for both keep coming: the log then holds independent records (applied again
/// side by side) and records that claimed or stitched ids (applied again in log order), and
/// applied again from scratch it gives the state the live run derived.
#[tokio::test(flavor = "multi_thread")]
async fn a_log_written_under_concurrent_load_applies_again_to_the_same_state() {
    let dir = tempfile::tempdir().unwrap();
    let plugins = hook_plugin(dir.path());
    let log: std::sync::Arc<KeepAll> = Default::default();
    let start = |database: &'static str| replaying(dir.path(), &plugins, &log, database);
    let live = start("live.db").await;
    let person = async |person: usize| {
        let hash = format!("hash-{person:04}");
        for round in 0..4 {
            for device in ["web", "phone"] {
                let visitor = format!("{device}-{person}");
                let login = match round {
                    1 => format!(
                        r#",{{"event":"login","visitor_id":"{visitor}","id":"{visitor}-login","data":{{"email_hash":"{hash}"}}}}"#
                    ),
                    _ => String::new(),
                };
                let events = format!(
                    r#"{{"events":[{{"event":"view","visitor_id":"{visitor}","id":"{visitor}-{round}","data":{{"total":3}}}}{login}]}}"#
                );
                assert_eq!(call(&live, "POST", "/v1/events", &events).await.0, StatusCode::ACCEPTED);
            }
        }
    };
    futures_util::future::join_all((0..40).map(person)).await;
    live.stop().await;
    let expected = state_of(&dir.path().join("live.db"));
    assert_eq!(expected.iter().filter(|r| r.starts_with("profile ")).count(), 40, "each person's devices stitched");

    let independent = independent_records(&log);
    assert!(independent.0 > 0 && independent.1 > 0, "independent and other records: {independent:?}");

    start("again.db").await.stop().await;
    assert_eq!(state_of(&dir.path().join("again.db")), expected, "rebuilt from the log");
}

/// A merge applied again reads the profile it absorbs from the database: it waits for every
/// record before it, here a long run of another worker's records ending with the absorbed
/// profile's own events, even though the merge's worker has nothing else to do.
#[tokio::test(flavor = "multi_thread")]
async fn a_merge_applied_again_waits_for_the_records_before_it() {
    let dir = tempfile::tempdir().unwrap();
    let plugins = hook_plugin(dir.path());
    let log: std::sync::Arc<KeepAll> = Default::default();
    let start = |database: &'static str| replaying(dir.path(), &plugins, &log, database);
    let worker = |id: &str| starling_log::partition_of(id) as usize % 2;
    // Two devices of one person, on different workers, and others on the phone's worker.
    let (web, phone) = ("web-x", (0..).map(|i| format!("phone-{i}")).find(|p| worker(p) != worker("web-x")).unwrap());
    let others: Vec<String> =
        (0..).map(|i| format!("other-{i}")).filter(|o| worker(o) == worker(&phone)).take(300).collect();
    let live = start("live.db").await;
    let post = async |visitor: &str, event: &str, data: &str| {
        let events = format!(r#"{{"events":[{{"event":"{event}","visitor_id":"{visitor}","data":{data}}}]}}"#);
        assert_eq!(call(&live, "POST", "/v1/events", &events).await.0, StatusCode::ACCEPTED);
    };
    for other in &others {
        post(other, "view", r#"{"total":1}"#).await;
    }
    for _ in 0..4 {
        post(&phone, "view", r#"{"total":3}"#).await;
    }
    post(web, "login", r#"{"email_hash":"hash-x"}"#).await;
    post(&phone, "login", r#"{"email_hash":"hash-x"}"#).await;
    live.stop().await;
    let expected = state_of(&dir.path().join("live.db"));
    let merged: Vec<&String> =
        expected.iter().filter(|r| r.starts_with("profile ") && r.contains("\"spend\"")).collect();
    assert!(merged.iter().any(|r| r.contains("12")), "the phone's spend reached the merged profile: {merged:#?}");
    assert!(expected.iter().any(|r| r.starts_with("action welcome")), "{expected:#?}");
    let (independent, other) = independent_records(&log);
    assert!(independent >= others.len() && other > 0, "the others' views are independent: {independent}, {other}");

    start("again.db").await.stop().await;
    assert_eq!(state_of(&dir.path().join("again.db")), expected, "rebuilt from the log");
}

/// Another node, as the events handed to it reach it.
#[derive(Default)]
struct Peer(std::sync::OnceLock<starling_server::owned::Taker>);

impl starling_server::owned::Elsewhere for Peer {
    fn hand(
        &self,
        events: Vec<(u16, starling_core::Event)>,
        after: u64,
        via: starling_server::owned::Via,
    ) -> futures_util::future::BoxFuture<'static, Result<starling_server::owned::HandedReport, String>> {
        let taker = self.0.get().cloned();
        Box::pin(async move {
            // Owners never change here: an event is handed on again only if a merge moved it.
            if via != starling_server::owned::Via::OwnerOrIntake {
                return Err("an event handed here was handed on again".to_string());
            }
            let taker = taker.ok_or("the other node is not up")?;
            let events = events.into_iter().map(|(_, e)| e).collect();
            let report = taker.take(events, after, starling_server::pipeline::Source::Node).await?;
            Ok(starling_server::owned::HandedReport {
                accepted: report.accepted,
                duplicates: report.duplicates,
                position: report.position,
            })
        })
    }
}

/// A node of a spread cluster over `log`, owning the partitions `owns` picks.
async fn spread_node(
    dir: &std::path::Path,
    plugins: &std::path::Path,
    log: &std::sync::Arc<KeepAll>,
    database: &str,
    owns: impl Fn(u16) -> bool,
    peer: std::sync::Arc<dyn starling_server::owned::Elsewhere>,
) -> App {
    let owned = starling_server::owned::Owned::of((0..starling_log::PARTITIONS).filter(|p| owns(*p)));
    App::start(Options {
        model: starling_core::parse(REPLAYED).unwrap(),
        database: dir.join(database),
        plugins: Some(plugins.to_path_buf()),
        test_clock: false,
        admin_token: None,
        event_log: Some(log.clone()),
        config_path: None,
        trusted_keys: None,
        outcomes: None,
        spread: Some(starling_server::Spread { owned: std::sync::Arc::new(owned), elsewhere: peer }),
    })
    .await
    .unwrap()
}

/// Two nodes share the partitions, half each, and follow the id changes of each other's
/// records. Two devices of one person, on different nodes, send events through both nodes while
/// they log in with one id: the merge crosses the nodes through the log with the absorbed
/// profile's state, no update is lost, each node holds only its own partitions' profiles and
/// both hold the same ids, and each action is delivered by the node that decided it.
#[tokio::test(flavor = "multi_thread")]
async fn a_merge_across_nodes_loses_no_update_and_each_node_holds_its_own_profiles() {
    let dir = tempfile::tempdir().unwrap();
    let plugins = hook_plugin(dir.path());
    let log: std::sync::Arc<KeepAll> = Default::default();
    let (to_a, to_b) = (std::sync::Arc::new(Peer::default()), std::sync::Arc::new(Peer::default()));
    let a = spread_node(dir.path(), &plugins, &log, "a.db", |p| p.is_multiple_of(2), to_b.clone()).await;
    let b = spread_node(dir.path(), &plugins, &log, "b.db", |p| p % 2 == 1, to_a.clone()).await;
    let _ = to_a.0.set(a.taker().unwrap());
    let _ = to_b.0.set(b.taker().unwrap());
    let even = |id: &String| starling_log::partition_of(id).is_multiple_of(2);
    let web = (0..).map(|i| format!("web-{i}")).find(even).unwrap();
    let phone = (0..).map(|i| format!("phone-{i}")).find(|id| !even(id)).unwrap();
    const PER_CLIENT: usize = 60;
    let client = async |device: &str, node: &App, login: bool| {
        for n in 0..PER_CLIENT {
            let login = match login && n == PER_CLIENT / 2 {
                true => format!(r#",{{"event":"login","visitor_id":"{device}","data":{{"email_hash":"hash-1"}}}}"#),
                false => String::new(),
            };
            let id = format!("{device}-{}-{n}", if std::ptr::eq(node, &a) { "a" } else { "b" });
            let events = format!(
                r#"{{"events":[{{"event":"view","id":"{id}","visitor_id":"{device}","data":{{"total":1}}}}{login}]}}"#
            );
            let (status, body, _) = call(node, "POST", "/v1/events", &events).await;
            assert_eq!(status, StatusCode::ACCEPTED, "{body}");
        }
    };
    // Each device through both nodes, logging in halfway through the clients of its own node.
    futures_util::future::join4(
        client(&web, &a, true),
        client(&web, &b, false),
        client(&phone, &a, false),
        client(&phone, &b, true),
    )
    .await;
    // Another person logs in on both devices at once, each on its own node: both claims are
    // applied before either node follows the other's, and the one earlier in the log wins.
    let second_web = (0..).map(|i| format!("web-2-{i}")).find(even).unwrap();
    let second_phone = (0..).map(|i| format!("phone-2-{i}")).find(|id| !even(id)).unwrap();
    let login = |device: &str| {
        format!(r#"{{"events":[{{"event":"login","visitor_id":"{device}","data":{{"email_hash":"hash-2"}}}}]}}"#)
    };
    let (on_a, on_b) = (login(&second_web), login(&second_phone));
    let (from_a, from_b) =
        futures_util::future::join(call(&a, "POST", "/v1/events", &on_a), call(&b, "POST", "/v1/events", &on_b)).await;
    assert_eq!((from_a.0, from_b.0), (StatusCode::ACCEPTED, StatusCode::ACCEPTED));
    // People whose devices are on both nodes log in through one node, a few at once: the
    // login of the device on the other node is handed to it.
    let people: Vec<(String, String)> = (0..30)
        .map(|n| {
            let first = (0..).map(|i| format!("p{n}-a-{i}")).find(|id| !even(id)).unwrap();
            let second = (0..).map(|i| format!("p{n}-b-{i}")).find(even).unwrap();
            (first, second)
        })
        .collect();
    let person = async |n: usize| {
        let (first, second) = &people[n];
        for device in [first, second] {
            let events = format!(
                r#"{{"events":[{{"event":"login","visitor_id":"{device}","data":{{"email_hash":"person-{n}"}}}},
                    {{"event":"view","visitor_id":"{device}","data":{{"total":1}}}}]}}"#
            );
            assert_eq!(call(&a, "POST", "/v1/events", &events).await.0, StatusCode::ACCEPTED);
        }
    };
    futures_util::future::join_all((0..people.len()).map(person)).await;
    // A profile is read from the node that holds it (each holds only its own partitions'; the
    // cluster's front forwards a read to it).
    let read = async |id: &str| {
        let (status, profile, _) = call(&a, "GET", &format!("/v1/profiles/{id}"), "").await;
        match status {
            StatusCode::NOT_FOUND => call(&b, "GET", &format!("/v1/profiles/{id}"), "").await.1,
            _ => profile,
        }
    };
    for _ in [&a, &b] {
        for (first, second) in &people {
            let mut seen = serde_json::Value::Null;
            for _ in 0..200 {
                let one = read(first).await;
                let other = read(second).await;
                seen = serde_json::json!({ "first": one, "second": other });
                if one["id"] == other["id"] && one["event_count"] == 4 {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            assert_eq!(seen["first"]["id"], seen["second"]["id"], "{seen}");
            assert_eq!(seen["first"]["event_count"], 4, "{seen}");
        }
    }
    // One profile holding every event once.
    let total = (4 * PER_CLIENT) as f64;
    for node in [&a] {
        let mut seen = serde_json::Value::Null;
        for _ in 0..200 {
            let web_profile = read(&second_web).await;
            let phone_profile = read(&second_phone).await;
            seen = serde_json::json!({ "web": web_profile, "phone": phone_profile });
            if web_profile["id"] == phone_profile["id"] && web_profile["event_count"] == 2 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        assert_eq!(seen["web"]["id"], seen["phone"]["id"], "{seen}");
        assert_eq!(seen["web"]["event_count"], 2, "{seen}");
        let mut seen = serde_json::Value::Null;
        for _ in 0..200 {
            let web_profile = read(&web).await;
            let phone_profile = read(&phone).await;
            if web_profile["id"] == phone_profile["id"] && web_profile["attributes"]["spend"] == total {
                seen = web_profile;
                break;
            }
            seen = serde_json::json!({ "web": web_profile, "phone": phone_profile });
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        if seen["attributes"]["spend"] != total {
            let (status, export, _) = call(node, "GET", &format!("/v1/profiles/{web}/export"), "").await;
            let export = match status {
                StatusCode::NOT_FOUND => call(&b, "GET", &format!("/v1/profiles/{web}/export"), "").await.1,
                _ => export,
            };
            let ids: std::collections::BTreeSet<String> = export["events"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|e| e["id"].as_str().map(String::from))
                .collect();
            let missing: Vec<String> = [&web, &phone]
                .iter()
                .flat_map(|d| ["a", "b"].map(|n| (d.to_string(), n)))
                .flat_map(|(d, n)| (0..PER_CLIENT).map(move |i| format!("{d}-{n}-{i}")))
                .filter(|id| !ids.contains(id))
                .collect();
            let mut records = Vec::new();
            let everything: Vec<(u16, u64)> = (0..starling_log::PARTITIONS).map(|p| (p, 0)).collect();
            starling_log::EventLog::read(&log.0, &everything, &mut |entry| {
                let text = String::from_utf8_lossy(&entry.payload).to_string();
                if missing.iter().any(|m| text.contains(&format!("\"{m}\"")))
                    || text.contains("merge")
                    || text.contains("hash-1")
                {
                    records.push(format!("{} p{} {}", entry.position, entry.partition, text));
                }
            })
            .unwrap();
            let name = if std::ptr::eq(node, &a) { "a" } else { "b" };
            panic!("on {name}, missing {missing:?}: {seen}\n{}", records.join("\n"));
        }
        assert_eq!(seen["event_count"], 4 * PER_CLIENT + 2, "{seen}");
    }
    a.stop().await;
    b.stop().await;
    let mut claims = Vec::new();
    let everything: Vec<(u16, u64)> = (0..starling_log::PARTITIONS).map(|p| (p, 0)).collect();
    starling_log::EventLog::read(&log.0, &everything, &mut |entry| {
        let record: serde_json::Value = serde_json::from_slice(&entry.payload).unwrap();
        if record["work"] == "events" && record.to_string().contains("hash-2") {
            claims.push((entry.position, record["events"][0]["visitor_id"].as_str().unwrap().to_string()));
        }
    })
    .unwrap();
    claims.sort();
    assert_eq!(claims.len(), 2, "{claims:?}");
    let winner = &claims[0].1;
    for database in ["a.db", "b.db"] {
        let conn = rusqlite::Connection::open(dir.path().join(database)).unwrap();
        assert_eq!(&starling_store::resolve_identity(&conn, "hash-2").unwrap().unwrap(), winner, "{database}");
    }
    let rows = |database: &str, sql: &str| -> Vec<String> {
        let conn = rusqlite::Connection::open(dir.path().join(database)).unwrap();
        let mut stmt = conn.prepare(sql).unwrap();
        let mut rows: Vec<String> =
            stmt.query_map([], |r| r.get::<_, String>(0)).unwrap().map(Result::unwrap).collect();
        rows.sort();
        rows
    };
    let ids = "SELECT visitor_id || ' ' || profile_id FROM identities";
    assert_eq!(rows("a.db", ids), rows("b.db", ids), "both nodes hold the same ids");
    let profiles = "SELECT id FROM profiles";
    for (database, even_node) in [("a.db", true), ("b.db", false)] {
        let held = rows(database, profiles);
        assert!(
            held.iter().all(|id| even(id) == even_node),
            "{database} holds only its partitions' profiles: {held:?}"
        );
    }
    // Each device joined `spenders` before they stitched: two actions, each kept and tried by
    // the node owning the partition of the record that decided it.
    let tried = |database: &str| -> Vec<(String, bool)> {
        let conn = rusqlite::Connection::open(dir.path().join(database)).unwrap();
        let mut stmt =
            conn.prepare("SELECT origin, attempts > 0 OR status <> 'pending' FROM outbox ORDER BY origin").unwrap();
        stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?))).unwrap().map(Result::unwrap).collect()
    };
    let (by_a, by_b) = (tried("a.db"), tried("b.db"));
    assert_eq!((by_a.len(), by_b.len()), (1, 1), "{by_a:?} {by_b:?}");
    assert!(by_a[0].1 && by_b[0].1, "tried: {by_a:?} {by_b:?}");
}

/// How many of the log's records are marked independent, and how many are not.
fn independent_records(log: &KeepAll) -> (usize, usize) {
    let mut counts = (0, 0);
    let everything: Vec<(u16, u64)> = (0..starling_log::PARTITIONS).map(|p| (p, 0)).collect();
    starling_log::EventLog::read(&log.0, &everything, &mut |entry| {
        let record: serde_json::Value = serde_json::from_slice(&entry.payload).unwrap();
        match record["independent"] == true {
            true => counts.0 += 1,
            false => counts.1 += 1,
        }
    })
    .unwrap();
    counts
}

/// A batch the log refuses is answered with an error and applied nowhere. The worker may hold
/// earlier batches' state in memory only (it writes SQLite later) and that state may be half
/// changed by the refused batch, so it is derived again from SQLite and the log: nothing
/// acknowledged is lost and nothing refused is applied.
#[tokio::test(flavor = "multi_thread")]
async fn a_batch_the_log_refuses_is_applied_nowhere_and_what_was_held_in_memory_survives() {
    let dir = tempfile::tempdir().unwrap();
    let log: std::sync::Arc<KeepAll> = Default::default();
    let app = App::start(Options {
        model: starling_core::parse(CONFIG).unwrap(),
        database: dir.path().join("t.db"),
        plugins: None,
        test_clock: false,
        admin_token: None,
        event_log: Some(log.clone()),
        config_path: None,
        trusted_keys: None,
        outcomes: None,
        spread: None,
    })
    .await
    .unwrap();
    let buy = |total: u32| format!(r#"{{"event":"buy","visitor_id":"v","data":{{"total":{total}}}}}"#);
    assert_eq!(call(&app, "POST", "/v1/events", &buy(7)).await.0, StatusCode::ACCEPTED);
    log.fill(true);
    // The log is out of space: 507, naming the cause.
    let (status, body, retry_after) = call(&app, "POST", "/v1/events", &buy(100)).await;
    assert_eq!(status, StatusCode::INSUFFICIENT_STORAGE);
    assert!(
        body["error"].as_str().unwrap().contains("the disk is full (event log test log: No space left on device"),
        "{body}"
    );
    assert!(body["error"].as_str().unwrap().ends_with("the event was not stored; retry once space is freed"), "{body}");
    assert!(retry_after.is_some());
    log.fill(false);
    assert_eq!(call(&app, "POST", "/v1/events", &buy(5)).await.0, StatusCode::ACCEPTED);
    let (status, profile, _) = call(&app, "GET", "/v1/profiles/v", "").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        (profile["attributes"]["spend"].clone(), profile["event_count"].clone()),
        (serde_json::json!(12.0), serde_json::json!(2))
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn moving_the_clock_needs_the_admin_token_and_stays_within_a_century() {
    let dir = tempfile::tempdir().unwrap();
    let app = App::start(Options {
        model: starling_core::parse(OPERATIONS).unwrap(),
        database: dir.path().join("t.db"),
        plugins: None,
        test_clock: true,
        admin_token: Some(ADMIN.trim_start_matches("Bearer ").to_string()),
        event_log: None,
        config_path: None,
        trusted_keys: None,
        outcomes: None,
        spread: None,
    })
    .await
    .unwrap();
    let (status, body, _) = send(&app, "POST", "/v1/test/clock", &[], r#"{"advance":"1d"}"#).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("admin token (Authorization: Bearer) required"))
    );
    let with_token = [("authorization", ADMIN), ("content-type", "application/json")];
    let (status, body, _) = send(&app, "POST", "/v1/test/clock", &with_token, r#"{"advance":"292271000y"}"#).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(body["error"].as_str().unwrap().starts_with("advance: "), "{body}");
    let (status, body, _) = send(&app, "POST", "/v1/test/clock", &with_token, r#"{"advance":"101y"}"#).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (
            StatusCode::BAD_REQUEST,
            Some("advance: the clock may be moved at most 100 years ahead in all; it is 0 ms ahead already")
        )
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn no_client_clock_dates_an_event_into_the_future_or_far_into_the_past() {
    let dir = tempfile::tempdir().unwrap();
    let app = app(dir.path()).await;
    let before = starling_core::time::format_rfc3339(starling_server::system_clock());
    let (status, body, _) = call(
        &app,
        "POST",
        "/v1/events",
        r#"{"events":[{"event":"buy","visitor_id":"a","data":{"total":11}},{"event":"view","visitor_id":"a","timestamp":"9999-01-01T00:00:00Z"}]}"#,
    )
    .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(
        body["warnings"],
        serde_json::json!([
            "events[1].timestamp: 9999-01-01T00:00:00.000Z is ahead of the server's clock by more than server.max_clock_skew; applied at its receipt"
        ])
    );
    let (_, profile, _) = call(&app, "GET", "/v1/profiles/a", "").await;
    let last_seen = profile["last_seen"].as_str().unwrap().to_string();
    assert!(last_seen >= before && last_seen.starts_with("20"), "applied at its receipt, not in 9999: {last_seen}");
    assert_eq!(profile["visit_open"], true);
    assert_eq!(profile["audiences"], serde_json::json!(["spenders"]));

    // A minute ahead is within the skew: applied at its receipt without a warning.
    let soon = starling_core::time::format_rfc3339(starling_server::system_clock() + 60_000);
    let event = format!(r#"{{"event":"view","visitor_id":"b","timestamp":"{soon}"}}"#);
    let (status, body, _) = call(&app, "POST", "/v1/events", &event).await;
    assert_eq!((status, body), (StatusCode::ACCEPTED, serde_json::json!({"accepted": 1, "duplicates": 0})));
    let (_, profile, _) = call(&app, "GET", "/v1/profiles/b", "").await;
    assert!(profile["last_seen"].as_str().unwrap() < soon.as_str(), "{profile}");

    // Older than server.max_event_age (30 days): refused, nothing applied.
    let (status, body, _) = call(
        &app,
        "POST",
        "/v1/events",
        r#"{"events":[{"event":"view","visitor_id":"c"},{"event":"view","visitor_id":"c","timestamp":"0001-01-01T00:00:00Z"}]}"#,
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(
        body["error"],
        "events[1].timestamp: 0001-01-01T00:00:00.000Z is older than server.max_event_age allows; import older events with `starling import`"
    );
    assert_eq!(call(&app, "GET", "/v1/profiles/c", "").await.0, StatusCode::NOT_FOUND);
    let (_, metrics, _) = send(&app, "GET", "/metrics", &[], "").await;
    assert!(metrics.as_str().unwrap().contains("starling_event_times_clamped_total 2"), "{metrics}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn one_source_cannot_take_an_event_id_another_will_use() {
    let dir = tempfile::tempdir().unwrap();
    let app = operations_app(dir.path()).await;
    let (web, store) = ([("x-api-key", "web-key-0123456789")], [("x-api-key", "store-key-0123456789")]);
    // The web key is public: a page sends the point of sale's next order number first.
    let squatted = r#"{"event":"view","visitor_id":"mallory","id":"pos-order-1001"}"#;
    let (status, body, _) = send(&app, "POST", "/v1/events", &web, squatted).await;
    assert_eq!((status, body), (StatusCode::ACCEPTED, serde_json::json!({"accepted": 1, "duplicates": 0})));
    let real = r#"{"event":"view","visitor_id":"ann","id":"pos-order-1001"}"#;
    let (status, body, _) = send(&app, "POST", "/v1/events", &store, real).await;
    assert_eq!((status, body), (StatusCode::ACCEPTED, serde_json::json!({"accepted": 1, "duplicates": 0})));
    // Within one source an id is still applied once.
    let (_, body, _) = send(&app, "POST", "/v1/events", &store, real).await;
    assert_eq!(body, serde_json::json!({"accepted": 0, "duplicates": 1}));
    let (_, profile, _) = send(&app, "GET", "/v1/profiles/ann", &[("authorization", ADMIN)], "").await;
    assert_eq!(profile["event_count"], 1);
    app.stop().await;
}

/// Whether any of the database's files (SQLite, its WAL, the event log's segments) holds `value`.
fn files_hold(database: &std::path::Path, value: &str) -> Vec<std::path::PathBuf> {
    let mut files = vec![database.to_path_buf(), database.with_extension("db-wal")];
    if let Ok(segments) = std::fs::read_dir(database.with_extension("db.log")) {
        files.extend(segments.map(|s| s.unwrap().path()));
    }
    files
        .into_iter()
        .filter(|f| std::fs::read(f).is_ok_and(|bytes| bytes.windows(value.len()).any(|w| w == value.as_bytes())))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_deleted_persons_values_leave_every_file_and_their_event_ids_are_forgotten() {
    let dir = tempfile::tempdir().unwrap();
    let database = dir.path().join("t.db");
    let app = operations_app(dir.path()).await;
    let key = [("x-api-key", "web-key-0123456789")];
    let admin = [("authorization", ADMIN)];
    for i in 0..20 {
        for (visitor, hash) in [("ann-device-7731", "hash-ann-5c2e9d"), ("bob-device-0042", "hash-bob-77aa01")] {
            let event = format!(
                r#"{{"event":"login","visitor_id":"{visitor}","id":"{visitor}-evt-{i}","data":{{"email_hash":"{hash}","total":3}}}}"#
            );
            assert_eq!(send(&app, "POST", "/v1/events", &key, &event).await.0, StatusCode::ACCEPTED);
        }
    }
    // Written to SQLite and checkpointed: the values are in the files.
    let (status, _, _) = send(&app, "GET", "/v1/profiles/ann-device-7731", &admin, "").await;
    assert_eq!(status, StatusCode::OK);
    assert!(!files_hold(&database, "hash-ann-5c2e9d").is_empty());

    let (status, body, _) = send(&app, "DELETE", "/v1/profiles/ann-device-7731", &admin, "").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["audit"]["removed"]["event_ids"], 20);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let left: Vec<_> =
            ["hash-ann-5c2e9d", "ann-device-7731"].iter().flat_map(|v| files_hold(&database, v)).collect();
        if left.is_empty() {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the deleted person's values are still in {left:?}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let (_, bob, _) = send(&app, "GET", "/v1/profiles/bob-device-0042", &admin, "").await;
    assert_eq!(
        (bob["event_count"].as_i64(), bob["attributes"]["email_hash"].as_str()),
        (Some(20), Some("hash-bob-77aa01"))
    );
    // The person's event ids are forgotten too: the same event, sent again, is applied anew.
    let again = r#"{"event":"login","visitor_id":"ann-device-7731","id":"ann-device-7731-evt-0"}"#;
    let (_, body, _) = send(&app, "POST", "/v1/events", &key, again).await;
    assert_eq!(body, serde_json::json!({"accepted": 1, "duplicates": 0}));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_access_request_is_answered_from_one_call() {
    let dir = tempfile::tempdir().unwrap();
    let app = operations_app(dir.path()).await;
    let key = [("x-api-key", "web-key-0123456789")];
    let admin = [("authorization", ADMIN)];
    for (visitor, id) in [("laptop-ann", "e1"), ("phone-ann", "e2")] {
        let event = format!(
            r#"{{"event":"login","visitor_id":"{visitor}","id":"{id}","data":{{"email_hash":"hash-ann","total":30}}}}"#
        );
        assert_eq!(send(&app, "POST", "/v1/events", &key, &event).await.0, StatusCode::ACCEPTED);
    }
    let (status, export, _) = send(&app, "GET", "/v1/profiles/phone-ann/export", &admin, "").await;
    assert_eq!(status, StatusCode::OK, "{export}");
    let mut ids: Vec<&str> = export["ids"].as_array().unwrap().iter().map(|i| i.as_str().unwrap()).collect();
    ids.sort();
    assert_eq!(ids, ["hash-ann", "laptop-ann", "phone-ann"]);
    assert_eq!(export["profile"]["event_count"], 2);
    let events: Vec<&str> = export["events"].as_array().unwrap().iter().map(|e| e["id"].as_str().unwrap()).collect();
    assert_eq!(events, ["e1", "e2"]);
    assert_eq!(export["events"][0]["data"]["email_hash"], "hash-ann");
    assert!(!export["identity_history"].as_array().unwrap().is_empty(), "{export}");
    let audiences: Vec<&str> =
        export["memberships"].as_array().unwrap().iter().map(|m| m["audience"].as_str().unwrap()).collect();
    assert_eq!(
        audiences,
        export["profile"]["audiences"].as_array().unwrap().iter().map(|a| a.as_str().unwrap()).collect::<Vec<_>>()
    );
    assert!(export["actions"].is_array());
    let (status, body, _) = send(&app, "GET", "/v1/profiles/nobody/export", &admin, "").await;
    assert_eq!((status, body["error"].as_str()), (StatusCode::NOT_FOUND, Some("no profile for id `nobody`")));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_key_holder_cannot_grow_a_profile_past_its_budget() {
    let config = r#"
[server]
max_profile_kib = 64

[[attribute]]
name = "tags"
scope = "visitor"
type = "set_of_strings"

[[attribute]]
name = "views"
scope = "visitor"
type = "tally"

[[enrichment]]
attribute = "tags"
op = "add"
event = "tags"

[[enrichment]]
attribute = "views"
op = "increment"
key = "event.page"
"#;
    let dir = tempfile::tempdir().unwrap();
    let app = app_with(config, dir.path()).await;
    // The first request adds 20 members of 1,000 characters, each later one 200 (about 200 KB),
    // and a long tally key.
    for request in 0..8 {
        let count = if request == 0 { 20 } else { 200 };
        let tags: Vec<String> = (0..count).map(|i| format!("{request}-{i}-{}", "x".repeat(990))).collect();
        let page = format!("{request}-{}", "p".repeat(990));
        let body =
            serde_json::json!({ "event": "view", "visitor_id": "attacker", "data": { "tags": tags, "page": page } });
        let (status, body, _) = call(&app, "POST", "/v1/events", &body.to_string()).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    }
    let (status, profile, _) = call(&app, "GET", "/v1/profiles/attacker", "").await;
    assert_eq!(status, StatusCode::OK);
    let size = profile.to_string().len();
    assert!(size <= 64 * 1024 + 4 * 1024, "the profile shows {size} bytes, over the 64 KiB budget");
    assert_eq!(profile["event_count"], 8, "every event still counts");
    assert_eq!(profile["attributes"]["tags"].as_array().map(Vec::len), Some(20), "the first request fits the budget");

    let (_, metrics, _) = send(&app, "GET", "/metrics", &[], "").await;
    let refused = metrics
        .as_str()
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("starling_profile_budget_refusals_total "))
        .map(|n| n.parse::<u64>().unwrap());
    assert!(refused.is_some_and(|n| n >= 7), "{refused:?}");

    // Other visitors are unaffected.
    let body = r#"{"event": "view", "visitor_id": "someone", "data": {"tags": ["a"], "page": "home"}}"#;
    assert_eq!(call(&app, "POST", "/v1/events", body).await.0, StatusCode::ACCEPTED);
    let (_, other, _) = call(&app, "GET", "/v1/profiles/someone", "").await;
    assert_eq!(other["attributes"]["tags"], serde_json::json!(["a"]));
    app.stop().await;
}

const IDENTITIES: &str = r#"
[[source]]
name = "web"
api_key = "web-key-0123456789"
claims = []

[[source]]
name = "login"
api_key = "login-key-0123456789"
claims = ["email_hash", "crm_id"]

[[attribute]]
name = "email_hash"
scope = "visitor"
type = "visitor_id"
max_per_profile = 1

[[attribute]]
name = "crm_id"
scope = "visitor"
type = "visitor_id"

[[attribute]]
name = "email"
scope = "visitor"
type = "string"

[[enrichment]]
attribute = "email_hash"
op = "set"
event = "email_hash"

[[enrichment]]
attribute = "crm_id"
op = "set"
event = "crm_id"

[[enrichment]]
attribute = "email"
op = "set"
event = "email"
"#;

#[tokio::test(flavor = "multi_thread")]
async fn a_key_holder_cannot_claim_someone_elses_identity() {
    let dir = tempfile::tempdir().unwrap();
    let app = app_with(IDENTITIES, dir.path()).await;
    let post = async |key: &str, visitor: &str, data: serde_json::Value| {
        let body = serde_json::json!({ "event": "login", "visitor_id": visitor, "data": data }).to_string();
        let (status, body, _) = send(&app, "POST", "/v1/events", &[("x-api-key", key)], &body).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    };
    let login = "login-key-0123456789";
    post(
        login,
        "victim-phone",
        serde_json::json!({"email_hash": "hash-victim", "crm_id": "crm-0001", "email": "victim@example.com"}),
    )
    .await;

    // The web key is public: it may not set the victim's email hash on the attacker's device.
    post(
        "web-key-0123456789",
        "attacker-laptop",
        serde_json::json!({"email_hash": "hash-victim", "email": "evil@example.com"}),
    )
    .await;
    let (_, attacker, _) = send(&app, "GET", "/v1/profiles/attacker-laptop", &[], "").await;
    assert_eq!(attacker["id"], "attacker-laptop", "not stitched into the victim's profile: {attacker}");
    assert!(attacker["attributes"].get("email_hash").is_none(), "{attacker}");

    // With a login of their own, a second email hash on the same profile is refused ...
    post(login, "attacker-laptop", serde_json::json!({"email_hash": "hash-attacker"})).await;
    post(login, "attacker-laptop", serde_json::json!({"email_hash": "hash-victim"})).await;
    let (_, attacker, _) = send(&app, "GET", "/v1/profiles/attacker-laptop", &[], "").await;
    assert_eq!(attacker["attributes"]["email_hash"], "hash-attacker", "{attacker}");
    // ... and so is a stitch, through another id, with a profile holding a different hash.
    post(login, "attacker-laptop", serde_json::json!({"crm_id": "crm-0001", "email": "evil@example.com"})).await;
    let (_, victim, _) = send(&app, "GET", "/v1/profiles/victim-phone", &[], "").await;
    assert_eq!(victim["id"], "victim-phone");
    assert_eq!(victim["attributes"]["email"], "victim@example.com", "{victim}");
    let (_, identity, _) = send(&app, "GET", "/v1/profiles/attacker-laptop/identity", &[], "").await;
    let refused: Vec<&serde_json::Value> =
        identity["history"].as_array().unwrap().iter().filter(|h| h["kind"] == "refused").collect();
    assert!(
        refused
            .iter()
            .any(|h| h["detail"].as_str().unwrap().contains("hold 2 different `email_hash` ids (max_per_profile = 1)")),
        "{identity}"
    );
    assert_eq!(identity["ids"], serde_json::json!(["attacker-laptop", "hash-attacker"]));

    let (_, metrics, _) = send(&app, "GET", "/metrics", &[], "").await;
    let metrics = metrics.as_str().unwrap();
    assert!(metrics.contains("starling_identity_refusals_total{reason=\"unclaimed\"} 1"), "{metrics}");
    assert!(metrics.contains("starling_identity_refusals_total{reason=\"max_per_profile\"} 2"), "{metrics}");
    app.stop().await;
}

/// Records what a node hands on, answering that it was taken.
#[derive(Default)]
struct Recorded(std::sync::Mutex<Vec<(Vec<String>, starling_server::owned::Via)>>);

impl starling_server::owned::Elsewhere for Recorded {
    fn hand(
        &self,
        events: Vec<(u16, starling_core::Event)>,
        _after: u64,
        via: starling_server::owned::Via,
    ) -> futures_util::future::BoxFuture<'static, Result<starling_server::owned::HandedReport, String>> {
        let visitors = events.iter().map(|(_, e)| e.visitor_id.clone()).collect::<Vec<_>>();
        let accepted = visitors.len();
        self.0.lock().unwrap().push((visitors, via));
        Box::pin(async move { Ok(starling_server::owned::HandedReport { accepted, duplicates: 0, position: None }) })
    }
}

/// An event for another node's partition is handed to that node; one another node handed here
/// for a partition this node does not own (the two nodes' views of the owners differed for a
/// moment) is said to be relayed, so that it waits for the partition's owner instead of going
/// back and forth between the nodes.
#[tokio::test(flavor = "multi_thread")]
async fn an_event_handed_here_for_a_partition_owned_elsewhere_is_not_handed_on_again() {
    let dir = tempfile::tempdir().unwrap();
    let plugins = hook_plugin(dir.path());
    let log: std::sync::Arc<KeepAll> = Default::default();
    let recorded = std::sync::Arc::new(Recorded::default());
    let node = spread_node(dir.path(), &plugins, &log, "a.db", |p| p.is_multiple_of(2), recorded.clone()).await;
    let elsewhere = (0..).map(|i| format!("v-{i}")).find(|id| starling_log::partition_of(id) % 2 == 1).unwrap();
    let events = format!(r#"{{"events":[{{"event":"view","visitor_id":"{elsewhere}","data":{{}}}}]}}"#);
    let (status, body, _) = call(&node, "POST", "/v1/events", &events).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let event = starling_core::Event {
        id: None,
        name: "view".into(),
        visitor_id: elsewhere.clone(),
        source: None,
        timestamp_ms: 1_700_000_000_000,
        data: serde_json::Map::new(),
    };
    let report = node.taker().unwrap().take(vec![event], 0, starling_server::pipeline::Source::Node).await.unwrap();
    assert_eq!(report.accepted, 1);
    use starling_server::owned::Via;
    assert_eq!(
        *recorded.0.lock().unwrap(),
        [(vec![elsewhere.clone()], Via::OwnerOrIntake), (vec![elsewhere], Via::Intake)]
    );
    node.stop().await;
}
