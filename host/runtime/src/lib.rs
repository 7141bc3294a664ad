//! Starling's WebAssembly runtime: loads connector and enricher components on wasmtime, checks
//! they implement the world they claim, and runs each call in a fresh sandbox with the memory
//! cap, deadline and outbound hosts of the plugin's manifest.

mod artifacts;
mod bindings;
pub mod convert;
pub mod egress;
mod error;
pub mod manifest;
pub mod signing;

pub use bindings::types;
pub use error::{ComponentError, EgressError, ManifestError, PluginError, SignatureError};
pub use manifest::{Api, Kind, Manifest};

use bindings::{connector, enricher, v1};
use egress::{Egress, HostPattern};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use wasmtime::component::{Component, HasSelf, Linker, ResourceTable};
use wasmtime::{
    Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Store, StoreLimits, StoreLimitsBuilder, Trap,
};
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

/// How often the epoch advances; deadlines are counted in these ticks.
const EPOCH_TICK: Duration = Duration::from_millis(10);
/// Host-side slack on top of a plugin's deadline before its call is abandoned.
const HOST_GRACE: Duration = Duration::from_millis(100);
/// Host-side bounds on what a plugin makes the host hold, which its memory cap does not count:
/// host resources (HTTP requests, headers, streams) at once, bytes of one header map, log
/// lines per call and characters of a log line or an error message the host keeps.
const MAX_HOST_RESOURCES: usize = 1_000;
const MAX_HEADER_BYTES: usize = 16 * 1024;
const MAX_LOG_LINES_PER_CALL: u32 = 100;
const MAX_LOG_CHARS: usize = 4_096;
const MAX_MESSAGE_CHARS: usize = 1_000;

/// Settings of a [`PluginHost`].
#[derive(Debug, Clone)]
pub struct HostOptions {
    /// Where compiled components are kept, so a restart does not compile them again.
    pub cache_dir: Option<PathBuf>,
    /// Consecutive failed calls (traps, timeouts) after which a plugin is disabled.
    pub failure_limit: u64,
    /// The most memory and the longest deadline a manifest may ask for: the operator's
    /// ceilings over what third-party manifests set for themselves.
    pub max_memory_mib: u64,
    pub max_timeout_ms: u64,
    /// Public keys (hex) one of which must have signed every plugin loaded, from a plugin
    /// directory or from the registry; `None`: signatures are not required.
    pub trusted_keys: Option<Vec<String>>,
    /// Threads connector calls run on, apart from the caller's.
    pub call_threads: usize,
}

impl Default for HostOptions {
    fn default() -> Self {
        HostOptions {
            cache_dir: None,
            failure_limit: 10,
            max_memory_mib: 256,
            max_timeout_ms: 30_000,
            trusted_keys: None,
            call_threads: 2,
        }
    }
}

/// The threads connector calls run on. A connector spinning to its deadline holds one of these,
/// never a thread of the server that answers HTTP requests and schedules deliveries.
struct CallThreads(Option<tokio::runtime::Runtime>);

impl CallThreads {
    fn start(threads: usize) -> std::io::Result<CallThreads> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads.max(1))
            .thread_name("starling-plugin")
            .enable_all()
            .build()?;
        Ok(CallThreads(Some(runtime)))
    }

    /// Runs `call` on these threads and waits for it.
    async fn run<T: Send + 'static>(&self, call: impl Future<Output = T> + Send + 'static) -> Result<T, String> {
        let runtime = self.0.as_ref().expect("running until dropped");
        runtime.spawn(call).await.map_err(|e| e.to_string())
    }
}

