//! Reads over every profile on a spread node. Each node holds only its own partitions'
//! profiles, histories, memberships, actions, dead letters and audit records, so the node
//! asked gathers every live node's answer for its own share: sizes and counts add up, lists go
//! together (newest first, as long as the limit asked).

use super::{Front, to_engine};
use crate::api::ApiError;
use crate::node::{FORWARDED_HEADER, forward_to, unavailable};
use axum::extract::Request;
use axum::http::{HeaderName, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};

/// The header naming the nodes whose answers a gathered read holds.
const GATHERED_HEADER: &str = "x-starling-gathered-from";

/// How a read over every profile is put together from the nodes' answers.
#[derive(Debug, Clone, Copy)]
pub(super) enum Gathered {
    /// `{"audiences": [{"name", "size", ...}]}`: the sizes add up.
    Sizes,
    /// `{key: [...]}`: the rows go together, newest first by `time`, as many as `limit`.
    Rows { key: &'static str, time: &'static str },
    /// One audience (`GET /v1/audiences/{name}`): the sizes and the backfill's progress add up.
    Audience,
    /// A rule previewed over the stored profiles: sizes, profiles scanned and overlaps add up,
    /// the samples go together.
    Preview,
    /// A configuration replayed over the stored events: events, profiles, audience sizes and
    /// actions fired add up.
    Backtest,
    /// An audience's sampled sizes: each node samples its own share at its own moments, so at
    /// each moment any node sampled, the latest sample of every node adds up.
    SizeHistory,
}

/// How long a gathered answer took: the slowest node's time, as the nodes work side by side.
const ELAPSED: &str = "elapsed_ms";

/// How `request` is gathered, if it reads over every profile (and was not forwarded by a node
/// gathering it).
pub(super) fn gathered(request: &Request) -> Option<Gathered> {
    if request.headers().contains_key(FORWARDED_HEADER) {
        return None;
    }
    let path = request.uri().path();
    match *request.method() {
        Method::GET => match path {
            "/v1/audiences" => Some(Gathered::Sizes),
            "/v1/actions" => Some(Gathered::Rows { key: "actions", time: "occurred_ms" }),
            "/v1/dead-letters" => Some(Gathered::Rows { key: "dead_letters", time: "died_ms" }),
            // Each node audits what it does to its own partitions' profiles (deletions).
            "/v1/audit" => Some(Gathered::Rows { key: "audit", time: "at_ms" }),
            _ => match path.strip_prefix("/v1/audiences/")?.split_once('/') {
                None => Some(Gathered::Audience),
                Some((_, "history")) => Some(Gathered::SizeHistory),
                Some(_) => None,
            },
        },
        Method::POST => match path {
            "/v1/audiences/preview" => Some(Gathered::Preview),
            "/v1/backtest" => Some(Gathered::Backtest),
            _ => None,
        },
        _ => None,
    }
}

