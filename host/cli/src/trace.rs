//! `starling trace ID`: follows a visitor's events live, one line per step.

use crate::client::{Client, ServerArgs};
use anyhow::{Result, bail};

#[derive(clap::Args)]
pub(crate) struct Options {
    /// A visitor id (or any id linked to the profile).
    id: String,
    /// Print each step as a JSON line instead of text.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    server: ServerArgs,
}

pub(crate) fn run(options: Options) -> Result<()> {
    let client = Client::new(&options.server)?;
    let url = client.url(["v1", "trace", options.id.as_str()]);
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async {
        let mut response = client.request(reqwest::Method::GET, url.clone()).send().await?;
        if !response.status().is_success() {
            let status = response.status();
            bail!("{status}: {}", response.text().await.unwrap_or_default());
        }
        let mut buffer = String::new();
        while let Some(chunk) = response.chunk().await? {
            buffer.push_str(&String::from_utf8_lossy(&chunk));
            // Server-sent events end with a blank line; each holds one `data:` line here.
            while let Some(end) = buffer.find("\n\n") {
                let message: String = buffer.drain(..end + 2).collect();
                let Some(data) = message.lines().find_map(|l| l.strip_prefix("data:")) else { continue };
                let Ok(step) = serde_json::from_str::<serde_json::Value>(data.trim()) else { continue };
                if options.json {
                    println!("{step}");
                } else {
                    println!("{}", describe(&step));
                }
            }
        }
        bail!("the server closed the trace")
    })
}

/// One step as a line of text.
fn describe(step: &serde_json::Value) -> String {
    let list = |v: &serde_json::Value| {
        v.as_array().map_or(String::new(), |a| a.iter().filter_map(|x| x.as_str()).collect::<Vec<_>>().join(", "))
    };
    match step["step"].as_str().unwrap_or("?") {
        "tracing" => format!("tracing {} (profile {}); waiting for events…", step["id"], step["profile_id"]),
        "received" => format!(
            "{} {} from {} → profile {}{}{}  data {}",
            step["timestamp"].as_str().unwrap_or_default(),
            step["event"].as_str().unwrap_or_default(),
            step["visitor_id"].as_str().unwrap_or_default(),
            step["profile_id"].as_str().unwrap_or_default(),
            if step["new_visitor"] == true { ", new visitor" } else { "" },
            if step["new_visit"] == true { ", new visit" } else { "" },
            step["data"]
        ),
        "enriched" => {
            let changed = step["changed"]
                .as_object()
                .map_or(String::new(), |m| m.iter().map(|(k, v)| format!("{k} = {v}")).collect::<Vec<_>>().join(", "));
            let mut line =
                format!("  enriched: {}", if changed.is_empty() { "nothing changed".into() } else { changed });
            for w in step["warnings"].as_array().into_iter().flatten() {
                line.push_str(&format!("\n  warning: {}", w.as_str().unwrap_or_default()));
            }
            line
        }
        "evaluated" => {
            let mut line = format!(
                "  audiences: joined [{}], left [{}]; member of [{}]",
                list(&step["joined"]),
                list(&step["left"]),
                list(&step["audiences"])
            );
            for (audience, why) in step["conditions"].as_object().into_iter().flatten() {
                line.push_str(&format!("\n    {audience}: {why}"));
            }
            line
        }
        "queued" => match step["actions"].as_array() {
            Some(a) if !a.is_empty() => format!(
                "  queued: {}",
                a.iter()
                    .map(|x| format!(
                        "{} via {} ({})",
                        x["action"].as_str().unwrap_or_default(),
                        x["connector"].as_str().unwrap_or_default(),
                        x["trigger"].as_str().unwrap_or_default()
                    ))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            _ => "  queued: no actions".into(),
        },
        "committed" => "  stored".into(),
        "delivery" => format!(
            "  delivery of {} via {}: {} (attempt {}, {:.1} ms){}",
            step["action"].as_str().unwrap_or_default(),
            step["connector"].as_str().unwrap_or_default(),
            step["result"].as_str().unwrap_or_default(),
            step["attempt"],
            step["elapsed_ms"].as_f64().unwrap_or(0.0),
            step["error"].as_str().map(|e| format!(": {e}")).unwrap_or_default()
        ),
        "deleted" => format!("profile deleted ({})", step["reason"].as_str().unwrap_or_default()),
        "lagged" => format!("  … {} steps missed (reading too slowly)", step["missed"]),
        other => format!("{other}: {step}"),
    }
}
