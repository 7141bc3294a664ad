//! Spread, each node stores a snapshot of its database (its own partitions whole, the others'
//! ids), named after it. A node taking a partition restores it from the snapshot that holds it
//! furthest, then applies the partition's records after it; the stream forgets each
//! partition's records before that snapshot, the freshest snapshot, and every node hold.

use crate::node::{forget_held_everywhere, snapshot_of};
use crate::owned::Owned;
use starling_cluster::Ownership;
use starling_cluster::snapshot::{Covered, NodeSnapshot, Snapshots, node_snapshot};
use starling_cluster::stream::EventStream;
use starling_log::{PARTITIONS, Partition, Position};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// What a spread node's snapshots are made of and stored in.
pub(super) struct NodeSnapshots {
    pub node: String,
    pub database: PathBuf,
    pub snapshots: Arc<Snapshots>,
    pub stream: Arc<EventStream>,
    pub ownership: Arc<Ownership>,
    pub owned: Arc<Owned>,
    /// How often one is stored.
    pub every: Duration,
    /// How long the stream keeps records for a node that is away (see
    /// [`forget_held_everywhere`]).
    pub wait_for_absent: Duration,
}

/// Stores this node's snapshot every `every` while it owns partitions; on the owner of
/// partition 0, has the stream forget what every partition's restore no longer needs.
pub(super) async fn take_node_snapshots(taking: NodeSnapshots) {
    let NodeSnapshots { node, database, snapshots, stream, ownership, owned, every, wait_for_absent } = taking;
    let name = node_snapshot(&node);
    // What this process last stored, as it stored it.
    let mut stored_here: Option<NodeSnapshot> = None;
    let mut last = 0;
    let mut forgotten = Vec::new();
    loop {
        tokio::time::sleep(every).await;
        let (before, changes) = (owned.bits(), owned.changes());
        if before != 0
            && let Some((covered, into)) = snapshot_of(&database).await
        {
            // Whole only if this node owned its partitions all along: one given up and taken
            // again meanwhile may be caught between its drop and its restore.
            let bits = if owned.changes() == changes { before } else { 0 };
            let whole: Vec<Partition> = (0..PARTITIONS).filter(|p| bits & (1 << p) != 0).collect();
            let usable = ownership.cluster().truncated().await.is_ok_and(|truncated| {
                truncated.iter().enumerate().all(|(p, before)| covered.of(p as Partition) >= *before)
            });
            // The stream may have forgotten a partition's records before this node's last
            // snapshot of it: that snapshot is not replaced until another holds it as far.
            let replaceable = match snapshots.of_nodes().await {
                Ok(stored) => {
                    let stored = with_own(stored, stored_here.as_ref());
                    let sole = held_only_here(&stored, &name, &whole);
                    if !sole.is_empty() {
                        tracing::debug!(partitions = ?sole, "this node's snapshot is kept: it alone holds these whole");
                    }
                    sole.is_empty()
                }
                Err(e) => {
                    tracing::debug!("this node's snapshot is kept: listing the snapshots: {e}");
                    false
                }
            };
            if covered.last() > last && usable && !whole.is_empty() && replaceable {
                match snapshots.put(&name, &into, &covered, &whole).await {
                    Ok(()) => {
                        last = covered.last();
                        stored_here =
                            Some(NodeSnapshot { name: name.clone(), covered: covered.clone(), whole: whole.clone() });
                        tracing::info!(covers = last, partitions = whole.len(), "snapshot stored");
                    }
                    Err(e) => tracing::warn!("storing this node's snapshot: {e}"),
                }
            }
            let _ = std::fs::remove_file(&into);
        }
        if ownership.held().contains(&0) {
            match snapshots.of_nodes().await {
                Ok(stored) => {
                    let kept = kept_from(&stored);
                    forget_held_everywhere(&stream, ownership.cluster(), &kept, wait_for_absent, &mut forgotten).await;
                }
                Err(e) => tracing::warn!("the stream is kept whole: the snapshots cannot be listed: {e}"),
            }
        }
    }
}