impl Drop for CallThreads {
    fn drop(&mut self) {
        // Dropping a runtime may happen on an async thread, where waiting would panic; calls
        // still under way end at their deadlines.
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

/// A plugin's call record since it was loaded.
#[derive(Debug, Default)]
struct Health {
    calls: AtomicU64,
    /// Wall time spent in calls, in microseconds.
    call_micros: AtomicU64,
    failures: AtomicU64,
    consecutive: AtomicU64,
    disabled: Mutex<Option<String>>,
}

/// What every call of one plugin shares.
struct PluginMeta {
    name: Arc<str>,
    config: BTreeMap<String, String>,
    allowed_hosts: Arc<[HostPattern]>,
    memory_bytes: usize,
    timeout: Duration,
    /// Keep-alive connections for the plugin's outbound requests.
    http: egress::HttpClient,
}

/// A component ready to instantiate, by kind and interface version.
enum Pre {
    Connector(connector::ConnectorPre<PluginState>),
    Enricher(enricher::EnricherPre<PluginState>),
    ConnectorV1(v1::connector::ConnectorPre<PluginState>),
    EnricherV1(v1::enricher::EnricherPre<PluginState>),
}

impl Pre {
    fn kind(&self) -> Kind {
        match self {
            Pre::Connector(_) | Pre::ConnectorV1(_) => Kind::Connector,
            Pre::Enricher(_) | Pre::EnricherV1(_) => Kind::Enricher,
        }
    }
}

/// An enricher instance of either interface version.
enum EnricherInstance {
    Current(enricher::Enricher),
    V1(v1::enricher::Enricher),
}

/// A loaded, validated plugin.
pub struct Plugin {
    pub manifest: Manifest,
    pub sha256: String,
    pub size: usize,
    /// Interfaces the component imports and exports.
    pub imports: Vec<String>,
    pub exports: Vec<String>,
    meta: Arc<PluginMeta>,
    pre: Pre,
    health: Health,
    /// Enricher instances that finished a call cleanly, ready for the next one.
    idle: Mutex<Vec<IdleEnricher>>,
}

/// An enricher instance kept between calls. Instantiating costs far more than an enricher's
/// work, and enrichers have no outbound access through which state could leave; an instance is
/// dropped after any failed call and after [`ENRICHER_REUSE`] calls, so a plugin that leaks
/// memory or corrupts its state gets a fresh one.
struct IdleEnricher {
    store: Store<PluginState>,
    instance: EnricherInstance,
    calls: u32,
}

/// Calls one enricher instance serves before it is replaced.
const ENRICHER_REUSE: u32 = 10_000;
/// Idle instances kept per enricher: one per caller running at once is enough.
const MAX_IDLE_ENRICHERS: usize = 16;

impl Plugin {
    /// Calls made and the seconds they took in all, for metrics.
    pub fn call_time(&self) -> (u64, f64) {
        (self.health.calls.load(Ordering::Relaxed), self.health.call_micros.load(Ordering::Relaxed) as f64 / 1e6)
    }

    /// Failed calls, consecutive failed calls, and why the plugin was disabled if it was.
    pub fn health(&self) -> (u64, u64, Option<String>) {
        (
            self.health.failures.load(Ordering::Relaxed),
            self.health.consecutive.load(Ordering::Relaxed),
            self.health.disabled.lock().expect("health").clone(),
        )
    }
}

impl std::fmt::Debug for Plugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plugin")
            .field("name", &self.manifest.name)
            .field("kind", &self.manifest.kind)
            .field("sha256", &self.sha256)
            .finish()
    }
}

/// The state of one sandboxed call.
pub struct PluginState {
    meta: Arc<PluginMeta>,
    table: ResourceTable,
    wasi: WasiCtx,
    http: WasiHttpCtx,
    egress: Egress,
    limits: MemoryBudget,
    /// Log lines written in the current call.
    logged: u32,
}

/// A store's limits, with the manifest's memory cap applied to all its linear memories
/// together: `StoreLimits` caps each memory on its own, so a component with sixteen memories
/// would get sixteen times the cap.
struct MemoryBudget {
    each: StoreLimits,
    total_bytes: usize,
    used_bytes: usize,
}

impl wasmtime::ResourceLimiter for MemoryBudget {
    fn memory_growing(&mut self, current: usize, desired: usize, maximum: Option<usize>) -> wasmtime::Result<bool> {
        let growth = desired.saturating_sub(current);
        if self.used_bytes.saturating_add(growth) > self.total_bytes {
            return Ok(false);
        }
        let allowed = self.each.memory_growing(current, desired, maximum)?;
        if allowed {
            self.used_bytes += growth;
        }
        Ok(allowed)
    }

    fn table_growing(&mut self, current: usize, desired: usize, maximum: Option<usize>) -> wasmtime::Result<bool> {
        self.each.table_growing(current, desired, maximum)
    }

    fn instances(&self) -> usize {
        self.each.instances()
    }

    fn tables(&self) -> usize {
        self.each.tables()
    }

    fn memories(&self) -> usize {
        self.each.memories()
    }
}

impl WasiView for PluginState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

impl WasiHttpView for PluginState {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView { ctx: &mut self.http, table: &mut self.table, hooks: &mut self.egress }
    }
}

impl types::Host for PluginState {}
impl v1::types::Host for PluginState {}

use connector::starling::plugin0_2_0::{config as config_api, log as log_api};
use v1::connector::starling::plugin0_1_0::{config as config_api_v1, log as log_api_v1};

impl log_api_v1::Host for PluginState {
    fn log(&mut self, level: log_api_v1::Level, message: String) {
        use log_api::Level;
        let level = match level {
            log_api_v1::Level::Trace => Level::Trace,
            log_api_v1::Level::Debug => Level::Debug,
            log_api_v1::Level::Info => Level::Info,
            log_api_v1::Level::Warn => Level::Warn,
            log_api_v1::Level::Error => Level::Error,
        };
        log_api::Host::log(self, level, message)
    }
}

impl config_api_v1::Host for PluginState {
    fn get(&mut self, key: String) -> Option<String> {
        config_api::Host::get(self, key)
    }
}

impl log_api::Host for PluginState {
    fn log(&mut self, level: log_api::Level, message: String) {
        use log_api::Level;
        self.logged += 1;
        let plugin = &*self.meta.name;
        if self.logged > MAX_LOG_LINES_PER_CALL {
            if self.logged == MAX_LOG_LINES_PER_CALL + 1 {
                tracing::warn!(
                    plugin,
                    "more than {MAX_LOG_LINES_PER_CALL} log lines in one call; the rest are dropped"
                );
            }
            return;
        }
        let message = bounded(message, MAX_LOG_CHARS);
        match level {
            Level::Trace => tracing::trace!(plugin, "{message}"),
            Level::Debug => tracing::debug!(plugin, "{message}"),
            Level::Info => tracing::info!(plugin, "{message}"),
            Level::Warn => tracing::warn!(plugin, "{message}"),
            Level::Error => tracing::error!(plugin, "{message}"),
        }
    }
}

