//! `[identity]`: which ids may stitch profiles.

use std::collections::BTreeSet;

/// Which ids may stitch profiles together.
#[derive(Debug, Clone)]
pub struct IdentitySettings {
    pub min_length: usize,
    /// Compared case-insensitively.
    pub blocked: BTreeSet<String>,
    /// Most ids one profile may hold; a stitch past it is refused and reported.
    pub max_ids_per_profile: usize,
}

pub const DEFAULT_BLOCKED_IDS: &[&str] =
    &["undefined", "null", "nil", "none", "0", "-1", "anonymous", "unknown", "test", "n/a", "[object object]"];

impl Default for IdentitySettings {
    fn default() -> Self {
        IdentitySettings {
            min_length: 4,
            blocked: DEFAULT_BLOCKED_IDS.iter().map(|s| s.to_string()).collect(),
            max_ids_per_profile: 50,
        }
    }
}

impl IdentitySettings {
    /// Why `id` may not link profiles, if it may not.
    pub fn refuses(&self, id: &str) -> Option<String> {
        let trimmed = id.trim();
        if trimmed.chars().count() < self.min_length {
            return Some(format!("`{id}` is shorter than identity.min_length ({})", self.min_length));
        }
        if self.blocked.contains(&trimmed.to_lowercase()) {
            return Some(format!("`{id}` is on identity.blocked"));
        }
        None
    }
}