/// Where each partition's records are needed from: the snapshot holding the partition whole
/// furthest (a new owner restores it from there), and the freshest snapshot (a node starting
/// restores it whole, then follows every partition from it). Nothing of a partition no
/// snapshot holds whole is forgotten.
fn kept_from(stored: &[NodeSnapshot]) -> Covered {
    let freshest = stored.iter().max_by_key(|s| s.covered.last());
    Covered(
        (0..PARTITIONS)
            .map(|p| {
                let whole = holding(stored, p).map_or(0, |s| s.covered.of(p));
                (p, whole.min(freshest.map_or(0, |s| s.covered.of(p))))
            })
            .collect(),
    )
}

/// The partitions snapshot `name` holds whole that a replacement holding only `whole` would
/// lose: no other snapshot holds them whole as far (the stream may have forgotten their
/// records before it).
fn held_only_here(stored: &[NodeSnapshot], name: &str, whole: &[Partition]) -> Vec<Partition> {
    let Some(previous) = stored.iter().find(|s| s.name == name) else { return Vec::new() };
    previous
        .whole
        .iter()
        .copied()
        .filter(|p| !whole.contains(p))
        .filter(|&p| {
            !stored.iter().any(|s| s.name != name && s.whole.contains(&p) && s.covered.of(p) >= previous.covered.of(p))
        })
        .collect()
}

/// The snapshots listed, with this node's own as it last stored it (`own`) in place of the
/// one listed: a listing answered by a server behind the others (right after an election) may
/// lack it, or hold an older one, and would let it be replaced by one losing a partition only
/// it holds whole.
fn with_own(mut stored: Vec<NodeSnapshot>, own: Option<&NodeSnapshot>) -> Vec<NodeSnapshot> {
    if let Some(own) = own {
        stored.retain(|s| s.name != own.name);
        stored.push(own.clone());
    }
    stored
}

/// The snapshot holding partition `p` whole furthest.
fn holding(stored: &[NodeSnapshot], p: Partition) -> Option<&NodeSnapshot> {
    stored.iter().filter(|s| s.whole.contains(&p)).max_by_key(|s| s.covered.of(p))
}

/// The snapshots to restore `partitions` from, fetched next to `database`: for each partition,
/// the file and the partition's position in it (none: no snapshot holds it; its records are
/// applied from the log's start).
pub(super) async fn fetch_for(
    snapshots: &Snapshots,
    database: &Path,
    partitions: &[Partition],
) -> Result<Vec<(Partition, Option<PathBuf>, Position)>, String> {
    let stored = snapshots.of_nodes().await.map_err(|e| format!("listing the snapshots: {e}"))?;
    let mut fetched: HashMap<String, PathBuf> = HashMap::new();
    let mut restoring = Vec::new();
    for &p in partitions {
        let Some(snapshot) = holding(&stored, p) else {
            restoring.push((p, None, 0));
            continue;
        };
        let path = match fetched.get(&snapshot.name) {
            Some(path) => path.clone(),
            None => {
                let path = database.with_extension(format!("{}.restoring", snapshot.name));
                let _ = std::fs::remove_file(&path);
                snapshots.fetch(&snapshot.name, &path).await.map_err(|e| format!("fetching {}: {e}", snapshot.name))?;
                fetched.insert(snapshot.name.clone(), path.clone());
                path
            }
        };
        restoring.push((p, Some(path), snapshot.covered.of(p)));
    }
    Ok(restoring)
}

