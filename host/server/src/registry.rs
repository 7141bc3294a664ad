//! Plugins installed in the registry (the `plugins` table and its content-addressed blobs):
//! loaded at start, then kept in sync while the server runs. Installing a new version, enabling
//! or disabling takes effect within a second, without a restart; calls under way finish on the
//! version they started with. Health (failures, and a plugin the host disabled after repeated
//! failures) is written back to the registry.

use rusqlite::Connection;
use starling_runtime::{Manifest, PluginError, PluginHost};
use starling_store::InstalledPlugin;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;

const POLL: Duration = Duration::from_secs(1);

pub struct Registry {
    pub plugins: Arc<PluginHost>,
    pub config: Arc<crate::live::Live>,
    pub conn: Arc<Mutex<Connection>>,
    pub blobs: PathBuf,
    pub clock: fn() -> i64,
    /// `updated_ms` of each registry plugin as loaded.
    loaded: HashMap<String, i64>,
}

impl Registry {
    pub fn new(
        plugins: Arc<PluginHost>,
        config: Arc<crate::live::Live>,
        conn: Connection,
        blobs: PathBuf,
        clock: fn() -> i64,
    ) -> Self {
        Registry { plugins, config, conn: Arc::new(Mutex::new(conn)), blobs, clock, loaded: HashMap::new() }
    }

    /// Brings the loaded plugins in line with the registry.
    pub fn sync(&mut self) -> Result<(), starling_store::StoreError> {
        let installed = starling_store::installed_plugins(&self.conn.lock().expect("registry"))?;
        for row in &installed {
            if self.loaded.get(&row.name) == Some(&row.updated_ms) {
                continue;
            }
            self.loaded.insert(row.name.clone(), row.updated_ms);
            if !row.enabled {
                if self.plugins.remove(&row.name) {
                    tracing::info!(plugin = %row.name, status = %row.status, "plugin unloaded");
                }
                continue;
            }
            match self.load(row) {
                Ok(()) => {
                    tracing::info!(plugin = %row.name, version = %row.version, sha256 = %row.sha256, "plugin loaded from the registry")
                }
                Err(e) => tracing::error!(plugin = %row.name, "cannot load installed plugin: {e}"),
            }
        }
        let names: Vec<String> =
            self.loaded.keys().filter(|n| !installed.iter().any(|r| &r.name == *n)).cloned().collect();
        for name in names {
            self.loaded.remove(&name);
            if self.plugins.remove(&name) {
                tracing::info!(plugin = %name, "plugin removed");
            }
        }
        self.record_health(&installed)
    }

    fn load(&self, row: &InstalledPlugin) -> Result<(), PluginError> {
        let config = self.config.model().plugin_config.get(&row.name).cloned().unwrap_or_default();
        self.plugins.insert(prepare(&self.plugins, &self.blobs, row, config)?);
        Ok(())
    }

    fn record_health(&self, installed: &[InstalledPlugin]) -> Result<(), starling_store::StoreError> {
        let conn = self.conn.lock().expect("registry");
        for row in installed.iter().filter(|r| r.enabled) {
            let Ok(plugin) = self.plugins.get(&row.name) else { continue };
            let (failures, consecutive, disabled) = plugin.health();
            if (failures as i64, consecutive as i64) != (row.failures, row.consecutive_failures) || disabled.is_some() {
                starling_store::record_plugin_health(
                    &conn,
                    &row.name,
                    failures as i64,
                    consecutive as i64,
                    disabled.as_deref(),
                    (self.clock)(),
                )?;
            }
        }
        Ok(())
    }

    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(POLL) => {}
                _ = shutdown.changed() => return,
            }
            let result = tokio::task::block_in_place(|| self.sync());
            if let Err(e) = result {
                tracing::error!("syncing plugins with the registry: {e}");
            }
        }
    }
}

/// Reads, checks and compiles an installed plugin from its blob, with `config` as its
/// configuration values, without making it callable.
pub fn prepare(
    plugins: &PluginHost,
    blobs: &std::path::Path,
    row: &InstalledPlugin,
    config: std::collections::BTreeMap<String, String>,
) -> Result<starling_runtime::Plugin, PluginError> {
    let path = blobs.join(format!("{}.wasm", row.sha256));
    let failed = |message: String| PluginError::Load { path: path.clone(), message };
    let mut manifest = Manifest::parse(&row.manifest).map_err(|e| failed(e.to_string()))?;
    // The stored blob must still be the component that was installed.
    manifest.sha256 = Some(row.sha256.clone());
    let bytes = std::fs::read(&path).map_err(|e| failed(format!("reading blob: {e}")))?;
    // Trust is checked at every load: the row may have been written around `plugin add`.
    plugins.check_signature(&row.manifest, &row.sha256, row.signature.as_deref()).map_err(|e| failed(e.to_string()))?;
    plugins.build(manifest, &bytes, config).map_err(|e| failed(e.to_string()))
}
