//! `[identity]`: which ids may stitch profiles.

use super::Validator;
use super::raw::RawIdentity;
use crate::model::IdentitySettings;

impl Validator<'_> {
    pub(super) fn identity(&mut self, raw: &RawIdentity) -> IdentitySettings {
        let mut settings = IdentitySettings::default();
        if let Some(n) = &raw.min_length {
            match *n.get_ref() {
                1..=256 => settings.min_length = *n.get_ref() as usize,
                _ => self.error(n.span(), "identity.min_length must be between 1 and 256"),
            }
        }
        if let Some(blocked) = &raw.blocked {
            settings.blocked = blocked.iter().map(|s| s.trim().to_lowercase()).collect();
        }
        if let Some(n) = &raw.max_ids_per_profile {
            match *n.get_ref() {
                2..=100_000 => settings.max_ids_per_profile = *n.get_ref() as usize,
                _ => self.error(n.span(), "identity.max_ids_per_profile must be between 2 and 100000"),
            }
        }
        settings
    }
}