/// The first partition `restoring` would restore from a position before which the stream
/// has forgotten its records (`truncated`), with that position, if any.
pub(super) fn overtaken(
    restoring: &[(Partition, Option<PathBuf>, Position)],
    truncated: &[Position],
) -> Option<(Partition, Position)> {
    restoring
        .iter()
        .find(|(p, _, from)| truncated.get(*p as usize).is_some_and(|before| from < before))
        .map(|(p, _, from)| (*p, *from))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot(name: &str, positions: &[(Partition, Position)], whole: &[Partition]) -> NodeSnapshot {
        NodeSnapshot { name: name.into(), covered: Covered(positions.to_vec()), whole: whole.to_vec() }
    }

    #[test]
    fn each_partition_is_kept_from_its_furthest_whole_snapshot_and_the_freshest() {
        let stored = [
            snapshot("node.a", &[(0, 40), (1, 10), (2, 12)], &[0]),
            snapshot("node.b", &[(0, 30), (1, 50), (2, 20)], &[1]),
        ];
        let kept = kept_from(&stored);
        assert_eq!(kept.of(0), 30, "held whole by a at 40, but the freshest (b) is at 30");
        assert_eq!(kept.of(1), 50);
        assert_eq!(kept.of(2), 0, "no snapshot holds it whole");
        assert_eq!(holding(&stored, 1).map(|s| s.name.as_str()), Some("node.b"));
        assert!(holding(&stored, 2).is_none());
    }

    #[test]
    fn a_snapshot_is_not_replaced_by_one_losing_a_partition_only_it_holds_whole() {
        let stored = [
            snapshot("node.a", &[(0, 40), (1, 10), (2, 12)], &[0, 2]),
            snapshot("node.b", &[(0, 30), (1, 50), (2, 20)], &[1]),
        ];
        assert_eq!(held_only_here(&stored, "node.a", &[0]), vec![2], "no other snapshot holds 2 whole");
        assert!(held_only_here(&stored, "node.a", &[0, 2]).is_empty());
        assert_eq!(held_only_here(&stored, "node.b", &[]), vec![1]);
        let taken = [
            snapshot("node.a", &[(0, 40), (2, 12)], &[0, 2]),
            snapshot("node.b", &[(0, 30), (1, 50), (2, 20)], &[1, 2]),
        ];
        assert!(held_only_here(&taken, "node.a", &[0]).is_empty(), "b holds 2 whole further");
        let behind = [
            snapshot("node.a", &[(0, 40), (2, 12)], &[0, 2]),
            snapshot("node.b", &[(0, 30), (1, 50), (2, 8)], &[1, 2]),
        ];
        assert_eq!(held_only_here(&behind, "node.a", &[0]), vec![2], "b's copy of 2 is older than a's");
        assert!(held_only_here(&stored, "node.c", &[]).is_empty(), "a node's first snapshot replaces nothing");
        // A listing that lacks a's snapshot (a server behind the others answered it): a's own
        // record of it keeps partition 2 from being dropped.
        let listed = with_own(vec![stored[1].clone()], Some(&stored[0]));
        assert_eq!(held_only_here(&listed, "node.a", &[0]), vec![2]);
        let older = snapshot("node.a", &[(0, 20), (2, 12)], &[0]);
        let listed = with_own(vec![older, stored[1].clone()], Some(&stored[0]));
        assert_eq!(listed.iter().filter(|s| s.name == "node.a").count(), 1, "{listed:?}");
        assert_eq!(held_only_here(&listed, "node.a", &[0]), vec![2], "the older one listed is not a's latest");
    }

    #[test]
    fn a_partition_restored_from_before_the_streams_truncation_is_overtaken() {
        let restoring = [(0, Some(PathBuf::from("a")), 40), (1, None, 0)];
        assert_eq!(overtaken(&restoring, &[40]), None, "the stream starts right after the snapshot");
        assert_eq!(overtaken(&restoring, &[]), None, "nothing forgotten");
        assert_eq!(overtaken(&restoring, &[41]), Some((0, 40)), "forgotten past the snapshot");
        assert_eq!(overtaken(&restoring, &[40, 1]), Some((1, 0)), "no snapshot listed, yet records forgotten");
    }
}
