//! An enricher that never returns: the host must stop it at its deadline.

use starling_sdk::{AttributeUpdate, EnrichError, Enricher, Event, ProfileView, export_enricher};

struct SpinForever;

impl Enricher for SpinForever {
    fn enrich(_event: Event, _profile: ProfileView) -> Result<Vec<AttributeUpdate>, EnrichError> {
        let mut n: u64 = 0;
        loop {
            n = std::hint::black_box(n.wrapping_add(1));
        }
    }
}

export_enricher!(SpinForever);
