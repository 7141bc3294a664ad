//! `starling import`: sends an offline file to a running server in parts, with a progress bar.
//! The server records progress per file, so running the same command again after an
//! interruption continues where it stopped.

use crate::client::{Client, ServerArgs};
use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};
use std::path::PathBuf;

#[derive(clap::Args)]
pub(crate) struct Options {
    /// The CSV (with a header) or JSON-lines file.
    file: PathBuf,
    /// The `[[import]]` definition of the server's configuration that maps the file's columns.
    #[arg(long)]
    definition: String,
    /// csv or jsonl (default: from the file's extension).
    #[arg(long)]
    format: Option<String>,
    /// Rows sent per request.
    #[arg(long, default_value_t = 5_000)]
    rows_per_request: usize,
    #[command(flatten)]
    server: ServerArgs,
}

/// One request's worth of the file.
struct Part {
    body: Vec<u8>,
    first_row: i64,
    last_row: i64,
    /// File line of the part's line 1 minus one, so the server can name file lines.
    line_offset: u64,
}

pub(crate) fn run(options: Options) -> Result<()> {
    let bytes = std::fs::read(&options.file).with_context(|| format!("reading {}", options.file.display()))?;
    let format = match options.format.as_deref() {
        Some(f @ ("csv" | "jsonl")) => f.to_string(),
        Some(other) => bail!("--format: `{other}` is not csv or jsonl"),
        None => match options.file.extension().and_then(|e| e.to_str()) {
            Some("csv") => "csv".into(),
            Some("jsonl" | "ndjson") => "jsonl".into(),
            _ => bail!("{}: say --format csv or --format jsonl", options.file.display()),
        },
    };
    let sha = hex::encode(Sha256::digest(&bytes));
    let per = options.rows_per_request.max(1);
    let parts = if format == "csv" { csv_parts(&bytes, per)? } else { jsonl_parts(&bytes, per)? };
    let total = parts.last().map_or(0, |p| p.last_row);
    let client = Client::new(&options.server)?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async {
        let progress_url = client.url(["v1", "imports", options.definition.as_str(), sha.as_str()]);
        let done = match client.json(client.request(reqwest::Method::GET, progress_url)).await {
            Ok(answer) => answer["progress"]["rows_done"].as_i64().unwrap_or(0),
            Err(e) if e.to_string().starts_with("404") => 0,
            Err(e) => return Err(e),
        };
        let bar = indicatif::ProgressBar::new(total as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template("{spinner} {bar:40} {pos}/{len} rows  {per_sec}  eta {eta}  {msg}")
                .expect("a valid template"),
        );
        bar.set_position(done.min(total) as u64);
        let mut totals = Totals::default();
        for part in parts.iter().filter(|p| p.last_row > done) {
            let mut url = client.url(["v1", "imports", options.definition.as_str()]);
            url.query_pairs_mut()
                .append_pair("format", &format)
                .append_pair("file", &sha)
                .append_pair("first_row", &part.first_row.to_string())
                .append_pair("line_offset", &part.line_offset.to_string());
            let request = client.request(reqwest::Method::POST, url).body(part.body.clone());
            let summary = match client.json(request).await {
                Ok(summary) => summary,
                Err(e) => {
                    bar.abandon();
                    bail!(
                        "import stopped at row {}: {e}\nrun the same command again to continue from there",
                        part.first_row
                    );
                }
            };
            totals.add(&summary);
            bar.set_position(part.last_row as u64);
            bar.set_message(format!(
                "{} applied, {} unmatched, {} rejected",
                totals.applied, totals.unmatched, totals.rejected
            ));
        }
        bar.finish();
        let resumed = if done > 0 { format!(" (continued after row {done})") } else { String::new() };
        println!(
            "imported {} with `{}`: {total} rows, {} applied, {} unmatched, {} rejected, {} already applied{resumed}",
            options.file.display(),
            options.definition,
            totals.applied,
            totals.unmatched,
            totals.rejected,
            totals.duplicates
        );
        for r in &totals.listed {
            println!("  row {} (line {}): {}", r["row"], r["line"], r["reason"].as_str().unwrap_or_default());
        }
        Ok(())
    })
}

