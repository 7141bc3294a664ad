//! Virtual partitions: a fixed number, chosen by a stable hash of the profile id, so a profile's
//! partition never changes between releases or restarts, and partitions (not profiles) are
//! what moves between workers or, later, between nodes.

/// Virtual partitions in every log.
pub const PARTITIONS: u16 = 64;

pub type Partition = u16;

/// The virtual partition of a profile id: FNV-1a (64 bit), which, unlike std's
/// `DefaultHasher`, is specified and cannot change with the Rust release.
pub fn partition_of(profile_id: &str) -> Partition {
    (profile_hash(profile_id) % u64::from(PARTITIONS)) as Partition
}

/// The profile id's 64-bit FNV-1a hash: stable across builds and machines.
pub fn profile_hash(profile_id: &str) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    profile_id.bytes().fold(OFFSET, |h, b| (h ^ u64::from(b)).wrapping_mul(PRIME))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hash_is_fnv_1a_and_spreads() {
        // Known FNV-1a 64 values: "" → cbf29ce484222325, "a" → af63dc4c8601ec8c.
        assert_eq!(partition_of(""), (0xcbf2_9ce4_8422_2325u64 % 64) as u16);
        assert_eq!(partition_of("a"), (0xaf63_dc4c_8601_ec8cu64 % 64) as u16);
        let used: std::collections::HashSet<_> = (0..2_000).map(|i| partition_of(&format!("visitor-{i}"))).collect();
        assert_eq!(used.len(), PARTITIONS as usize);
    }
}
