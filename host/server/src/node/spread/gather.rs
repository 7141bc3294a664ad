//! Reads over every profile on a spread node. Each node holds only its own partitions'
//! profiles, memberships, actions and dead letters, so the node asked gathers every live
//! node's answer for its own share: audience sizes add up, lists go together (newest first,
//! as long as the limit asked).

use super::{Front, to_engine};
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
}

/// How `request` is gathered, if it reads over every profile (and was not forwarded by a node
/// gathering it).
pub(super) fn gathered(request: &Request) -> Option<Gathered> {
    if request.method() != Method::GET || request.headers().contains_key(FORWARDED_HEADER) {
        return None;
    }
    match request.uri().path() {
        "/v1/audiences" => Some(Gathered::Sizes),
        "/v1/actions" => Some(Gathered::Rows { key: "actions", time: "occurred_ms" }),
        "/v1/dead-letters" => Some(Gathered::Rows { key: "dead_letters", time: "died_ms" }),
        _ => None,
    }
}

/// Answers `request` with this node's answer and every other live node's, put together.
pub(super) async fn gather(front: &Front, request: Request, how: Gathered) -> Response {
    let (parts, _) = request.into_parts();
    let again = || Request::from_parts(parts.clone(), axum::body::Body::empty());
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
                for other in body["audiences"].as_array().into_iter().flatten() {
                    let mine = first["audiences"]
                        .as_array_mut()
                        .and_then(|a| a.iter_mut().find(|a| a["name"] == other["name"]));
                    if let Some(mine) = mine {
                        let size = mine["size"].as_i64().unwrap_or(0) + other["size"].as_i64().unwrap_or(0);
                        mine["size"] = size.into();
                    }
                }
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
    }
    first
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
}
