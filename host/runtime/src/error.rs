//! The runtime's errors, one enum per concern, so callers can match on what went wrong and
//! print it as is.

use std::path::PathBuf;

/// A `plugin.toml` that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    #[error("{line}:{column}: {message}")]
    Syntax { line: usize, column: usize, message: String },
    #[error("{message}")]
    Unreadable { message: String },
    #[error("a {kind} must target world `{expected}` (or its 0.1.0), manifest says `{found}`")]
    WrongWorld { kind: &'static str, expected: &'static str, found: String },
    #[error("limits.memory_mib and limits.timeout_ms must be positive")]
    ZeroLimit,
    #[error("limits.memory_mib is {given}, at most {max}")]
    MemoryLimit { given: u64, max: u64 },
    #[error("name `{0}`: use 1 to 64 lowercase letters, digits, `-` and `_`, starting with a letter or digit")]
    BadName(String),
    #[error("component `{0}`: give the file name of the component beside the manifest, with no directory")]
    BadComponent(String),
    #[error(transparent)]
    AllowedHost(#[from] EgressError),
}

/// An allowed-host pattern that cannot be read, or a request it does not allow.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EgressError {
    #[error("allowed host `{pattern}`: {why}")]
    Pattern { pattern: String, why: &'static str },
    #[error("{0}")]
    Target(String),
    #[error("{scheme}://{host}:{port} is not in the plugin's allowed hosts")]
    NotAllowed { scheme: String, host: String, port: u16 },
}

/// A signature, key or trusted-keys file that does not check out.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("no randomness: {0}")]
    NoRandomness(String),
    #[error("the secret key must be 64 hex digits")]
    SecretKey,
    #[error("line {line}: `{key}` is not a 64-hex-digit public key")]
    TrustedKey { line: usize, key: String },
    #[error("{file}: expected `ed25519 PUBLIC_KEY SIGNATURE`", file = crate::signing::SIGNATURE_FILE)]
    Format,
    #[error("{file}: unknown scheme `{0}`", file = crate::signing::SIGNATURE_FILE)]
    Scheme(String),
    #[error("{file}: bad public key", file = crate::signing::SIGNATURE_FILE)]
    PublicKey,
    #[error("{file}: bad signature", file = crate::signing::SIGNATURE_FILE)]
    Signature,
    #[error("signature does not match the manifest and component")]
    Mismatch,
    #[error("signed by {0}, which is not a trusted key")]
    Untrusted(String),
    #[error("unsigned, and trusted keys are configured")]
    Unsigned,
}

/// A component that cannot become a plugin.
#[derive(Debug, thiserror::Error)]
pub enum ComponentError {
    #[error("sha256 mismatch: manifest says {expected}, component is {actual}")]
    Digest { expected: String, actual: String },
    #[error("not a WebAssembly component (a core module must be componentized first)")]
    NotAComponent,
    #[error("compiling: {0}")]
    Compile(String),
    #[error("imports what the {world} world does not grant: {}", .refused.join(", "))]
    Imports { world: &'static str, refused: Vec<String> },
    #[error("does not implement {world}: {message}")]
    Exports { world: String, message: String },
    #[error("compiled component cache: {0}")]
    Artifact(String),
    #[error("componentizing: {0}")]
    Componentize(String),
    #[error("{0}")]
    Ceiling(String),
    #[error(transparent)]
    Signature(#[from] SignatureError),
    #[error(transparent)]
    AllowedHost(#[from] EgressError),
    #[error(transparent)]
    Manifest(#[from] ManifestError),
}

/// Loading or calling a plugin failed.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error("plugin `{0}` is not loaded")]
    NotLoaded(String),
    #[error("plugin `{plugin}` is a {actual}, not a {expected}")]
    WrongKind { plugin: String, actual: &'static str, expected: &'static str },
    #[error("plugin at {path}: {message}")]
    Load { path: PathBuf, message: String },
    #[error("plugin `{plugin}` exceeded its {timeout_ms} ms deadline and was stopped")]
    Timeout { plugin: String, timeout_ms: u64 },
    #[error("plugin `{plugin}` failed: {message}")]
    Trap { plugin: String, message: String },
    #[error("plugin `{plugin}` is disabled: {reason}")]
    Disabled { plugin: String, reason: String },
}