impl config_api::Host for PluginState {
    fn get(&mut self, key: String) -> Option<String> {
        self.meta.config.get(&key).cloned()
    }
}

/// Advances the engine's epoch until dropped.
struct EpochTicker {
    stop: Arc<AtomicBool>,
}

impl EpochTicker {
    fn start(engine: &Engine) -> EpochTicker {
        let stop = Arc::new(AtomicBool::new(false));
        let (engine, flag) = (engine.clone(), stop.clone());
        std::thread::Builder::new()
            .name("starling-epoch".into())
            .spawn(move || {
                while !flag.load(Ordering::Relaxed) {
                    std::thread::sleep(EPOCH_TICK);
                    engine.increment_epoch();
                }
            })
            .expect("spawning the epoch thread");
        EpochTicker { stop }
    }
}

impl Drop for EpochTicker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Loads plugins and runs their calls.
pub struct PluginHost {
    engine: Engine,
    /// Where precompiled components are kept, by component hash and engine compatibility.
    artifacts: Option<artifacts::ArtifactCache>,
    failure_limit: u64,
    max_memory_mib: u64,
    max_timeout_ms: u64,
    trusted_keys: Option<Vec<String>>,
    connector_linker: Linker<PluginState>,
    enricher_linker: Linker<PluginState>,
    plugins: RwLock<HashMap<String, Arc<Plugin>>>,
    /// The server's own listeners, out of every plugin's reach.
    listeners: egress::Listeners,
    calls: CallThreads,
    _ticker: EpochTicker,
}

impl PluginHost {
    pub fn new() -> Result<PluginHost, PluginError> {
        Self::with_options(HostOptions::default())
    }