#[derive(Default)]
struct Totals {
    applied: i64,
    unmatched: i64,
    rejected: i64,
    duplicates: i64,
    listed: Vec<serde_json::Value>,
}

impl Totals {
    fn add(&mut self, summary: &serde_json::Value) {
        let n = |k: &str| summary[k].as_i64().unwrap_or(0);
        self.applied += n("applied");
        self.unmatched += n("unmatched");
        self.rejected += n("rejected_count");
        self.duplicates += n("duplicates");
        if let Some(rejected) = summary["rejected"].as_array() {
            self.listed.extend(rejected.iter().take(100usize.saturating_sub(self.listed.len())).cloned());
        }
    }
}

/// The CSV file in parts of `per` rows, each with the header.
fn csv_parts(bytes: &[u8], per: usize) -> Result<Vec<Part>> {
    let mut reader = csv::ReaderBuilder::new().flexible(true).from_reader(bytes);
    let header = reader.byte_headers().context("reading the CSV header")?.clone();
    let mut parts = Vec::new();
    let mut records = reader.byte_records().peekable();
    let mut row = 1i64;
    while records.peek().is_some() {
        let mut writer = csv::Writer::from_writer(Vec::new());
        writer.write_byte_record(&header)?;
        let (first_row, mut line_offset) = (row, None);
        for record in records.by_ref().take(per) {
            let record = record.map_err(|e| anyhow::anyhow!("row {row}: malformed CSV: {e}"))?;
            line_offset.get_or_insert(record.position().map_or(0, |p| p.line().saturating_sub(2)));
            writer.write_byte_record(&record)?;
            row += 1;
        }
        parts.push(Part {
            body: writer.into_inner().map_err(|e| anyhow::anyhow!("{e}"))?,
            first_row,
            last_row: row - 1,
            line_offset: line_offset.unwrap_or(0),
        });
    }
    Ok(parts)
}

/// The JSON-lines file in parts of `per` non-empty lines.
fn jsonl_parts(bytes: &[u8], per: usize) -> Result<Vec<Part>> {
    let text = std::str::from_utf8(bytes).context("the file is not UTF-8")?;
    let lines: Vec<(usize, &str)> = text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()).collect();
    let mut parts = Vec::new();
    let mut first_row = 1i64;
    for chunk in lines.chunks(per) {
        let first_line = chunk[0].0;
        // Blank lines inside the part are kept, so the server's line numbers stay right.
        let last_line = chunk[chunk.len() - 1].0;
        let body = text.lines().skip(first_line).take(last_line - first_line + 1).collect::<Vec<_>>().join("\n");
        parts.push(Part {
            body: body.into_bytes(),
            first_row,
            last_row: first_row + chunk.len() as i64 - 1,
            line_offset: first_line as u64,
        });
        first_row += chunk.len() as i64;
    }
    Ok(parts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_keep_row_numbers_and_file_lines() {
        let csv = b"k,v\na,1\nb,\"two\nlines\"\nc,3\n";
        let parts = csv_parts(csv, 2).unwrap();
        assert_eq!(
            parts.iter().map(|p| (p.first_row, p.last_row, p.line_offset)).collect::<Vec<_>>(),
            [(1, 2, 0), (3, 3, 3)]
        );
        assert_eq!(parts[1].body, b"k,v\nc,3\n");
        let jsonl = b"{\"a\":1}\n\n{\"a\":2}\n{\"a\":3}\n";
        let parts = jsonl_parts(jsonl, 2).unwrap();
        assert_eq!(
            parts.iter().map(|p| (p.first_row, p.last_row, p.line_offset)).collect::<Vec<_>>(),
            [(1, 2, 0), (3, 3, 3)]
        );
        assert_eq!(parts[0].body, b"{\"a\":1}\n\n{\"a\":2}");
    }
}
