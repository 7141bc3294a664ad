//! What a record changed of the ids that other partitions' work reads (docs/capacity.md): a
//! record carries its changes, so that a node following a partition it does not own applies
//! them instead of the record's work.

use starling_log::Position;

/// One change to which profile an id belongs.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "change", rename_all = "snake_case")]
pub enum IdChange {
    /// `id` was linked to `profile`; `claimed`: by a claim, which the record's position orders
    /// against other partitions' claims on the id.
    Linked {
        id: String,
        profile: String,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        claimed: bool,
    },
    /// Every id of `absorbed` moved to `survivor`, and `absorbed` is gone; `origin`: the name
    /// of the merge handed on, if it was (applied: not to be applied again).
    Merged {
        absorbed: String,
        survivor: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        origin: Option<String>,
    },
    /// `id` was split out of `from` into a profile of its own; `events`: those that moved with
    /// it, when its partition is another node's, which adopts them (see [`Adoption`]).
    Split {
        id: String,
        from: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        events: Option<Vec<starling_core::Event>>,
    },
    /// `id` is a value of the visitor-id attribute `attribute`, which has a `max_per_profile`:
    /// whichever profile holds it holds that value (checked when stitching with a profile of
    /// another node's partition).
    Capped { id: String, attribute: String },
    /// The profile split out on another node by the adoption named `origin` was adopted here.
    Adopted { id: String, origin: String },
    /// Profile `profile` and its ids were removed.
    Deleted { profile: String },
}

/// The changes of the record being applied, each with the draft (record) it belongs to.
#[derive(Debug, Default)]
pub(super) struct Changes(Vec<(usize, IdChange)>);

impl Changes {
    pub(super) fn push(&mut self, record: usize, change: IdChange) {
        self.0.push((record, change));
    }

    /// The changes of draft `record`, in the order made.
    pub(super) fn of(&self, record: usize) -> Vec<&IdChange> {
        self.0.iter().filter(|(r, _)| *r == record).map(|(_, change)| change).collect()
    }

    pub(super) fn clear(&mut self) {
        self.0.clear();
    }
}

/// The changes a record at `position` carries, as read back.
#[derive(Debug, Default)]
pub struct Carried {
    pub changes: Vec<IdChange>,
    pub position: Position,
}

impl Carried {
    /// A change of a kind this version does not know (written by a newer node) is skipped:
    /// the others still apply.
    pub fn of(payload: &[u8], position: Position) -> Carried {
        #[derive(serde::Deserialize, Default)]
        struct Written {
            #[serde(default)]
            changes: Vec<serde_json::Value>,
        }
        let written: Written = serde_json::from_slice(payload).unwrap_or_default();
        let changes = written
            .changes
            .into_iter()
            .filter_map(|change| match serde_json::from_value(change) {
                Ok(change) => Some(change),
                Err(e) => {
                    tracing::warn!(position, "a change of a record skipped: {e}");
                    None
                }
            })
            .collect();
        Carried { changes, position }
    }
}

/// The state of a profile merged into one of another node's partitions, which holds none of
/// it: carried with the merge.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Absorbed {
    pub profile: starling_core::Profile,
    /// Its history, oldest first.
    pub events: Vec<starling_core::Event>,
    /// Its audiences, with when it joined each.
    pub memberships: Vec<(String, i64)>,
}

/// A profile split out by another node's record into a partition it does not own: the events
/// that moved with the id, which the partition's owner adopts (rebuilding the profile from
/// them), once: `origin` names it (see `split_origin`).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Adoption {
    pub id: String,
    pub from: String,
    pub origin: String,
    /// Oldest first.
    pub events: Vec<starling_core::Event>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A record of a newer node may carry a change this version does not know: the ones it
    /// knows still apply.
    #[test]
    fn a_change_of_an_unknown_kind_is_skipped_and_the_others_kept() {
        let payload = br#"{"work":"events","changes":[
            {"change":"linked","id":"laptop","profile":"phone"},
            {"change":"from_a_later_version","id":"laptop"},
            {"change":"deleted","profile":"tablet"}
        ]}"#;
        let carried = Carried::of(payload, 7);
        assert_eq!(carried.position, 7);
        assert_eq!(
            carried.changes,
            [
                IdChange::Linked { id: "laptop".into(), profile: "phone".into(), claimed: false },
                IdChange::Deleted { profile: "tablet".into() },
            ]
        );
    }
}
