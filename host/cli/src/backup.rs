//! `starling backup` and `starling restore`: a consistent copy of a serving instance's database,
//! and putting one in place for a server to start from.

use anyhow::{Context, Result, bail};
use std::path::Path;

/// Saves the running server's database into `file` (written beside it, then renamed).
pub(crate) fn backup(server: &crate::client::ServerArgs, file: &Path) -> Result<()> {
    if file.exists() {
        bail!("{} exists; give a new file", file.display());
    }
    let client = crate::client::Client::new(server)?;
    let url = client.url(["v1", "backup"]);
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let partial = file.with_extension("partial");
    let started = std::time::Instant::now();
    let (position, bytes) = runtime.block_on(async {
        let mut response =
            client.request(reqwest::Method::GET, url.clone()).send().await.with_context(|| format!("calling {url}"))?;
        if !response.status().is_success() {
            let status = response.status();
            bail!("{status}: {}", response.text().await.unwrap_or_default());
        }
        let position = response
            .headers()
            .get("x-starling-log-position")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("unknown")
            .to_string();
        let mut out =
            tokio::fs::File::create(&partial).await.with_context(|| format!("creating {}", partial.display()))?;
        let mut bytes = 0u64;
        while let Some(chunk) = response.chunk().await.context("reading the backup")? {
            tokio::io::AsyncWriteExt::write_all(&mut out, &chunk).await?;
            bytes += chunk.len() as u64;
        }
        out.sync_all().await?;
        Ok((position, bytes))
    })?;
    starling_store::check_integrity(&partial, starling_store::Integrity::Quick, 10)
        .with_context(|| format!("the backup received into {} does not check", partial.display()))?;
    std::fs::rename(&partial, file)?;
    println!(
        "backup {}: {bytes} bytes in {:.2} s, reflecting event log position {position}",
        file.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Puts the backup `file` in place as the database at `database`, which must not exist (or,
/// with `force`, is replaced along with its event log).
pub(crate) fn restore(file: &Path, database: &Path, force: bool) -> Result<()> {
    starling_store::check_integrity(file, starling_store::Integrity::Full, 10)
        .with_context(|| format!("{} is not a usable backup", file.display()))?;
    let log = starling_store::log_dir(database);
    let beside = |suffix: &str| {
        let mut name = database.as_os_str().to_owned();
        name.push(suffix);
        std::path::PathBuf::from(name)
    };
    if database.exists() || log.exists() {
        if !force {
            bail!(
                "{} already holds a database or an event log; stop its server and give --force to replace them",
                database.display()
            );
        }
        for path in [database.to_path_buf(), beside("-wal"), beside("-shm")] {
            if path.exists() {
                std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
            }
        }
        if log.exists() {
            std::fs::remove_dir_all(&log).with_context(|| format!("removing {}", log.display()))?;
        }
    }
    if let Some(dir) = database.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let partial = database.with_extension("restoring");
    std::fs::copy(file, &partial).with_context(|| format!("copying {}", file.display()))?;
    std::fs::File::open(&partial)?.sync_all()?;
    std::fs::rename(&partial, database)?;
    println!("restored {} into {}; start the server on it", file.display(), database.display());
    Ok(())
}