/// Answers `request` with this node's answer and every other live node's, put together.
pub(super) async fn gather(front: &Front, request: Request, how: Gathered) -> Response {
    let (parts, body) = request.into_parts();
    // A preview's rule, a backtest's configuration: each node is asked with the same body.
    let Ok(body) = axum::body::to_bytes(body, crate::api::MAX_BODY_BYTES).await else {
        let error = format!("the request body is over {} bytes", crate::api::MAX_BODY_BYTES);
        return ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, error).into_response();
    };
    let again = || Request::from_parts(parts.clone(), axum::body::Body::from(body.clone()));
    let others: Vec<(String, String)> = {
        let placed = front.placed.borrow();
        placed
            .nodes
            .iter()
            .filter(|(name, _)| **name != front.node)
            .filter_map(|(name, peer)| Some((name.clone(), peer.url.clone()?)))
            .collect()
    };
    let mut answers = vec![(front.node.clone(), to_engine(front, again()).await)];
    for (node, url) in others {
        match forward_to(&front.node, &front.client, &url, again()).await {
            Ok(answer) => answers.push((node, answer)),
            Err(e) => {
                tracing::warn!(%node, "gathering a read: {e}");
                return unavailable("a node holding part of the answer could not be reached; retry");
            }
        }
    }
    let mut bodies = Vec::with_capacity(answers.len());
    let mut nodes = Vec::with_capacity(answers.len());
    for (node, answer) in answers {
        if answer.status() != StatusCode::OK {
            // Refused (a bad query, a missing token): every node refuses it alike.
            return answer;
        }
        let Ok(bytes) = axum::body::to_bytes(answer.into_body(), usize::MAX).await else {
            return unavailable("a node's answer was cut short; retry");
        };
        let Ok(body) = serde_json::from_slice::<serde_json::Value>(&bytes) else {
            return unavailable("a node's answer was unreadable; retry");
        };
        bodies.push(body);
        nodes.push(node);
    }
    let limit = parts
        .uri
        .query()
        .and_then(|q| q.split('&').find_map(|pair| pair.strip_prefix("limit=")?.parse::<usize>().ok()))
        .unwrap_or(100)
        .min(10_000);
    let gathered = put_together(bodies, how, limit);
    let mut response = (StatusCode::OK, axum::Json(gathered)).into_response();
    if let Ok(nodes) = HeaderValue::from_str(&nodes.join(",")) {
        response.headers_mut().insert(HeaderName::from_static(GATHERED_HEADER), nodes);
    }
    response
}

/// The nodes' answers as one: the first's, with the others' sizes added or rows joined.
fn put_together(mut bodies: Vec<serde_json::Value>, how: Gathered, limit: usize) -> serde_json::Value {
    let mut first = bodies.remove(0);
    match how {
        Gathered::Sizes => {
            for body in &bodies {
                add_by(&mut first, body, "audiences", "name", &["size"]);
            }
        }
        Gathered::Rows { key, time } => {
            let mut rows: Vec<serde_json::Value> = std::iter::once(&mut first)
                .chain(bodies.iter_mut())
                .flat_map(|b| b[key].as_array_mut().map(std::mem::take).unwrap_or_default())
                .collect();
            rows.sort_by_key(|row| std::cmp::Reverse(row[time].as_i64().unwrap_or(0)));
            rows.truncate(limit);
            first[key] = rows.into();
        }
        Gathered::Audience => {
            for body in &bodies {
                add(&mut first, body, &["size"]);
                // A backfill under way on a node (null where none is): its progress adds up.
                let (mine, other) = (&mut first["backfill"], &body["backfill"]);
                if mine.is_object() && other.is_object() {
                    add(mine, other, &["done", "total"]);
                    mine["finished"] = (mine["finished"] == true && other["finished"] == true).into();
                }
            }
        }
        Gathered::Preview => {
            for body in &bodies {
                add(&mut first, body, &["size", "profiles"]);
                add_by(&mut first, body, "overlap", "audience", &["overlap"]);
                slowest(&mut first, body);
                let more = body["sample"].as_array().cloned().unwrap_or_default();
                if let Some(sample) = first["sample"].as_array_mut() {
                    let room = crate::reconfigure::PREVIEW_SAMPLE.saturating_sub(sample.len());
                    sample.extend(more.into_iter().take(room));
                }
            }
        }
        Gathered::Backtest => {
            for body in &bodies {
                add(&mut first, body, &["events", "profiles"]);
                add_by(&mut first, body, "audiences", "audience", &["running", "new", "stored_size"]);
                add_by(&mut first, body, "actions", "action", &["running", "new"]);
                slowest(&mut first, body);
            }
            let (events, elapsed) = (first["events"].as_u64().unwrap_or(0), first[ELAPSED].as_u64().unwrap_or(0));
            first["events_per_second"] = (events * 1000 / elapsed.max(1)).into();
        }
        Gathered::SizeHistory => {
            let nodes: Vec<Vec<(String, i64)>> = std::iter::once(&first)
                .chain(bodies.iter())
                .map(|body| {
                    let samples = body["samples"].as_array().into_iter().flatten();
                    samples.filter_map(|s| Some((s["at"].as_str()?.to_string(), s["size"].as_i64()?))).collect()
                })
                .collect();
            first["samples"] = sizes_over_time(&nodes).into();
        }
    }
    first
}

