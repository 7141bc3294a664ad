//! Changing a running server's configuration, and seeing what a change would do first:
//! `starling config apply`, `starling config diff`, `starling audience preview` and
//! `starling backtest`.

use crate::client::{Client, ServerArgs};
use anyhow::{Context, Result, bail};
use starling_core::evolve::Plan;
use std::path::Path;

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread().enable_all().build()?)
}

fn read(file: &Path) -> Result<String> {
    std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))
}

/// Sends `body` and reads the JSON answer; a 400 listing `errors` (with positions) becomes an
/// error naming `file`, line and column of each.
async fn send(client: &Client, request: reqwest::RequestBuilder, file: &str) -> Result<serde_json::Value> {
    let request = request.build()?;
    let url = request.url().clone();
    let response = client.http.execute(request).await.with_context(|| format!("calling {url}"))?;
    let status = response.status();
    let text = response.text().await.with_context(|| format!("reading the answer of {url}"))?;
    let body: serde_json::Value = serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text));
    if status.is_success() {
        return Ok(body);
    }
    let reason = body["error"].as_str().map_or_else(|| body.to_string(), str::to_string);
    match body["errors"].as_array() {
        Some(errors) => {
            let listed: Vec<String> = errors
                .iter()
                .map(|e| format!("{file}:{}:{}: {}", e["line"], e["column"], e["message"].as_str().unwrap_or("")))
                .collect();
            bail!("{}\n{reason}", listed.join("\n"))
        }
        None => bail!("{status}: {reason}"),
    }
}

/// `starling config apply FILE`: checks and applies FILE on the running server, then follows
/// the backfill it started with a progress bar (unless `no_wait`).
pub(crate) fn apply(server: &ServerArgs, file: &Path, no_wait: bool) -> Result<()> {
    let text = read(file)?;
    let client = Client::new(server)?;
    runtime()?.block_on(async {
        let request = client
            .request(reqwest::Method::PUT, client.url(["v1", "config"]))
            .header(reqwest::header::CONTENT_TYPE, "application/toml")
            .body(text);
        let applied = send(&client, request, &file.display().to_string()).await?;
        if applied["unchanged"].as_bool() == Some(true) {
            println!("{}: unchanged (version {})", file.display(), applied["version"]);
            return Ok(());
        }
        println!("{}: applied as version {}", file.display(), applied["version"]);
        print!("{}", applied["summary"].as_str().unwrap_or_default());
        for (key, what) in
            [("deliveries_cancelled", "pending deliveries cancelled"), ("memberships_removed", "memberships removed")]
        {
            if applied[key].as_u64().unwrap_or(0) > 0 {
                println!("{} {what}", applied[key]);
            }
        }
        if applied["backfill"].is_null() || no_wait {
            return Ok(());
        }
        follow_backfill(&client, applied["version"].as_i64().unwrap_or(0)).await
    })
}

/// Polls `GET /v1/config` until the backfill of `version` is done, with a progress bar.
async fn follow_backfill(client: &Client, version: i64) -> Result<()> {
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template("backfill {bar:40} {pos}/{len} profiles  {per_sec}  eta {eta}")
            .expect("template"),
    );
    loop {
        let config = client.json(client.request(reqwest::Method::GET, client.url(["v1", "config"]))).await?;
        let backfill = &config["backfill"];
        if backfill["version"].as_i64() != Some(version) {
            bar.abandon();
            bail!("a newer configuration (version {}) took over the backfill", config["version"]);
        }
        bar.set_length(backfill["total"].as_u64().unwrap_or(0));
        bar.set_position(backfill["done"].as_u64().unwrap_or(0));
        if let Some(stopped) = backfill["stopped"].as_str() {
            bar.abandon();
            bail!("the backfill stopped: {stopped}");
        }
        if backfill["finished"].as_bool() == Some(true) {
            bar.finish();
            println!("backfill done: {} profiles changed", backfill["changed"]);
            return Ok(());
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

/// `starling config diff OLD NEW`: what replacing OLD with NEW would do, read offline.
pub(crate) fn diff(old: &Path, new: &Path) -> Result<()> {
    let parse = |file: &Path| -> Result<starling_core::Model> {
        let text = read(file)?;
        starling_core::parse(&text)
            .map_err(|errors| anyhow::anyhow!("{}", errors.render(&file.display().to_string()).trim_end()))
    };
    let plan = Plan::new(&parse(old)?, &parse(new)?);
    print!("{plan}");
    Ok(())
}

/// `starling audience preview --rule RULE`: the exact size of a rule over the stored profiles.
pub(crate) fn preview(server: &ServerArgs, rule: &str, json: bool) -> Result<()> {
    let client = Client::new(server)?;
    let answer = runtime()?.block_on(async {
        let request =
            client.request(reqwest::Method::POST, client.url(["v1", "audiences", "preview"])).body(rule.to_string());
        client.json(request).await
    })?;
    if json {
        println!("{}", serde_json::to_string_pretty(&answer)?);
        return Ok(());
    }
    println!("{} of {} profiles match ({} ms)", answer["size"], answer["profiles"], answer["elapsed_ms"]);
    let overlap = answer["overlap"].as_array().cloned().unwrap_or_default();
    if !overlap.is_empty() {
        println!("{:<32} {:>12}", "overlap with", "profiles");
        for o in overlap {
            println!("{:<32} {:>12}", o["audience"].as_str().unwrap_or(""), o["overlap"]);
        }
    }
    let sample: Vec<&str> = answer["sample"].as_array().into_iter().flatten().filter_map(|s| s.as_str()).collect();
    if !sample.is_empty() {
        println!("sample: {}", sample.join(", "));
    }
    Ok(())
}

/// `starling backtest FILE --since 7d`: the recorded events replayed through the running
/// configuration and through FILE, delivering nothing.
pub(crate) fn backtest(server: &ServerArgs, file: &Path, since: &str, json: bool) -> Result<()> {
    let text = read(file)?;
    let client = Client::new(server)?;
    let report = runtime()?.block_on(async {
        let mut url = client.url(["v1", "backtest"]);
        url.query_pairs_mut().append_pair("since", since);
        let request = client.request(reqwest::Method::POST, url).body(text);
        send(&client, request, &file.display().to_string()).await
    })?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!(
        "{} events since {} over {} profiles, replayed through both configurations in {} ms ({} events/s)",
        report["events"],
        report["since"].as_str().unwrap_or(""),
        report["profiles"],
        report["elapsed_ms"],
        report["events_per_second"]
    );
    let cell = |v: &serde_json::Value| v.as_u64().map_or("-".to_string(), |n| n.to_string());
    println!("\n{:<32} {:>10} {:>10} {:>10}", "audience", "running", "new", "change");
    for a in report["audiences"].as_array().into_iter().flatten() {
        let change = match (a["running"].as_i64(), a["new"].as_i64()) {
            (Some(r), Some(n)) => format!("{:+}", n - r),
            (None, Some(_)) => "added".into(),
            (Some(_), None) => "removed".into(),
            _ => String::new(),
        };
        println!(
            "{:<32} {:>10} {:>10} {:>10}",
            a["audience"].as_str().unwrap_or(""),
            cell(&a["running"]),
            cell(&a["new"]),
            change
        );
    }
    println!("\n{:<32} {:>10} {:>10}   (times fired)", "action", "running", "new");
    for a in report["actions"].as_array().into_iter().flatten() {
        println!("{:<32} {:>10} {:>10}", a["action"].as_str().unwrap_or(""), cell(&a["running"]), cell(&a["new"]));
    }
    Ok(())
}
