//! `starling check`: reads a stopped server's files end to end and says what it found: SQLite's
//! `integrity_check` over the database, and every event log record against its checksum.

use anyhow::{Result, bail};
use std::path::Path;

/// Most problems SQLite lists.
const MAX_PROBLEMS: usize = 100;

pub(crate) fn run(database: &Path) -> Result<()> {
    if !database.is_file() {
        bail!("no database at {}", database.display());
    }
    let mut damaged = false;
    match starling_store::check_integrity(database, starling_store::Integrity::Full, MAX_PROBLEMS) {
        Ok(()) => println!("database {}: integrity_check ok", database.display()),
        Err(starling_store::StoreError::Damaged { problems, .. }) => {
            damaged = true;
            println!("database {}: integrity_check found {} problem(s):", database.display(), problems.len());
            for problem in problems {
                println!("  {problem}");
            }
        }
        Err(e) => return Err(e.into()),
    }
    let log = starling_store::log_dir(database);
    if log.is_dir() {
        let report = starling_log::SegmentLog::check(&log)?;
        println!(
            "event log {}: {} segment(s), {} whole record(s), {} bytes",
            log.display(),
            report.segments,
            report.records,
            report.bytes
        );
        if let Some((segment, bytes, reason)) = &report.torn_tail {
            println!(
                "  the last record is not whole ({reason}): {bytes} bytes at the end of {segment}, cut at the next start"
            );
        }
        for problem in &report.damaged {
            damaged = true;
            println!("  {problem}");
        }
    } else {
        println!("event log {}: none", log.display());
    }
    if damaged {
        bail!("damage found; restore a backup (`starling restore`) or start from the log");
    }
    println!("no damage found");
    Ok(())
}
