//! How deliveries ended, carried from the node that delivers to the copies of its state that
//! other nodes keep (a standby following the event stream). Copies match an outcome to their
//! own row by the action's origin: the place in the event log that decided it, the same in
//! every copy.

use crate::{Attempt, OutboxStatus, Result};
use rusqlite::{Connection, OptionalExtension};
use starling_core::model::Trigger;

/// One action's delivery, ended (delivered, failed, given up on or cancelled).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Outcome {
    pub origin: String,
    pub attempt: Attempt,
    pub at_ms: i64,
}

/// What taking an outcome did to this copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Taken {
    /// The pending row ended as the outcome says.
    Ended,
    /// The row had ended here already (a snapshot brought it), or is gone.
    Settled,
    /// No row has the origin yet: this copy has not applied the record that decides it.
    NotYet,
}

/// Records `attempt` on row `id`. A deletion notice names the deleted person: once delivered,
/// or given up on, nothing of it is kept (one given up on leaves an audit record without
/// personal data).
pub fn conclude(conn: &Connection, id: i64, trigger: Trigger, attempt: &Attempt, now_ms: i64) -> Result<()> {
    crate::record_attempt(conn, id, attempt, now_ms)?;
    if trigger == Trigger::Deleted {
        match attempt {
            Attempt::Delivered => crate::forget_action(conn, id)?,
            Attempt::Fail { .. } | Attempt::Bury { .. } => crate::forget_failed_deletion_notice(conn, id, now_ms)?,
            Attempt::Retry { .. } | Attempt::Cancel { .. } => {}
        }
    }
    Ok(())
}

/// Ends this copy's row for `outcome.origin` as the delivering node ended its own.
pub fn take(conn: &Connection, outcome: &Outcome) -> Result<Taken> {
    let row: Option<(i64, Trigger, OutboxStatus)> = conn
        .prepare_cached("SELECT id, trigger, status FROM outbox WHERE origin = ?1")?
        .query_row([&outcome.origin], |r| Ok((r.get(0)?, crate::trigger_at(r, 1)?, r.get(2)?)))
        .optional()?;
    let Some((id, trigger, status)) = row else {
        let buried = conn.prepare_cached("SELECT 1 FROM dead_letters WHERE origin = ?1")?.exists([&outcome.origin])?;
        return Ok(if buried { Taken::Settled } else { Taken::NotYet });
    };
    if status != OutboxStatus::Pending {
        return Ok(Taken::Settled);
    }
    conclude(conn, id, trigger, &outcome.attempt, outcome.at_ms)?;
    Ok(Taken::Ended)
}
