//! Audiences: named rules over a profile's attributes.

use crate::condition::Condition;

#[derive(Debug, Clone)]
pub struct Audience {
    pub name: String,
    pub rule: Condition,
    /// The attributes the rule reads.
    pub inputs: Vec<String>,
    /// Whether membership can change with the passing of time alone.
    pub time_relative: bool,
}