/// The sum of the nodes' sampled sizes (each oldest first, timestamps in one RFC 3339 form, so
/// they order as text) at each moment any of them sampled: a node's latest sample until then,
/// none before its first (its partitions were other nodes' then, or it was not running).
fn sizes_over_time(nodes: &[Vec<(String, i64)>]) -> Vec<serde_json::Value> {
    let mut moments: Vec<&str> = nodes.iter().flatten().map(|(at, _)| at.as_str()).collect();
    moments.sort_unstable();
    moments.dedup();
    let mut next = vec![0; nodes.len()];
    moments
        .into_iter()
        .map(|at| {
            let mut size = 0;
            for (samples, next) in nodes.iter().zip(next.iter_mut()) {
                while samples.get(*next).is_some_and(|(sampled, _)| sampled.as_str() <= at) {
                    *next += 1;
                }
                size += next.checked_sub(1).map_or(0, |latest| samples[latest].1);
            }
            serde_json::json!({ "at": at, "size": size })
        })
        .collect()
}

/// The sum of two counts; null where neither node has one (an audience no configuration
/// defines), the one count where only one has.
fn sum(mine: Option<&serde_json::Value>, other: Option<&serde_json::Value>) -> serde_json::Value {
    match (mine.and_then(|v| v.as_i64()), other.and_then(|v| v.as_i64())) {
        (None, None) => serde_json::Value::Null,
        (a, b) => (a.unwrap_or(0) + b.unwrap_or(0)).into(),
    }
}

/// Adds `other`'s counts `keys` to `mine`'s.
fn add(mine: &mut serde_json::Value, other: &serde_json::Value, keys: &[&str]) {
    for key in keys {
        mine[*key] = sum(mine.get(*key), other.get(*key));
    }
}

/// Adds the counts `keys` of each row of `other[list]` to the row of `mine[list]` with the same
/// `name` (the nodes run one configuration, so they list the same rows).
fn add_by(mine: &mut serde_json::Value, other: &serde_json::Value, list: &str, name: &str, keys: &[&str]) {
    for row in other[list].as_array().into_iter().flatten() {
        let same = mine[list].as_array_mut().and_then(|rows| rows.iter_mut().find(|r| r[name] == row[name]));
        if let Some(same) = same {
            add(same, row, keys);
        }
    }
}

