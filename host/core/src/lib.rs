//! Starling's domain core: configuration, profiles, enrichments, conditions, audiences and the
//! actions they fire. Pure logic: no I/O, no clock, no WebAssembly.
//!
//! Layers, each using only those before it (no cycles):
//! 1. definitions: `value`, `time`, `event`, `profile`, `literal`, `diagnostic`, `attribute`,
//!    `condition`;
//! 2. `enrich`: the enrichment operations, one file per family;
//! 3. `model`: a validated configuration;
//! 4. `config`: the file in, the model out;
//! 5. `engine` and `stitch`: applying events, time and merges to profiles.

pub mod attribute;
pub mod condition;
pub mod config;
pub mod diagnostic;
pub mod engine;
pub mod enrich;
pub mod event;
pub mod evolve;
pub mod import;
pub mod ingest;
pub mod literal;
pub mod model;
pub mod profile;
pub mod stitch;
pub mod time;
pub mod value;
pub mod wire;

pub use config::parse;
pub use diagnostic::{ConfigErrors, Diagnostic};
pub use engine::{
    CustomEnrichers, IdRefusal, Membership, NoCustomEnrichers, Outcome, PendingAction, apply_delete, apply_event,
    apply_merge, apply_time,
};
pub use event::Event;
pub use model::Model;
pub use profile::Profile;
pub use value::Value;
