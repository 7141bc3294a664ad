//! The plugin manifest (`plugin.toml`): identity, the world it targets, limits and capabilities.

use crate::error::ManifestError;
use serde::Deserialize;
use std::collections::BTreeMap;

pub const CONNECTOR_WORLD: &str = "starling:plugin/connector@0.2.0";
pub const ENRICHER_WORLD: &str = "starling:plugin/enricher@0.2.0";

/// The versions of the plugin interface the host loads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    /// `starling:plugin@0.1.0`, linked for components built before 0.2.0.
    V0_1,
    /// `starling:plugin@0.2.0`, what the SDKs and templates target.
    V0_2,
}

impl Api {
    pub fn version(self) -> &'static str {
        match self {
            Api::V0_1 => "0.1.0",
            Api::V0_2 => "0.2.0",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Connector,
    Enricher,
}

impl Kind {
    pub fn world(self) -> &'static str {
        match self {
            Kind::Connector => CONNECTOR_WORLD,
            Kind::Enricher => ENRICHER_WORLD,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::Connector => "connector",
            Kind::Enricher => "enricher",
        }
    }

    /// The interface version a world of this kind names, if the host loads it.
    pub fn api_of(self, world: &str) -> Option<Api> {
        let version = world.strip_prefix("starling:plugin/")?.strip_prefix(self.name())?.strip_prefix('@')?;
        [Api::V0_2, Api::V0_1].into_iter().find(|api| api.version() == version)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub name: String,
    pub version: String,
    pub kind: Kind,
    /// The WIT world and version the component implements (0.2.0, or 0.1.0 for components built
    /// before it).
    pub world: String,
    /// The component file, relative to the manifest.
    pub component: String,
    /// Hex sha256 of the component; checked at load when present.
    #[serde(default)]
    pub sha256: Option<String>,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub capabilities: Capabilities,
    /// Configuration keys the plugin reads, and which are secrets.
    #[serde(default)]
    pub config: BTreeMap<String, ConfigKey>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    #[serde(default = "default_memory_mib")]
    pub memory_mib: u64,
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { memory_mib: default_memory_mib(), timeout_ms: default_timeout_ms() }
    }
}

/// Largest linear memory a plugin may ask for; also the size of the pooled memory slots.
pub const MAX_MEMORY_MIB: u64 = 1024;

fn default_memory_mib() -> u64 {
    64
}
fn default_timeout_ms() -> u64 {
    1_000
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Capabilities {
    /// Outbound HTTP destinations, `scheme://host[:port]`; `*` matches any port, any host, or
    /// (as `*.example.com`) any subdomain.
    #[serde(default)]
    pub allowed_hosts: Vec<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigKey {
    #[serde(default)]
    pub secret: bool,
    #[serde(default)]
    pub description: String,
}

/// Whether `name` can name a plugin, and a directory: `[a-z0-9][a-z0-9_-]{0,63}`.
pub fn is_plugin_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        && name.len() <= 64
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
}

impl Manifest {
    /// The interface version the component implements (checked when parsed).
    pub fn api(&self) -> Api {
        self.kind.api_of(&self.world).expect("checked when parsed")
    }

    pub fn parse(text: &str) -> Result<Manifest, ManifestError> {
        let m: Manifest = toml::from_str(text).map_err(|e| {
            let message = e.message().trim().to_string();
            match e.span() {
                Some(s) => {
                    let before = &text[..s.start];
                    let line = before.matches('\n').count() + 1;
                    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
                    ManifestError::Syntax { line, column, message }
                }
                None => ManifestError::Unreadable { message },
            }
        })?;
        // Both become paths: `plugin build` and `plugin add` write under the name, and the
        // component is read beside the manifest.
        if !is_plugin_name(&m.name) {
            return Err(ManifestError::BadName(m.name));
        }
        let component = std::path::Path::new(&m.component);
        let plain_file = component.file_name().is_some_and(|f| f == component.as_os_str())
            && !m.component.contains(['/', '\\'])
            && m.component != ".."
            && m.component != ".";
        if !plain_file {
            return Err(ManifestError::BadComponent(m.component));
        }
        if m.kind.api_of(&m.world).is_none() {
            return Err(ManifestError::WrongWorld { kind: m.kind.name(), expected: m.kind.world(), found: m.world });
        }
        if m.limits.memory_mib == 0 || m.limits.timeout_ms == 0 {
            return Err(ManifestError::ZeroLimit);
        }
        if m.limits.memory_mib > MAX_MEMORY_MIB {
            return Err(ManifestError::MemoryLimit { given: m.limits.memory_mib, max: MAX_MEMORY_MIB });
        }
        for pattern in &m.capabilities.allowed_hosts {
            crate::egress::HostPattern::parse(pattern)?;
        }
        Ok(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
name = "webhook"
version = "0.1.0"
kind = "connector"
world = "starling:plugin/connector@0.2.0"
component = "webhook.wasm"
[limits]
memory_mib = 16
[capabilities]
allowed_hosts = ["https://*.example.com"]
[config]
token = { secret = true }
"#;

    #[test]
    fn parses() {
        let m = Manifest::parse(GOOD).unwrap();
        assert_eq!(m.limits.memory_mib, 16);
        assert_eq!(m.limits.timeout_ms, 1_000);
        assert!(m.config["token"].secret);
    }

    #[test]
    fn refuses_unknown_fields_with_position() {
        let err = Manifest::parse(&format!("network = true\n{GOOD}")).unwrap_err();
        assert!(
            matches!(&err, ManifestError::Syntax { line: 1, column: 1, message } if message.contains("network")),
            "{err}"
        );
    }

    #[test]
    fn names_and_component_files_stay_inside_the_plugin_directory() {
        for name in ["../../etc", "/tmp/x", "a/b", "", "Caps", ".hidden", "a b", &"x".repeat(65)] {
            let err = Manifest::parse(&GOOD.replace("name = \"webhook\"", &format!("name = {name:?}"))).unwrap_err();
            assert!(matches!(err, ManifestError::BadName(_)), "{name}: {err}");
        }
        for component in ["../other/x.wasm", "/etc/passwd", "sub/x.wasm", "..", ".", "a\\b.wasm"] {
            let text = GOOD.replace("component = \"webhook.wasm\"", &format!("component = {component:?}"));
            let err = Manifest::parse(&text).unwrap_err();
            assert!(matches!(err, ManifestError::BadComponent(_)), "{component}: {err}");
            assert!(err.to_string().contains("with no directory"), "{err}");
        }
    }

    #[test]
    fn world_must_match_kind() {
        let err =
            Manifest::parse(&GOOD.replace("kind = \"connector\"", "kind = \"enricher\"")).unwrap_err().to_string();
        assert!(err.contains("must target world `starling:plugin/enricher@0.2.0` (or its 0.1.0)"), "{err}");
        let old = Manifest::parse(&GOOD.replace("@0.2.0", "@0.1.0")).unwrap();
        assert_eq!((old.api(), Manifest::parse(GOOD).unwrap().api()), (Api::V0_1, Api::V0_2));
        assert!(Manifest::parse(&GOOD.replace("connector@0.2.0", "connector@0.2")).is_err());
    }
}
