//! # starling-sdk
//!
//! Write a Starling plugin in Rust. Enable the `connector` or `enricher` feature, implement
//! [`Connector`] or [`Enricher`] for a type, and export it with one macro line:
//!
//! ```no_run
//! # #[cfg(feature = "connector")] mod plugin {
//! use starling_sdk::{Action, Connector, DeliveryError, export_connector};
//!
//! struct Hello;
//! impl Connector for Hello {
//!     fn deliver(actions: Vec<Action>) -> Vec<Result<(), DeliveryError>> {
//!         actions.iter().map(|_| Ok(())).collect()
//!     }
//! }
//! export_connector!(Hello);
//! # }
//! ```
//!
//! An enricher is the same shape:
//!
//! ```no_run
//! # #[cfg(feature = "enricher")] mod plugin {
//! use starling_sdk::{AttributeUpdate, AttributeValue, EnrichError, Enricher, Event, ProfileView, export_enricher};
//!
//! struct Domain;
//! impl Enricher for Domain {
//!     fn enrich(event: Event, _profile: ProfileView) -> Result<Vec<AttributeUpdate>, EnrichError> {
//!         let data: serde_json::Value =
//!             serde_json::from_str(&event.data_json).map_err(|e| EnrichError::BadInput(e.to_string()))?;
//!         let Some(domain) = data["email"].as_str().and_then(|e| e.split('@').nth(1)) else { return Ok(Vec::new()) };
//!         Ok(vec![AttributeUpdate { name: "email_domain".into(), value: Some(AttributeValue::Text(domain.into())) }])
//!     }
//! }
//! export_enricher!(Domain);
//! # }
//! ```
//!
//! The WIT bindings are generated inside this crate; plugin authors use the types re-exported
//! here and never the generated code.

#![deny(missing_docs)]

#[cfg(all(feature = "connector", feature = "enricher"))]
compile_error!("enable exactly one of the `connector` and `enricher` features");

#[cfg(not(any(feature = "connector", feature = "enricher")))]
compile_error!("enable one of the `connector` or `enricher` features");

#[doc(hidden)]
pub mod bindings {
    #[cfg(feature = "connector")]
    wit_bindgen::generate!({
        world: "starling:plugin/connector@0.2.0",
        path: "../../wit",
        pub_export_macro: true,
        export_macro_name: "export_world",
        default_bindings_module: "::starling_sdk::bindings",
        generate_all,
    });

    #[cfg(feature = "enricher")]
    wit_bindgen::generate!({
        world: "starling:plugin/enricher@0.2.0",
        path: "../../wit",
        pub_export_macro: true,
        export_macro_name: "export_world",
        default_bindings_module: "::starling_sdk::bindings",
    });
}

mod values;

pub use bindings::starling::plugin0_2_0::types::{
    Action, Attribute, AttributeUpdate, AttributeValue, ConnectorInfo, DeliveryError, EnrichError, Event, Occasion,
    Parameter, ProfileView, RateLimited, TimelineEntry, Trigger, Visit,
};

/// A message as an enricher's failure (`EnrichError::Failed`), so that `?` works on `String` errors.
impl From<String> for EnrichError {
    fn from(message: String) -> Self {
        EnrichError::Failed(message)
    }
}

/// The plugin's configuration, as set in the `[plugin.NAME]` table of the host's configuration.
pub mod config {
    use std::cell::RefCell;
    use std::collections::HashMap;

    thread_local! {
        /// A plugin's configuration is fixed for the life of its instance, and the host may
        /// reuse an instance for many calls: each key crosses the boundary once.
        static SEEN: RefCell<HashMap<String, Option<String>>> = RefCell::new(HashMap::new());
    }

    /// The value of `key`, if configured.
    pub fn get(key: &str) -> Option<String> {
        SEEN.with_borrow_mut(|seen| {
            seen.entry(key.to_string())
                .or_insert_with(|| crate::bindings::starling::plugin0_2_0::config::get(key))
                .clone()
        })
    }
}

/// Logging into the host's log, tagged with the plugin's name.
pub mod log {
    use crate::bindings::starling::plugin0_2_0::log::{Level, log};

    /// Logs at debug level.
    pub fn debug(message: &str) {
        log(Level::Debug, message)
    }
    /// Logs at info level.
    pub fn info(message: &str) {
        log(Level::Info, message)
    }
    /// Logs at warn level.
    pub fn warn(message: &str) {
        log(Level::Warn, message)
    }
    /// Logs at error level.
    pub fn error(message: &str) {
        log(Level::Error, message)
    }
}

#[cfg(feature = "connector")]
pub mod http;

/// A connector: delivers actions to an outside service.
#[cfg(feature = "connector")]
pub trait Connector {
    /// The connector's settings and parameters, for documentation and validation.
    fn describe() -> ConnectorInfo {
        ConnectorInfo { description: String::new(), settings: Vec::new(), params: Vec::new() }
    }

    /// Delivers a batch of actions, returning one result per action, in order.
    fn deliver(actions: Vec<Action>) -> Vec<Result<(), DeliveryError>>;
}

/// An enricher: computes attribute updates from an event, or at the end of a visit, and the
/// profile they apply to.
#[cfg(feature = "enricher")]
pub trait Enricher {
    /// The updates to apply for `event` (all or nothing), or why there are none.
    fn enrich(event: Event, profile: ProfileView) -> Result<Vec<AttributeUpdate>, EnrichError>;

    /// The updates to apply when the visit ends at `at_ms`; `profile` still holds the visit's
    /// attributes. Called only when the host's configuration runs the enricher on
    /// `visit_ended`; by default, none.
    fn visit_ended(at_ms: i64, profile: ProfileView) -> Result<Vec<AttributeUpdate>, EnrichError> {
        let _ = (at_ms, profile);
        Ok(Vec::new())
    }
}

/// Exports a type implementing [`Connector`] as the component's `connector` world.
#[cfg(feature = "connector")]
#[macro_export]
macro_rules! export_connector {
    ($ty:ty) => {
        const _: () = {
            struct StarlingExport;
            impl $crate::bindings::exports::starling::plugin0_2_0::deliver::Guest for StarlingExport {
                fn describe() -> $crate::ConnectorInfo {
                    <$ty as $crate::Connector>::describe()
                }
                fn deliver(
                    actions: ::std::vec::Vec<$crate::Action>,
                ) -> ::std::vec::Vec<::std::result::Result<(), $crate::DeliveryError>> {
                    <$ty as $crate::Connector>::deliver(actions)
                }
            }
    $crate::bindings::export_world!(StarlingExport with_types_in $crate::bindings);
        };
    };
}

/// Exports a type implementing [`Enricher`] as the component's `enricher` world.
#[cfg(feature = "enricher")]
#[macro_export]
macro_rules! export_enricher {
    ($ty:ty) => {
        const _: () = {
            struct StarlingExport;
            impl $crate::bindings::exports::starling::plugin0_2_0::enrich::Guest for StarlingExport {
                fn enrich(
                    occasion: $crate::Occasion,
                    profile: $crate::ProfileView,
                ) -> ::std::result::Result<::std::vec::Vec<$crate::AttributeUpdate>, $crate::EnrichError> {
                    match occasion {
                        $crate::Occasion::Event(event) => <$ty as $crate::Enricher>::enrich(event, profile),
                        $crate::Occasion::VisitEnded(at_ms) => <$ty as $crate::Enricher>::visit_ended(at_ms, profile),
                    }
                }
            }
    $crate::bindings::export_world!(StarlingExport with_types_in $crate::bindings);
        };
    };
}