    pub fn with_options(options: HostOptions) -> Result<PluginHost, PluginError> {
        let fail = |e: wasmtime::Error| PluginError::Load { path: PathBuf::new(), message: e.to_string() };
        let mut config = Config::new();
        config.epoch_interruption(true);
        config.wasm_component_model(true);
        config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool()));
        let engine = Engine::new(&config).map_err(fail)?;

        let mut enricher_linker = Linker::new(&engine);
        add_starling_imports(&mut enricher_linker).map_err(fail)?;

        let mut connector_linker = Linker::new(&engine);
        add_starling_imports(&mut connector_linker).map_err(fail)?;
        // All of WASI, backed by a context that grants nothing (see `PluginHost::store`): what
        // language runtimes import to start is there, and every request for a file, a variable
        // or a socket fails.
        wasmtime_wasi::p2::add_to_linker_async(&mut connector_linker).map_err(fail)?;
        wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut connector_linker).map_err(fail)?;

        let artifacts = options
            .cache_dir
            .map(artifacts::ArtifactCache::open)
            .transpose()
            .map_err(|e| PluginError::Load { path: PathBuf::new(), message: e.to_string() })?;
        let ticker = EpochTicker::start(&engine);
        let calls = CallThreads::start(options.call_threads).map_err(|e| PluginError::Load {
            path: PathBuf::new(),
            message: format!("starting plugin threads: {e}"),
        })?;
        Ok(PluginHost {
            engine,
            artifacts,
            failure_limit: options.failure_limit.max(1),
            max_memory_mib: options.max_memory_mib,
            max_timeout_ms: options.max_timeout_ms,
            trusted_keys: options.trusted_keys,
            connector_linker,
            enricher_linker,
            plugins: RwLock::new(HashMap::new()),
            listeners: egress::Listeners::default(),
            calls,
            _ticker: ticker,
        })
    }

    /// Loads every plugin in `dir` (one subdirectory with a `plugin.toml` each), giving each its
    /// configuration from `config` by plugin name.
    pub fn load_dir(
        &self,
        dir: &Path,
        config: &BTreeMap<String, BTreeMap<String, String>>,
    ) -> Result<Vec<Arc<Plugin>>, PluginError> {
        let load_err = |message: String| PluginError::Load { path: dir.to_path_buf(), message };
        let mut manifests: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| load_err(e.to_string()))?
            .filter_map(|entry| entry.ok().map(|e| e.path().join("plugin.toml")))
            .filter(|p| p.is_file())
            .collect();
        manifests.sort();
        let mut loaded = Vec::new();
        for path in manifests {
            let text = std::fs::read_to_string(&path)
                .map_err(|e| PluginError::Load { path: path.clone(), message: e.to_string() })?;
            let name = Manifest::parse(&text)
                .map_err(|e| PluginError::Load { path: path.clone(), message: e.to_string() })?
                .name;
            loaded.push(self.load(&path, config.get(&name).cloned().unwrap_or_default())?);
        }
        Ok(loaded)
    }

    /// Loads (or replaces) one plugin from its manifest file.
    pub fn load(&self, manifest_path: &Path, config: BTreeMap<String, String>) -> Result<Arc<Plugin>, PluginError> {
        Ok(self.insert(self.prepare(manifest_path, config)?))
    }

    /// The manifest file of the plugin named `name` in `dir` (one subdirectory per plugin).
    pub fn find_in_dir(dir: &Path, name: &str) -> Option<PathBuf> {
        let entries = std::fs::read_dir(dir).ok()?;
        entries.filter_map(|e| e.ok().map(|e| e.path().join("plugin.toml"))).find(|path| {
            std::fs::read_to_string(path)
                .ok()
                .and_then(|text| Manifest::parse(&text).ok())
                .is_some_and(|m| m.name == name)
        })
    }

    /// Reads, checks and compiles one plugin from its manifest file, without making it
    /// callable: [`PluginHost::insert`] does, so that a set of plugins is put in place only
    /// once every one of them is ready.
    pub fn prepare(&self, manifest_path: &Path, config: BTreeMap<String, String>) -> Result<Plugin, PluginError> {
        let err = |message: String| PluginError::Load { path: manifest_path.to_path_buf(), message };
        let text = std::fs::read_to_string(manifest_path).map_err(|e| err(e.to_string()))?;
        let manifest = Manifest::parse(&text).map_err(|e| err(e.to_string()))?;
        let dir = manifest_path.parent().unwrap_or(Path::new("."));
        let component_path = dir.join(&manifest.component);
        let bytes =
            std::fs::read(&component_path).map_err(|e| err(format!("reading {}: {e}", component_path.display())))?;
        let signature = std::fs::read_to_string(dir.join(signing::SIGNATURE_FILE)).ok();
        let sha256 = hex::encode(Sha256::digest(&bytes));
        self.check_signature(&text, &sha256, signature.as_deref()).map_err(|e| err(e.to_string()))?;
        self.build(manifest, &bytes, config).map_err(|e| err(e.to_string()))
    }

    /// Makes a prepared plugin callable (replacing one of the same name; calls under way finish).
    pub fn insert(&self, plugin: Plugin) -> Arc<Plugin> {
        let plugin = Arc::new(plugin);
        self.plugins.write().expect("plugin table").insert(plugin.manifest.name.clone(), plugin.clone());
        plugin
    }

    /// With trusted keys configured, a plugin must be signed by one of them: its manifest text
    /// and component hash as they are now, at every load, not only when it was installed.
    /// Returns the signer, if it was signed.
    pub fn check_signature(
        &self,
        manifest_text: &str,
        component_sha256: &str,
        signature: Option<&str>,
    ) -> Result<Option<String>, SignatureError> {
        match (signature, &self.trusted_keys) {
            (None, None) => Ok(None),
            (None, Some(_)) => Err(SignatureError::Unsigned),
            (Some(signature), trusted) => {
                signing::verify(signature, manifest_text, component_sha256, trusted.as_deref()).map(Some)
            }
        }
    }

    /// Validates and compiles a component; does not make it callable.
    pub fn validate(&self, manifest: Manifest, bytes: &[u8]) -> Result<Plugin, ComponentError> {
        self.compile(manifest, bytes, BTreeMap::new())
    }

    /// Loads (or replaces, without disturbing calls under way) a plugin from its bytes.
    pub fn install(
        &self,
        manifest: Manifest,
        bytes: &[u8],
        config: BTreeMap<String, String>,
    ) -> Result<Arc<Plugin>, ComponentError> {
        Ok(self.insert(self.build(manifest, bytes, config)?))
    }

    /// Checks a plugin's limits against this host's ceilings and compiles it.
    pub fn build(
        &self,
        manifest: Manifest,
        bytes: &[u8],
        config: BTreeMap<String, String>,
    ) -> Result<Plugin, ComponentError> {
        let limits = &manifest.limits;
        if limits.memory_mib > self.max_memory_mib {
            return Err(ComponentError::Ceiling(format!(
                "limits.memory_mib is {}, more than this server allows (server.plugin_max_memory_mib = {})",
                limits.memory_mib, self.max_memory_mib
            )));
        }
        if limits.timeout_ms > self.max_timeout_ms {
            return Err(ComponentError::Ceiling(format!(
                "limits.timeout_ms is {}, more than this server allows (server.plugin_max_timeout_ms = {})",
                limits.timeout_ms, self.max_timeout_ms
            )));
        }
        self.compile(manifest, bytes, config)
    }

    /// Unloads a plugin; calls under way finish.
    pub fn remove(&self, name: &str) -> bool {
        self.plugins.write().expect("plugin table").remove(name).is_some()
    }

    fn compile(
        &self,
        manifest: Manifest,
        bytes: &[u8],
        config: BTreeMap<String, String>,
    ) -> Result<Plugin, ComponentError> {
        let sha256 = hex::encode(Sha256::digest(bytes));
        if let Some(expected) = &manifest.sha256
            && !expected.eq_ignore_ascii_case(&sha256)
        {
            return Err(ComponentError::Digest { expected: expected.clone(), actual: sha256 });
        }
        if !wasmparser::Parser::is_component(bytes) {
            return Err(ComponentError::NotAComponent);
        }
        let component = self.component(bytes, &sha256)?;
        check_imports(&self.engine, &component, manifest.kind)?;
        let ty = component.component_type();
        let imports = ty.imports(&self.engine).map(|(n, _)| n.to_string()).collect();
        let exports = ty.exports(&self.engine).map(|(n, _)| n.to_string()).collect();
        let exports_error =
            |e: wasmtime::Error| ComponentError::Exports { world: manifest.world.clone(), message: e.to_string() };
        let pre = match (manifest.kind, manifest.api()) {
            (Kind::Connector, Api::V0_2) => Pre::Connector(
                self.connector_linker
                    .instantiate_pre(&component)
                    .and_then(connector::ConnectorPre::new)
                    .map_err(exports_error)?,
            ),
            (Kind::Enricher, Api::V0_2) => Pre::Enricher(
                self.enricher_linker
                    .instantiate_pre(&component)
                    .and_then(enricher::EnricherPre::new)
                    .map_err(exports_error)?,
            ),
            (Kind::Connector, Api::V0_1) => Pre::ConnectorV1(
                self.connector_linker
                    .instantiate_pre(&component)
                    .and_then(v1::connector::ConnectorPre::new)
                    .map_err(exports_error)?,
            ),
            (Kind::Enricher, Api::V0_1) => Pre::EnricherV1(
                self.enricher_linker
                    .instantiate_pre(&component)
                    .and_then(v1::enricher::EnricherPre::new)
                    .map_err(exports_error)?,
            ),
        };
        let allowed_hosts =
            manifest.capabilities.allowed_hosts.iter().map(|p| HostPattern::parse(p)).collect::<Result<Vec<_>, _>>()?;
        let meta = Arc::new(PluginMeta {
            name: manifest.name.as_str().into(),
            config,
            allowed_hosts: allowed_hosts.into(),
            memory_bytes: (manifest.limits.memory_mib * 1024 * 1024) as usize,
            timeout: Duration::from_millis(manifest.limits.timeout_ms),
            http: egress::http_client(Duration::from_millis(manifest.limits.timeout_ms)),
        });
        Ok(Plugin {
            manifest,
            sha256,
            size: bytes.len(),
            imports,
            exports,
            meta,
            pre,
            health: Health::default(),
            idle: Mutex::default(),
        })
    }

    /// Compiles a component, or loads its sealed precompiled artifact: compiling a large
    /// (Python, JavaScript) component takes seconds, loading it milliseconds.
    fn component(&self, bytes: &[u8], sha256: &str) -> Result<Component, ComponentError> {
        match &self.artifacts {
            Some(cache) => cache.component(&self.engine, bytes, sha256),
            None => Component::from_binary(&self.engine, bytes).map_err(|e| ComponentError::Compile(e.to_string())),
        }
    }

    pub fn get(&self, name: &str) -> Result<Arc<Plugin>, PluginError> {
        self.plugins
            .read()
            .expect("plugin table")
            .get(name)
            .cloned()
            .ok_or_else(|| PluginError::NotLoaded(name.to_string()))
    }

    /// Puts an address the server listens on out of every plugin's reach.
    pub fn refuse_listener(&self, addr: std::net::SocketAddr) {
        self.listeners.write().expect("listeners").push(addr);
    }

    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.plugins.read().expect("plugin table").keys().cloned().collect();
        names.sort();
        names
    }

    fn store(&self, meta: &Arc<PluginMeta>) -> Store<PluginState> {
        let mut table = ResourceTable::new();
        table.set_max_capacity(MAX_HOST_RESOURCES);
        let mut http = WasiHttpCtx::new();
        http.set_field_size_limit(MAX_HEADER_BYTES);
        let state = PluginState {
            meta: meta.clone(),
            table,
            // No directories, no environment, no arguments, no network: connectors reach
            // outside only through wasi:http, which `egress` checks.
            wasi: WasiCtxBuilder::new().allow_tcp(false).allow_udp(false).allow_ip_name_lookup(false).build(),
            http,
            egress: Egress {
                plugin: meta.name.clone(),
                allowed: meta.allowed_hosts.clone(),
                timeout: meta.timeout,
                client: meta.http.clone(),
                listeners: self.listeners.clone(),
            },
            // Components from language toolchains (Python, JavaScript) hold dozens of core instances.
            limits: MemoryBudget {
                each: StoreLimitsBuilder::new().memory_size(meta.memory_bytes).instances(256).build(),
                total_bytes: meta.memory_bytes,
                used_bytes: 0,
            },
            logged: 0,
        };
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| &mut s.limits);
        store.epoch_deadline_trap();
        Self::reset_deadline(&mut store, meta);
        store
    }

    /// Gives the next call the plugin's whole time budget, counted from now.
    fn reset_deadline(store: &mut Store<PluginState>, meta: &PluginMeta) {
        store.data_mut().logged = 0;
        let ticks = meta.timeout.as_millis().div_ceil(EPOCH_TICK.as_millis()) as u64 + 1;
        store.set_epoch_deadline(ticks);
    }

    /// The plugin, if it is loaded and not disabled.
    fn callable(&self, name: &str) -> Result<Arc<Plugin>, PluginError> {
        let plugin = self.get(name)?;
        if let Some(reason) = plugin.health.disabled.lock().expect("health").clone() {
            return Err(PluginError::Disabled { plugin: name.to_string(), reason });
        }
        Ok(plugin)
    }

    /// Delivers a batch of actions through a connector; one result per action.
    pub async fn deliver(
        &self,
        name: &str,
        actions: &[types::Action],
    ) -> Result<Vec<Result<(), types::DeliveryError>>, PluginError> {
        let (plugin, mut store) = self.connector(name)?;
        let (failure_limit, owned) = (self.failure_limit, actions.to_vec());
        let call = async move {
            guarded(failure_limit, &plugin, async {
                match &plugin.pre {
                    Pre::Connector(pre) => {
                        let instance = pre.instantiate_async(&mut store).await?;
                        instance.starling_plugin0_2_0_deliver().call_deliver(&mut store, &owned).await
                    }
                    Pre::ConnectorV1(pre) => {
                        let instance = pre.instantiate_async(&mut store).await?;
                        let old: Vec<_> = owned.iter().map(convert::v1::action).collect();
                        let results = instance.starling_plugin0_1_0_deliver().call_deliver(&mut store, &old).await?;
                        Ok(results.into_iter().map(|r| r.map_err(convert::v1::delivery_error)).collect())
                    }
                    Pre::Enricher(_) | Pre::EnricherV1(_) => unreachable!("a connector"),
                }
            })
            .await
        };
        let results =
            self.calls.run(call).await.map_err(|message| PluginError::Trap { plugin: name.into(), message })??;
        if results.len() != actions.len() {
            return Err(PluginError::Trap {
                plugin: name.into(),
                message: format!("returned {} results for {} actions", results.len(), actions.len()),
            });
        }
        Ok(results.into_iter().map(bounded_delivery).collect())
    }

    /// Asks a connector to describe itself.
    pub async fn describe(&self, name: &str) -> Result<types::ConnectorInfo, PluginError> {
        let (plugin, mut store) = self.connector(name)?;
        let failure_limit = self.failure_limit;
        let call = async move {
            guarded(failure_limit, &plugin, async {
                match &plugin.pre {
                    Pre::Connector(pre) => {
                        let instance = pre.instantiate_async(&mut store).await?;
                        instance.starling_plugin0_2_0_deliver().call_describe(&mut store).await
                    }
                    Pre::ConnectorV1(pre) => {
                        let instance = pre.instantiate_async(&mut store).await?;
                        let info = instance.starling_plugin0_1_0_deliver().call_describe(&mut store).await?;
                        Ok(convert::v1::connector_info(info))
                    }
                    Pre::Enricher(_) | Pre::EnricherV1(_) => unreachable!("a connector"),
                }
            })
            .await
        };
        self.calls.run(call).await.map_err(|message| PluginError::Trap { plugin: name.into(), message })?
    }

    /// Connector `name`, if callable, with a fresh store for one call.
    fn connector(&self, name: &str) -> Result<(Arc<Plugin>, Store<PluginState>), PluginError> {
        let plugin = self.callable(name)?;
        if plugin.pre.kind() != Kind::Connector {
            return Err(PluginError::WrongKind { plugin: name.into(), actual: "enricher", expected: "connector" });
        }
        let store = self.store(&plugin.meta);
        Ok((plugin, store))
    }

    /// Runs an enricher for an occasion (an event, or a visit's end) and a profile, on an idle
    /// instance of it when there is one. A 0.1.0 enricher knows only events: a visit's end is
    /// not its occasion, and it is not called (`Ok(Ok([]))`).
    pub async fn enrich(
        &self,
        name: &str,
        occasion: &types::Occasion,
        profile: &types::ProfileView,
    ) -> Result<Result<Vec<types::AttributeUpdate>, types::EnrichError>, PluginError> {
        let plugin = self.callable(name)?;
        if plugin.pre.kind() != Kind::Enricher {
            return Err(PluginError::WrongKind { plugin: name.into(), actual: "connector", expected: "enricher" });
        }
        if matches!((&plugin.pre, occasion), (Pre::EnricherV1(_), types::Occasion::VisitEnded(_))) {
            return Ok(Ok(Vec::new()));
        }
        let idle = plugin.idle.lock().expect("idle enrichers").pop();
        let (mut store, instance, calls) = match idle {
            Some(IdleEnricher { mut store, instance, calls }) => {
                Self::reset_deadline(&mut store, &plugin.meta);
                (store, Some(instance), calls)
            }
            None => (self.store(&plugin.meta), None, 0),
        };
        let result = guarded(self.failure_limit, &plugin, async {
            let instance = match (instance, &plugin.pre) {
                (Some(instance), _) => instance,
                (None, Pre::Enricher(pre)) => EnricherInstance::Current(pre.instantiate_async(&mut store).await?),
                (None, Pre::EnricherV1(pre)) => EnricherInstance::V1(pre.instantiate_async(&mut store).await?),
                (None, Pre::Connector(_) | Pre::ConnectorV1(_)) => unreachable!("an enricher"),
            };
            let result = match (&instance, occasion) {
                (EnricherInstance::Current(current), _) => {
                    current.starling_plugin0_2_0_enrich().call_enrich(&mut store, occasion, profile).await?
                }
                (EnricherInstance::V1(old), types::Occasion::Event(event)) => old
                    .starling_plugin0_1_0_enrich()
                    .call_enrich(&mut store, &convert::v1::event(event), &convert::v1::profile(profile))
                    .await?
                    .map(convert::v1::updates)
                    .map_err(types::EnrichError::Failed),
                (EnricherInstance::V1(_), types::Occasion::VisitEnded(_)) => unreachable!("not called above"),
            };
            Ok((instance, result))
        })
        .await;
        let (instance, result) = result?;
        if calls + 1 < ENRICHER_REUSE {
            let mut idle = plugin.idle.lock().expect("idle enrichers");
            if idle.len() < MAX_IDLE_ENRICHERS {
                idle.push(IdleEnricher { store, instance, calls: calls + 1 });
            }
        }
        Ok(result.map_err(bounded_enrich_error))
    }
}

