//! Starling's domain core: configuration, profiles, enrichments, conditions, audiences and the
//! actions they fire. Pure logic: no I/O, no clock, no WebAssembly.

pub mod condition;
pub mod config;
pub mod engine;
pub mod operations;
pub mod profile;
pub mod stitch;
pub mod time;
pub mod value;

pub use config::{ConfigErrors, Diagnostic, Model, parse};
pub use engine::{
    CustomEnrichers, Event, Membership, NoCustomEnrichers, Outcome, PendingAction, apply_delete, apply_event,
    apply_merge, apply_time,
};
pub use profile::Profile;
pub use value::Value;
