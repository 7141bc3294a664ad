//! Precompiled components, kept so that a restart maps them instead of compiling again, and
//! sealed: each artifact carries an HMAC over the hash of the component it was compiled from and
//! its own bytes, under a key only this directory's host holds. An artifact is used only for
//! that component and only as the host wrote it; anything else is compiled again.

use crate::error::ComponentError;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use wasmtime::Engine;
use wasmtime::component::Component;

const KEY_FILE: &str = "seal.key";

pub(crate) struct ArtifactCache {
    dir: PathBuf,
    key: [u8; 32],
}

impl ArtifactCache {
    /// Opens (creating it, and its key, when new) the cache directory `dir`, readable and
    /// writable by this user only.
    pub(crate) fn open(dir: PathBuf) -> Result<ArtifactCache, ComponentError> {
        let failed = |what: &str, e: std::io::Error| ComponentError::Artifact(format!("{what} {}: {e}", dir.display()));
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&dir).map_err(|e| failed("creating", e))?;
        let key_path = dir.join(KEY_FILE);
        let key = match std::fs::read(&key_path) {
            Ok(bytes) => bytes
                .try_into()
                .map_err(|_| ComponentError::Artifact(format!("{}: expected a 32-byte key", key_path.display())))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut key = [0u8; 32];
                getrandom::getrandom(&mut key).map_err(|e| ComponentError::Artifact(format!("no randomness: {e}")))?;
                let mut file = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&key_path)
                    .map_err(|e| failed("creating the key in", e))?;
                file.write_all(&key).and_then(|()| file.sync_all()).map_err(|e| failed("writing the key in", e))?;
                key
            }
            Err(e) => return Err(failed("reading the key in", e)),
        };
        Ok(ArtifactCache { dir, key })
    }

    /// The component `bytes` (whose SHA-256 is `sha256`) compiled for `engine`: from its sealed
    /// artifact when there is one that checks, else compiled now and stored with its seal.
    pub(crate) fn component(&self, engine: &Engine, bytes: &[u8], sha256: &str) -> Result<Component, ComponentError> {
        let mut hasher = std::hash::DefaultHasher::new();
        std::hash::Hash::hash(&engine.precompile_compatibility_hash(), &mut hasher);
        let path = self.dir.join(format!("{sha256}-{:016x}.cwasm", std::hash::Hasher::finish(&hasher)));
        let seal_path = path.with_extension("seal");
        if let (Ok(artifact), Ok(seal)) = (std::fs::read(&path), std::fs::read_to_string(&seal_path)) {
            if self.checks(sha256, &artifact, seal.trim()) {
                // SAFETY: the seal proves this host wrote these bytes from `precompile_component`
                // of the component whose hash is `sha256`; the bytes are checked in memory, so
                // the file cannot change in between, and wasmtime checks the artifact's header
                // against this engine.
                #[allow(unsafe_code)]
                return unsafe { Component::deserialize(engine, &artifact) }
                    .map_err(|e| ComponentError::Artifact(format!("loading {}: {e}", path.display())));
            }
            tracing::warn!(artifact = %path.display(), "precompiled component does not match its seal; compiling again");
        }
        let artifact = engine.precompile_component(bytes).map_err(|e| ComponentError::Compile(e.to_string()))?;
        let seal = hex::encode(self.mac(sha256, &artifact).finalize().into_bytes());
        write_atomically(&path, &artifact)
            .and_then(|()| write_atomically(&seal_path, seal.as_bytes()))
            .map_err(|e| ComponentError::Artifact(format!("storing the compiled component: {e}")))?;
        // SAFETY: produced just now by this engine from these bytes.
        #[allow(unsafe_code)]
        unsafe { Component::deserialize(engine, &artifact) }
            .map_err(|e| ComponentError::Artifact(format!("loading the compiled component: {e}")))
    }

    fn mac(&self, sha256: &str, artifact: &[u8]) -> Hmac<Sha256> {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes any key length");
        mac.update(sha256.as_bytes());
        mac.update(artifact);
        mac
    }

    fn checks(&self, sha256: &str, artifact: &[u8], seal: &str) -> bool {
        hex::decode(seal).is_ok_and(|seal| self.mac(sha256, artifact).verify_slice(&seal).is_ok())
    }
}

/// Writes then renames, so that a reader never sees a half-written file.
fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let partial = path.with_extension(format!("partial{}", std::process::id()));
    std::fs::write(&partial, bytes)?;
    std::fs::rename(&partial, path)
}