/// Runs `call` under the plugin's deadline, bounding time in host calls (outbound HTTP) too,
/// and keeps the plugin's health: `failure_limit` failures in a row disable it.
async fn guarded<T>(
    failure_limit: u64,
    plugin: &Plugin,
    call: impl Future<Output = wasmtime::Result<T>>,
) -> Result<T, PluginError> {
    let meta = &plugin.meta;
    let timeout =
        || PluginError::Timeout { plugin: meta.name.to_string(), timeout_ms: meta.timeout.as_millis() as u64 };
    let started = std::time::Instant::now();
    // A deadline passed while the plugin waited on the host (an outside service that does not
    // answer) is the destination's doing: it fails the call but does not count towards
    // disabling the plugin, which a hanging destination would otherwise take from every other.
    let (result, plugins_doing) = match tokio::time::timeout(meta.timeout + HOST_GRACE, call).await {
        Err(_) => (Err(timeout()), false),
        Ok(Ok(v)) => (Ok(v), false),
        Ok(Err(e)) if matches!(e.downcast_ref::<Trap>(), Some(Trap::Interrupt)) => (Err(timeout()), true),
        Ok(Err(e)) => (Err(PluginError::Trap { plugin: meta.name.to_string(), message: describe_error(&e) }), true),
    };
    let health = &plugin.health;
    health.calls.fetch_add(1, Ordering::Relaxed);
    health.call_micros.fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
    match &result {
        Ok(_) => health.consecutive.store(0, Ordering::Relaxed),
        Err(_) if !plugins_doing => {
            health.failures.fetch_add(1, Ordering::Relaxed);
        }
        Err(e) => {
            health.failures.fetch_add(1, Ordering::Relaxed);
            let streak = health.consecutive.fetch_add(1, Ordering::Relaxed) + 1;
            if streak >= failure_limit {
                let reason = format!("disabled after {streak} consecutive failures; last: {e}");
                tracing::error!(plugin = %meta.name, "{reason}");
                *health.disabled.lock().expect("health") = Some(reason);
            }
        }
    }
    result
}