/// Keeps the longer of the two nodes' times.
fn slowest(mine: &mut serde_json::Value, other: &serde_json::Value) {
    mine[ELAPSED] = mine[ELAPSED].as_u64().max(other[ELAPSED].as_u64()).into();
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn sizes_add_up_and_rows_go_together_newest_first() {
        let sizes = put_together(
            vec![
                json!({"audiences": [{"name": "fans", "size": 3}, {"name": "spenders", "size": 0}]}),
                json!({"audiences": [{"name": "fans", "size": 4}, {"name": "spenders", "size": 2}]}),
            ],
            Gathered::Sizes,
            100,
        );
        assert_eq!(sizes, json!({"audiences": [{"name": "fans", "size": 7}, {"name": "spenders", "size": 2}]}));
        let rows = put_together(
            vec![
                json!({"actions": [{"id": 2, "occurred_ms": 30}, {"id": 1, "occurred_ms": 10}]}),
                json!({"actions": [{"id": 1, "occurred_ms": 20}]}),
            ],
            Gathered::Rows { key: "actions", time: "occurred_ms" },
            2,
        );
        assert_eq!(rows, json!({"actions": [{"id": 2, "occurred_ms": 30}, {"id": 1, "occurred_ms": 20}]}));
    }

    #[test]
    fn sampled_sizes_add_up_at_each_moment_with_each_nodes_latest_sample() {
        let history = put_together(
            vec![
                json!({"audience": "fans", "samples": [{"at": "2026-01-01T00:01:00.000Z", "size": 3},
                                                       {"at": "2026-01-01T00:03:00.000Z", "size": 5}]}),
                json!({"audience": "fans", "samples": [{"at": "2026-01-01T00:02:00.000Z", "size": 10},
                                                       {"at": "2026-01-01T00:03:00.000Z", "size": 11}]}),
            ],
            Gathered::SizeHistory,
            100,
        );
        assert_eq!(
            history,
            json!({"audience": "fans", "samples": [{"at": "2026-01-01T00:01:00.000Z", "size": 3},
                                                   {"at": "2026-01-01T00:02:00.000Z", "size": 13},
                                                   {"at": "2026-01-01T00:03:00.000Z", "size": 16}]})
        );
    }

    #[test]
    fn an_audience_a_preview_and_a_backtest_add_up_over_the_nodes() {
        let audience = put_together(
            vec![
                json!({"name": "fans", "size": 3, "backfill": {"version": 2, "done": 5, "total": 9, "finished": false}}),
                json!({"name": "fans", "size": 4, "backfill": {"version": 2, "done": 8, "total": 8, "finished": true}}),
            ],
            Gathered::Audience,
            100,
        );
        assert_eq!(
            audience,
            json!({"name": "fans", "size": 7, "backfill": {"version": 2, "done": 13, "total": 17, "finished": false}})
        );
        let ids = |from: u32, n: u32| (from..from + n).map(|i| json!(format!("p{i}"))).collect::<Vec<_>>();
        let preview = put_together(
            vec![
                json!({"size": 6, "profiles": 50, "overlap": [{"audience": "fans", "overlap": 2}], "sample": ids(0, 6), "elapsed_ms": 40}),
                json!({"size": 7, "profiles": 60, "overlap": [{"audience": "fans", "overlap": 3}], "sample": ids(10, 7), "elapsed_ms": 70}),
            ],
            Gathered::Preview,
            100,
        );
        let sample = [ids(0, 6), ids(10, 4)].concat();
        assert_eq!(
            preview,
            json!({"size": 13, "profiles": 110, "overlap": [{"audience": "fans", "overlap": 5}], "sample": sample, "elapsed_ms": 70})
        );
        let backtest = put_together(
            vec![
                json!({"since": "t", "events": 300, "profiles": 30, "elapsed_ms": 100, "events_per_second": 3000,
                       "audiences": [{"audience": "fans", "running": 3, "new": 4, "stored_size": 3},
                                     {"audience": "added", "running": null, "new": 1, "stored_size": null}],
                       "actions": [{"action": "welcome", "running": 2, "new": 2}]}),
                json!({"since": "t", "events": 500, "profiles": 40, "elapsed_ms": 200, "events_per_second": 2500,
                       "audiences": [{"audience": "fans", "running": 5, "new": 6, "stored_size": 5},
                                     {"audience": "added", "running": null, "new": 2, "stored_size": null}],
                       "actions": [{"action": "welcome", "running": 1, "new": 0}]}),
            ],
            Gathered::Backtest,
            100,
        );
        assert_eq!(
            backtest,
            json!({"since": "t", "events": 800, "profiles": 70, "elapsed_ms": 200, "events_per_second": 4000,
                   "audiences": [{"audience": "fans", "running": 8, "new": 10, "stored_size": 8},
                                 {"audience": "added", "running": null, "new": 3, "stored_size": null}],
                   "actions": [{"action": "welcome", "running": 3, "new": 2}]})
        );
    }
}
