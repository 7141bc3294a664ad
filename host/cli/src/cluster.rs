//! `starling cluster status`: what a cluster node sees of the cluster (`GET /v1/cluster`), as a
//! summary an operator reads at a glance, or as the node's JSON.

use crate::client::{Client, ServerArgs};
use anyhow::{Result, bail};
use serde_json::Value;
use std::collections::BTreeMap;
use std::fmt::Write;

/// Prints what the node at `server` says of the cluster.
pub(crate) fn status(server: &ServerArgs, json: bool) -> Result<()> {
    let client = Client::new(server)?;
    let url = client.url(["v1", "cluster"]);
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let view = runtime.block_on(async {
        let response = client.request(reqwest::Method::GET, url.clone()).send().await?;
        if response.status() == reqwest::StatusCode::NOT_FOUND {
            bail!("{} is not a cluster node (it has no `[cluster]` settings): GET {url} answered 404", server.server);
        }
        client.json(client.request(reqwest::Method::GET, url)).await
    })?;
    match json {
        true => println!("{}", serde_json::to_string_pretty(&view)?),
        false => print!("{}", summary(&view)),
    }
    Ok(())
}

/// `view` (a node's `GET /v1/cluster`) as lines of text.
fn summary(view: &Value) -> String {
    let mut out = String::new();
    let node = view["node"].as_str().unwrap_or("?");
    let placement = view["placement"].as_str().unwrap_or("?");
    let known = |value: &Value| match value {
        Value::Null => "not known (the servers did not answer)".to_string(),
        value => value.to_string(),
    };
    let _ = writeln!(out, "node {node}, partitions placed {placement}");
    let _ = writeln!(out, "configuration version {}", known(&view["config_version"]));
    let _ = writeln!(out, "stream leader {}", view["stream_leader"].as_str().unwrap_or("not known"));
    let per_node: BTreeMap<String, u64> = view["partitions_per_node"]
        .as_object()
        .map(|o| o.iter().map(|(n, c)| (n.clone(), c.as_u64().unwrap_or(0))).collect())
        .unwrap_or_default();
    let _ = writeln!(out, "nodes:");
    for peer in view["nodes"].as_array().into_iter().flatten() {
        let name = peer["node"].as_str().unwrap_or("?");
        let share = match placement {
            "spread" => format!(", owns {} partitions", per_node.get(name).copied().unwrap_or(0)),
            _ if view["owner"].as_str() == Some(name) => ", owns every partition".to_string(),
            _ => ", stands by".to_string(),
        };
        let me = if name == node { " (this node)" } else { "" };
        let _ = writeln!(
            out,
            "  {name}{me}: {}, configuration version {}{share}",
            peer["url"].as_str().unwrap_or("no URL"),
            known(&peer["config_version"]),
        );
    }
    match placement {
        "spread" => {
            let owned = view["owned"].as_array().map_or(0, Vec::len);
            let owners = view["owners"].as_object().map_or(0, |o| o.len());
            let _ = writeln!(out, "this node applies {owned} partitions live");
            if owners < 64 {
                let _ = writeln!(out, "partitions no node owns: {} (a failover or a rebalance)", 64 - owners);
            }
        }
        _ => {
            let serving = view["serving"].as_bool() == Some(true);
            let _ = writeln!(out, "this node {}", if serving { "serves" } else { "stands by" });
            let following = &view["following"];
            if let Some(applied) = following["applied_position"].as_u64() {
                let _ = writeln!(
                    out,
                    "its copy: applied through stream position {applied}, {} behind",
                    known(&following["positions_behind"])
                );
            }
        }
    }
    let _ = writeln!(out, "events taken in, waiting to be applied: {}", known(&view["intake_held"]));
    let stream = &view["stream"];
    if stream.is_object() {
        let _ = writeln!(
            out,
            "the stream holds {} records ({} bytes), last position {}",
            stream["records"], stream["bytes"], stream["last_position"]
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::summary;
    use serde_json::json;

    #[test]
    fn a_spread_nodes_view_says_each_nodes_share_and_what_is_not_known() {
        let owners: serde_json::Map<String, serde_json::Value> =
            (0..60).map(|p| (p.to_string(), json!(if p % 2 == 0 { "a" } else { "b" }))).collect();
        let view = json!({
            "node": "a", "placement": "spread", "serving": true, "partitions_held": 30,
            "owned": (0..30).collect::<Vec<u32>>(), "owners": owners,
            "partitions_per_node": {"a": 30, "b": 30}, "stream_leader": "n1", "config_version": 2,
            "intake_held": null, "stream": {"records": 64, "bytes": 9000, "last_position": 4000},
            "nodes": [{"node": "a", "url": "http://10.0.0.1:8080", "config_version": 2},
                      {"node": "b", "url": "http://10.0.0.2:8080", "config_version": 1}],
        });
        let text = summary(&view);
        for line in [
            "node a, partitions placed spread",
            "  a (this node): http://10.0.0.1:8080, configuration version 2, owns 30 partitions",
            "  b: http://10.0.0.2:8080, configuration version 1, owns 30 partitions",
            "this node applies 30 partitions live",
            "partitions no node owns: 4 (a failover or a rebalance)",
            "events taken in, waiting to be applied: not known (the servers did not answer)",
            "the stream holds 64 records (9000 bytes), last position 4000",
        ] {
            assert!(text.lines().any(|l| l == line), "no line `{line}` in:\n{text}");
        }
    }

    #[test]
    fn a_standbys_view_says_who_serves_and_how_far_its_copy_is() {
        let view = json!({
            "node": "b", "placement": "whole", "serving": false, "partitions_held": 0, "owner": "a",
            "stream_leader": "n0", "config_version": 3, "intake_held": 0,
            "following": {"applied_position": 48213, "stream_position": 48240, "positions_behind": 27},
            "nodes": [{"node": "a", "url": "http://10.0.0.1:8080", "config_version": 3},
                      {"node": "b", "url": "http://10.0.0.2:8080", "config_version": 3}],
        });
        let text = summary(&view);
        for line in [
            "node b, partitions placed whole",
            "  a: http://10.0.0.1:8080, configuration version 3, owns every partition",
            "  b (this node): http://10.0.0.2:8080, configuration version 3, stands by",
            "this node stands by",
            "its copy: applied through stream position 48213, 27 behind",
            "events taken in, waiting to be applied: 0",
        ] {
            assert!(text.lines().any(|l| l == line), "no line `{line}` in:\n{text}");
        }
    }
}