/// Connector calls (and enrichers after a failure) instantiate afresh; the pooling allocator
/// keeps memories, tables and async stacks mapped between calls, so an instantiation reuses a
/// warm slot instead of mapping and unmapping memory each time. Sized for the calls one server runs at once (ingestion
/// workers and delivery lanes), with room for components from language toolchains, which hold
/// dozens of core instances and large function tables.
fn pool() -> PoolingAllocationConfig {
    const CONCURRENT_CALLS: u32 = 128;
    let mut pool = PoolingAllocationConfig::new();
    pool.total_component_instances(CONCURRENT_CALLS)
        .total_stacks(CONCURRENT_CALLS)
        .total_core_instances(CONCURRENT_CALLS * 16)
        .total_memories(CONCURRENT_CALLS * 4)
        .total_tables(CONCURRENT_CALLS * 8)
        .max_memories_per_component(16)
        .max_memories_per_module(16)
        .max_tables_per_component(64)
        .table_elements(100_000)
        .max_memory_size((manifest::MAX_MEMORY_MIB << 20) as usize);
    pool
}

/// Both interface versions' imports, so that components built against either link.
fn add_starling_imports(linker: &mut Linker<PluginState>) -> wasmtime::Result<()> {
    types::add_to_linker::<_, HasSelf<_>>(linker, |s| s)?;
    log_api::add_to_linker::<_, HasSelf<_>>(linker, |s| s)?;
    config_api::add_to_linker::<_, HasSelf<_>>(linker, |s| s)?;
    v1::types::add_to_linker::<_, HasSelf<_>>(linker, |s| s)?;
    log_api_v1::add_to_linker::<_, HasSelf<_>>(linker, |s| s)?;
    config_api_v1::add_to_linker::<_, HasSelf<_>>(linker, |s| s)?;
    Ok(())
}

