//! Which live node should own which virtual partition: an even spread that moves as few
//! partitions as it can. Every node computes it from the same inputs (the live nodes and the
//! current owners), so every node reaches the same answer without talking to the others.

use starling_log::{PARTITIONS, Partition};

/// Every partition on one node: the live node that holds the most now (the first in name order
/// among equals), else the first live node in name order.
pub fn whole(live: &[String], current: &BTreeMap<Partition, String>) -> BTreeMap<Partition, String> {
    let mut held: BTreeMap<&String, usize> = live.iter().map(|n| (n, 0)).collect();
    for owner in current.values() {
        if let Some(count) = held.get_mut(owner) {
            *count += 1;
        }
    }
    // Most partitions first; among equals, the first name (the map is in name order).
    let Some(node) = held.iter().rev().max_by_key(|(_, count)| **count).map(|(n, _)| (*n).clone()) else {
        return BTreeMap::new();
    };
    (0..PARTITIONS).map(|p| (p, node.clone())).collect()
}
use std::collections::BTreeMap;

/// The owners partitions should have: each live node gets `PARTITIONS / n` or one more (the
/// first nodes in name order take the remainder); a partition stays with its current owner while
/// that owner is live and under its share, and the rest go, in partition order, to the nodes
/// with room, in name order.
pub fn assign(live: &[String], current: &BTreeMap<Partition, String>) -> BTreeMap<Partition, String> {
    let mut nodes: Vec<&String> = live.iter().collect();
    nodes.sort();
    nodes.dedup();
    if nodes.is_empty() {
        return BTreeMap::new();
    }
    let total = PARTITIONS as usize;
    let share = |i: usize| total / nodes.len() + usize::from(i < total % nodes.len());
    let mut room: BTreeMap<&String, usize> = nodes.iter().enumerate().map(|(i, n)| (*n, share(i))).collect();
    let mut target = BTreeMap::new();
    let mut homeless = Vec::new();
    for partition in 0..PARTITIONS {
        let keeper =
            current.get(&partition).and_then(|owner| room.get_mut(owner).filter(|r| **r > 0).map(|r| (owner, r)));
        match keeper {
            Some((owner, left)) => {
                *left -= 1;
                target.insert(partition, owner.clone());
            }
            None => homeless.push(partition),
        }
    }
    for partition in homeless {
        let (node, left) = room.iter_mut().find(|(_, left)| **left > 0).expect("the shares add up to every partition");
        *left -= 1;
        target.insert(partition, (*node).clone());
    }
    target
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    fn counts(target: &BTreeMap<Partition, String>) -> BTreeMap<String, usize> {
        let mut counts = BTreeMap::new();
        for owner in target.values() {
            *counts.entry(owner.clone()).or_default() += 1;
        }
        counts
    }

    #[test]
    fn partitions_spread_evenly_and_a_join_moves_only_the_newcomers_share() {
        let one = assign(&names(&["a"]), &BTreeMap::new());
        assert_eq!(counts(&one), BTreeMap::from([("a".into(), 64)]));
        let two = assign(&names(&["b", "a"]), &one);
        assert_eq!(counts(&two), BTreeMap::from([("a".into(), 32), ("b".into(), 32)]));
        let three = assign(&names(&["a", "b", "c"]), &two);
        assert_eq!(counts(&three), BTreeMap::from([("a".into(), 22), ("b".into(), 21), ("c".into(), 21)]));
        let moved = (0..PARTITIONS).filter(|p| two[p] != three[p]).count();
        assert_eq!(moved, 21, "only the newcomer's share moves");
        assert!((0..PARTITIONS).filter(|p| two[p] != three[p]).all(|p| three[&p] == "c"));
    }

    #[test]
    fn a_dead_nodes_partitions_go_to_the_living_and_the_rest_stay() {
        let three = assign(&names(&["a", "b", "c"]), &BTreeMap::new());
        let two = assign(&names(&["a", "c"]), &three);
        assert_eq!(counts(&two), BTreeMap::from([("a".into(), 32), ("c".into(), 32)]));
        for p in 0..PARTITIONS {
            if three[&p] != "b" {
                assert_eq!(two[&p], three[&p], "partition {p} stays where it was");
            }
        }
        assert!(assign(&[], &three).is_empty());
    }

    #[test]
    fn every_node_computes_the_same_answer() {
        let current = assign(&names(&["a", "b"]), &BTreeMap::new());
        assert_eq!(assign(&names(&["c", "a", "b"]), &current), assign(&names(&["b", "c", "a", "a"]), &current));
    }

    #[test]
    fn the_whole_placement_stays_with_its_holder_and_falls_to_the_first_live_node() {
        let first = whole(&names(&["b", "a"]), &BTreeMap::new());
        assert_eq!(counts(&first), BTreeMap::from([("a".into(), 64)]));
        let held_by_b: BTreeMap<Partition, String> = (0..PARTITIONS).map(|p| (p, "b".to_string())).collect();
        assert_eq!(counts(&whole(&names(&["a", "b"]), &held_by_b)), BTreeMap::from([("b".into(), 64)]));
        assert_eq!(counts(&whole(&names(&["a", "c"]), &held_by_b)), BTreeMap::from([("a".into(), 64)]), "b is gone");
        assert!(whole(&[], &held_by_b).is_empty());
    }
}