/// Interfaces a plugin of each kind may import; anything else is refused at load.
fn import_allowed(kind: Kind, name: &str) -> bool {
    const STARLING: &[&str] = &[
        "starling:plugin/types@0.2.",
        "starling:plugin/log@0.2.",
        "starling:plugin/config@0.2.",
        "starling:plugin/types@0.1.",
        "starling:plugin/log@0.1.",
        "starling:plugin/config@0.1.",
    ];
    const HTTP: &[&str] = &[
        "wasi:http/types@0.2.",
        "wasi:http/outgoing-handler@0.2.",
        "wasi:io/poll@0.2.",
        "wasi:io/error@0.2.",
        "wasi:io/streams@0.2.",
        "wasi:clocks/monotonic-clock@0.2.",
        "wasi:clocks/wall-clock@0.2.",
        "wasi:random/random@0.2.",
        "wasi:cli/stdout@0.2.",
        "wasi:cli/stderr@0.2.",
        "wasi:cli/stdin@0.2.",
    ];
    // Granted nothing by the context connectors run in (`PluginHost::store`).
    const CAPABILITY_FREE: &[&str] = &[
        "wasi:cli/environment@0.2.",
        "wasi:cli/exit@0.2.",
        "wasi:cli/terminal-",
        "wasi:filesystem/types@0.2.",
        "wasi:filesystem/preopens@0.2.",
        "wasi:sockets/",
    ];
    let matches = |list: &[&str]| list.iter().any(|p| name.starts_with(p));
    match kind {
        Kind::Enricher => matches(STARLING),
        Kind::Connector => matches(STARLING) || matches(HTTP) || matches(CAPABILITY_FREE),
    }
}

fn check_imports(engine: &Engine, component: &Component, kind: Kind) -> Result<(), ComponentError> {
    let refused: Vec<String> = component
        .component_type()
        .imports(engine)
        .map(|(name, _)| name.to_string())
        .filter(|name| !import_allowed(kind, name))
        .collect();
    if refused.is_empty() { Ok(()) } else { Err(ComponentError::Imports { world: kind.name(), refused }) }
}

fn describe_error(e: &wasmtime::Error) -> String {
    if let Some(trap) = e.downcast_ref::<Trap>() {
        return format!("wasm trap: {trap}");
    }
    let text = format!("{e:?}");
    bounded(text.lines().next().unwrap_or("unknown error").to_string(), MAX_MESSAGE_CHARS)
}

/// `text` cut to at most `max` characters.
fn bounded(mut text: String, max: usize) -> String {
    if let Some((cut, _)) = text.char_indices().nth(max) {
        text.truncate(cut);
    }
    text
}

/// A connector's answer for one action, with its message cut to what the host keeps.
fn bounded_delivery(result: Result<(), types::DeliveryError>) -> Result<(), types::DeliveryError> {
    result.map_err(|e| match e {
        types::DeliveryError::Permanent(m) => types::DeliveryError::Permanent(bounded(m, MAX_MESSAGE_CHARS)),
        types::DeliveryError::Retryable(m) => types::DeliveryError::Retryable(bounded(m, MAX_MESSAGE_CHARS)),
        types::DeliveryError::RateLimited(mut r) => {
            r.message = bounded(r.message, MAX_MESSAGE_CHARS);
            types::DeliveryError::RateLimited(r)
        }
    })
}

impl std::fmt::Display for types::EnrichError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            types::EnrichError::BadInput(m) => write!(f, "bad input: {m}"),
            types::EnrichError::Misconfigured(m) => write!(f, "misconfigured: {m}"),
            types::EnrichError::Failed(m) => f.write_str(m),
        }
    }
}

/// An enricher's error, with its message cut to what the host keeps.
fn bounded_enrich_error(e: types::EnrichError) -> types::EnrichError {
    match e {
        types::EnrichError::BadInput(m) => types::EnrichError::BadInput(bounded(m, MAX_MESSAGE_CHARS)),
        types::EnrichError::Misconfigured(m) => types::EnrichError::Misconfigured(bounded(m, MAX_MESSAGE_CHARS)),
        types::EnrichError::Failed(m) => types::EnrichError::Failed(bounded(m, MAX_MESSAGE_CHARS)),
    }
}

/// Runs a model's Wasm enrichers for the engine, from a thread outside the async runtime.
pub struct WasmEnrichers<'a> {
    plugins: &'a PluginHost,
    runtime: &'a tokio::runtime::Handle,
}

impl<'a> WasmEnrichers<'a> {
    pub fn new(plugins: &'a PluginHost, runtime: &'a tokio::runtime::Handle) -> Self {
        WasmEnrichers { plugins, runtime }
    }
}

use starling_core::engine::EnricherError;

impl starling_core::CustomEnrichers for WasmEnrichers<'_> {
    fn enrich(
        &mut self,
        enricher: &starling_core::model::EnricherRef,
        occasion: starling_core::engine::Occasion<'_>,
        profile: &starling_core::Profile,
    ) -> Result<Vec<starling_core::engine::Update>, EnricherError> {
        let occasion = match occasion {
            starling_core::engine::Occasion::Event(event) => types::Occasion::Event(convert::event_to_wit(event)),
            starling_core::engine::Occasion::VisitEnded(at_ms) => types::Occasion::VisitEnded(at_ms),
        };
        let view = convert::profile_to_wit(profile, enricher.reads.as_deref());
        let updates = self
            .runtime
            .block_on(self.plugins.enrich(&enricher.plugin, &occasion, &view))
            .map_err(|e| EnricherError::Call(e.to_string()))?
            .map_err(|e| EnricherError::Answered(e.to_string()))?;
        convert::updates_from_wit(updates).map_err(EnricherError::Unreadable)
    }
}

/// Turns a core module built with wit-bindgen (carrying its world in a custom section) into a
/// component.
pub fn componentize(module: &[u8]) -> Result<Vec<u8>, ComponentError> {
    wit_component::ComponentEncoder::default()
        .module(module)
        .and_then(|e| e.validate(true).encode())
        .map_err(|e| ComponentError::Componentize(format!("{e:#}")))
}
