//! The `starling` command.

mod backup;
mod build;
mod client;
mod cluster;
mod import;
mod integrity;
mod loadgen;
mod plugin_test;
mod reconfigure;
mod registry;
mod scaffold;
mod trace;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use starling_store::OutboxStatus;
use std::path::{Path, PathBuf};

#[derive(Parser)]
#[command(name = "starling", version, about = "Real-time customer segmentation and action engine")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server. An option given twice takes its last value.
    #[command(args_override_self = true)]
    Serve {
        /// The configuration file.
        #[arg(long, short)]
        config: PathBuf,
        /// Address to listen on (overrides `server.listen`).
        #[arg(long)]
        listen: Option<String>,
        /// SQLite database file (overrides `server.database`).
        #[arg(long)]
        database: Option<PathBuf>,
        /// Directory of built plugins (overrides `server.plugins`).
        #[arg(long)]
        plugins: Option<PathBuf>,
        /// Log as JSON lines.
        #[arg(long)]
        log_json: bool,
        /// Let `POST /v1/test/clock` move the server's clock forward, to test visit ends and
        /// time-relative audiences without waiting. Never in production.
        #[arg(long)]
        test_clock: bool,
    },
    /// Work with configuration files.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Build plugins, and install and manage them in a server's registry.
    Plugin {
        #[command(flatten)]
        db: DatabaseArgs,
        #[command(subcommand)]
        command: PluginCommand,
    },
    /// Look up profiles and their identity graph on a running server; split a wrongly stitched
    /// id; delete a person.
    Profile {
        #[command(flatten)]
        server: client::ServerArgs,
        #[command(subcommand)]
        command: ProfileCommand,
    },
    /// Load an offline file (CSV or JSON lines) into omnichannel attributes on a running server.
    Import(import::Options),
    /// Follow a visitor's events live through every step, on a running server.
    Trace(trace::Options),
    /// Post a generated event stream to a running server; report throughput and latency.
    Loadgen(loadgen::Options),
    /// Inspect the action outbox and the dead letters; replay dead letters.
    Actions {
        #[command(flatten)]
        db: DatabaseArgs,
        #[command(subcommand)]
        command: ActionsCommand,
    },
    /// Work with a running server's audiences.
    Audience {
        #[command(subcommand)]
        command: AudienceCommand,
    },
    /// See a running cluster as one of its nodes sees it.
    Cluster {
        #[command(subcommand)]
        command: ClusterCommand,
    },
    /// Replay the events recorded in a window through the running configuration and through
    /// FILE, on a running server, delivering nothing; compare audience sizes and actions fired.
    Backtest {
        file: PathBuf,
        /// How far back to replay (`7d`, `12h`).
        #[arg(long, default_value = "7d")]
        since: String,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        server: client::ServerArgs,
    },
    /// Save a consistent copy of a running server's database (ingestion goes on meanwhile).
    Backup {
        /// The file to write (must not exist).
        file: PathBuf,
        #[command(flatten)]
        server: client::ServerArgs,
    },
    /// Put a backup in place as the database a configuration names (or `--database`), for a
    /// server to start from. The server on that database must be stopped.
    Restore {
        /// The backup file.
        file: PathBuf,
        #[command(flatten)]
        db: DatabaseArgs,
        /// Replace an existing database and its event log.
        #[arg(long)]
        force: bool,
    },
    /// Check a stopped server's files: SQLite's integrity check over the database and every
    /// event log record's checksum. Fails when it finds damage.
    Check {
        #[command(flatten)]
        db: DatabaseArgs,
    },
}

#[derive(Subcommand)]
enum ProfileCommand {
    /// The profile an id belongs to.
    Show { id: String },
    /// The ids linked to the profile an id belongs to, and how each was linked.
    Identity { id: String },
    /// Everything held about the person an id belongs to (profile, ids and their history,
    /// events, memberships, actions with their data), to answer an access request.
    Export { id: String },
    /// Split `id` out of the profile it was stitched into; both profiles are rebuilt from their
    /// events and the resulting audience changes fire.
    Unstitch { id: String },
    /// Delete the person an id belongs to everywhere (profile, ids, events, memberships,
    /// actions); `deleted` actions fire, an audit record without personal data stays.
    Delete { id: String },
}

/// Which database to open: the one a configuration file names, or a file given directly.
#[derive(clap::Args)]
struct DatabaseArgs {
    /// The configuration file whose `server.database` to open.
    #[arg(long, short, global = true, conflicts_with = "database")]
    config: Option<PathBuf>,
    /// The SQLite database file.
    #[arg(long, global = true)]
    database: Option<PathBuf>,
}

impl DatabaseArgs {
    /// The database file's path.
    fn path(&self) -> Result<PathBuf> {
        Ok(match (&self.config, &self.database) {
            (_, Some(db)) => db.clone(),
            (Some(config), None) => relative_to(config, &load_model(config)?.server.database),
            (None, None) => bail!("give --config FILE or --database FILE"),
        })
    }

    /// Opens an existing database.
    fn open(&self) -> Result<rusqlite::Connection> {
        let path = self.path()?;
        if !path.is_file() {
            bail!("no database at {}", path.display());
        }
        Ok(starling_store::open(&path)?)
    }

    /// `server.trusted_keys` of the configuration file, resolved.
    fn trusted_keys(&self) -> Result<Option<PathBuf>> {
        let Some(config) = &self.config else { return Ok(None) };
        Ok(load_model(config)?.server.trusted_keys.map(|k| relative_to(config, &k)))
    }
}

#[derive(Subcommand)]
enum ActionsCommand {
    /// List outbox rows, newest first.
    List {
        /// Only rows with this status: pending, delivered, failed or cancelled.
        #[arg(long)]
        status: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// List dead letters: actions that exhausted their retries, with their last error.
    DeadLetters {
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// Move dead letters back to the outbox; a running server delivers them again.
    Replay {
        /// The dead letter's id.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        id: Option<i64>,
        /// Replay every dead letter.
        #[arg(long)]
        all: bool,
    },
}

#[derive(Subcommand)]
enum AudienceCommand {
    /// The exact size of an audience rule over the stored profiles, its overlap with each
    /// audience and sample profiles; nothing changes.
    Preview {
        /// The rule, as written in the configuration file (`{ attribute = "a", op = ">", value = 1 }`)
        /// or as JSON.
        #[arg(long)]
        rule: String,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        server: client::ServerArgs,
    },
}

#[derive(Subcommand)]
enum ClusterCommand {
    /// The nodes, who owns the partitions, the configuration each node runs, and what waits
    /// to be applied, as the node at `--server` sees them.
    Status {
        /// Print the node's answer (`GET /v1/cluster`) as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        server: client::ServerArgs,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Check a configuration file and report every error with its line and column.
    Check {
        file: PathBuf,
        /// Directory of built plugins to check references against (default: `server.plugins`).
        #[arg(long)]
        plugins: Option<PathBuf>,
    },
    /// Check FILE and make it the running server's configuration, without a restart; follow
    /// the backfill of added and changed audiences. On any error nothing changes.
    Apply {
        file: PathBuf,
        /// Do not wait for the backfill.
        #[arg(long)]
        no_wait: bool,
        #[command(flatten)]
        server: client::ServerArgs,
    },
    /// Print what replacing configuration OLD with NEW does to stored data, audiences and
    /// actions.
    Diff { old: PathBuf, new: PathBuf },
}

#[derive(Subcommand)]
enum PluginCommand {
    /// Build plugin sources into components with their manifests.
    Build {
        /// Plugin source directories, or directories of them (default: `connectors`).
        dirs: Vec<PathBuf>,
        /// Where built plugins go, one subdirectory each.
        #[arg(long, default_value = "target/plugins")]
        out: PathBuf,
    },
    /// Create a plugin to start from: sources, manifest and test cases, ready to build and test.
    New {
        name: String,
        #[arg(long, value_enum)]
        lang: scaffold::Lang,
        #[arg(long, value_enum)]
        kind: scaffold::PluginKind,
        /// The directory to create it in.
        #[arg(long, default_value = "connectors")]
        dir: PathBuf,
    },
    /// Build a plugin and run the cases in its `tests.toml` in the sandbox the server uses.
    Test { dir: PathBuf },
    /// Install a built plugin (a directory with `plugin.toml`, the component, and optionally
    /// `plugin.sig`): validates it, stores it by hash and precompiles it.
    Add {
        path: PathBuf,
        /// Trusted public keys (default: `server.trusted_keys`); unsigned plugins are refused.
        #[arg(long)]
        trusted_keys: Option<PathBuf>,
    },
    /// List installed plugins.
    List,
    /// Show an installed plugin: world, imports, exports, limits, size, status, failures.
    Inspect { name: String },
    /// Uninstall a plugin.
    Remove { name: String },
    /// Enable a plugin (also after the host disabled it for failing).
    Enable { name: String },
    /// Disable a plugin: running servers stop calling it.
    Disable { name: String },
    /// Check installed plugins: stored component hash, signature and world.
    Verify { name: Option<String> },
    /// Create an ed25519 key pair: PREFIX.secret and PREFIX.pub.
    Keygen {
        #[arg(long)]
        out: PathBuf,
    },
    /// Sign a built plugin directory with a secret key, writing its `plugin.sig`.
    Sign {
        dir: PathBuf,
        #[arg(long)]
        key: PathBuf,
    },
}

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve { config, listen, database, plugins, log_json, test_clock } => {
            starling_server::logging::init(log_json);
            serve(&config, ServeOverrides { listen, database, plugins, test_clock })
        }
        Command::Config { command: ConfigCommand::Check { file, plugins } } => check(&file, plugins),
        Command::Config { command: ConfigCommand::Apply { file, no_wait, server } } => {
            reconfigure::apply(&server, &file, no_wait)
        }
        Command::Config { command: ConfigCommand::Diff { old, new } } => reconfigure::diff(&old, &new),
        Command::Audience { command: AudienceCommand::Preview { rule, json, server } } => {
            reconfigure::preview(&server, &rule, json)
        }
        Command::Cluster { command: ClusterCommand::Status { json, server } } => cluster::status(&server, json),
        Command::Backtest { file, since, json, server } => reconfigure::backtest(&server, &file, &since, json),
        Command::Actions { db, command } => actions(&db, command),
        Command::Check { db } => db.path().and_then(|path| integrity::run(&path)),
        Command::Backup { file, server } => backup::backup(&server, &file),
        Command::Restore { file, db, force } => db.path().and_then(|path| backup::restore(&file, &path, force)),
        Command::Profile { server, command } => profile(&server, command),
        Command::Loadgen(options) => loadgen::run(options),
        Command::Import(options) => import::run(options),
        Command::Trace(options) => trace::run(options),
        Command::Plugin { command: PluginCommand::Build { dirs, out }, .. } => {
            let dirs = if dirs.is_empty() { vec![PathBuf::from("connectors")] } else { dirs };
            build::build_all(&dirs, &out)
        }
        Command::Plugin { command: PluginCommand::New { name, lang, kind, dir }, .. } => {
            scaffold::create(&name, lang, kind, &dir).map(|created| {
                println!("created {}", created.display());
                println!("try it: starling plugin test {}", created.display());
            })
        }
        Command::Plugin { command: PluginCommand::Test { dir }, .. } => plugin_test::run(&dir),
        Command::Plugin { db, command } => registry::run(&db, command),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn actions(db: &DatabaseArgs, command: ActionsCommand) -> Result<()> {
    let mut conn = db.open()?;
    match command {
        ActionsCommand::List { status, limit } => {
            let status = match status {
                None => None,
                Some(s) => Some(OutboxStatus::parse(&s).ok_or_else(|| {
                    let names: Vec<&str> = OutboxStatus::ALL.iter().map(|s| s.name()).collect();
                    anyhow::anyhow!("--status: `{s}` is not one of {}", names.join(", "))
                })?),
            };
            let rows = starling_store::list_actions(&conn, status, limit)?;
            println!(
                "{:>8}  {:<10} {:<20} {:<8} {:<24} {:>8}  last error",
                "id", "status", "action", "trigger", "profile", "attempts"
            );
            for r in rows {
                println!(
                    "{:>8}  {:<10} {:<20} {:<8} {:<24} {:>8}  {}",
                    r.id,
                    r.status,
                    r.action,
                    r.trigger,
                    r.profile_id,
                    r.attempts,
                    r.last_error.unwrap_or_default()
                );
            }
        }
        ActionsCommand::DeadLetters { limit } => {
            let rows = starling_store::dead_letters(&conn, limit)?;
            println!("{:>8}  {:<20} {:<8} {:<24} {:>8}  last error", "id", "action", "trigger", "profile", "attempts");
            for r in rows {
                println!(
                    "{:>8}  {:<20} {:<8} {:<24} {:>8}  {}",
                    r.id,
                    r.action,
                    r.trigger,
                    r.profile_id,
                    r.attempts,
                    r.last_error.unwrap_or_default()
                );
            }
        }
        ActionsCommand::Replay { id, all: _ } => {
            let moved = starling_store::replay_dead_letters(&mut conn, id, starling_server::system_clock())?;
            if moved == 0 {
                bail!("no dead letter{} to replay", id.map(|i| format!(" with id {i}")).unwrap_or_default());
            }
            println!("replayed {moved} dead letter(s)");
        }
    }
    Ok(())
}

/// Reads and validates a configuration file; errors are rendered as `file:line:column: message`.
fn load_model(file: &Path) -> Result<starling_core::Model> {
    let text = std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    starling_core::parse(&text)
        .map_err(|errors| anyhow::anyhow!("{}", errors.render(&file.display().to_string()).trim_end()))
}

/// A path from the configuration file, relative to the file's directory.
/// The public keys of a trusted-keys file.
fn read_trusted_keys(file: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    starling_runtime::signing::parse_trusted_keys(&text).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))
}

fn relative_to(config: &Path, path: &str) -> PathBuf {
    let path = Path::new(path);
    if path.is_absolute() { path.to_path_buf() } else { config.parent().unwrap_or(Path::new(".")).join(path) }
}

fn check(file: &Path, plugins: Option<PathBuf>) -> Result<()> {
    let model = load_model(file)?;
    let plugins = plugins.or_else(|| model.server.plugins.as_deref().map(|p| relative_to(file, p)));
    if let Some(dir) = plugins.filter(|d| d.is_dir()) {
        // Share the server's compiled-code cache: large components compile once.
        let cache_dir = Some(starling_store::blob_dir(&relative_to(file, &model.server.database)).join("cache"));
        let host = starling_runtime::PluginHost::with_options(starling_runtime::HostOptions {
            cache_dir,
            ..Default::default()
        })?;
        host.load_dir(&dir, &model.plugin_config)?;
        let problems = starling_server::check_plugins(&model, &host);
        if !problems.is_empty() {
            let name = file.display().to_string();
            bail!("{}", problems.iter().map(|d| format!("{name}:{d}")).collect::<Vec<_>>().join("\n"));
        }
    }
    println!(
        "{}: ok ({} attributes, {} enrichments, {} enrichers, {} audiences, {} actions)",
        file.display(),
        model.attributes.len(),
        model.enrichments.len(),
        model.enrichers.len(),
        model.audiences.len(),
        model.actions.len()
    );
    Ok(())
}

/// Command-line settings that take precedence over the configuration file.
struct ServeOverrides {
    listen: Option<String>,
    database: Option<PathBuf>,
    plugins: Option<PathBuf>,
    test_clock: bool,
}

fn serve(config: &Path, overrides: ServeOverrides) -> Result<()> {
    let model = load_model(config)?;
    let listen = overrides.listen.unwrap_or_else(|| model.server.listen.clone());
    let database = overrides.database.unwrap_or_else(|| relative_to(config, &model.server.database));
    let plugins = overrides.plugins.or_else(|| model.server.plugins.as_deref().map(|p| relative_to(config, p)));
    let test_clock = overrides.test_clock;
    let tls = match (&model.server.tls_cert, &model.server.tls_key) {
        (Some(cert), Some(key)) => Some(
            starling_server::tls::server_config(&relative_to(config, cert), &relative_to(config, key))
                .map_err(|e| anyhow::anyhow!("{}: server.{e}", config.display()))?,
        ),
        (None, None) => None,
        _ => bail!("{}: server.tls_cert and server.tls_key go together", config.display()),
    };
    let admin_token = std::env::var("STARLING_ADMIN_TOKEN").ok().filter(|t| !t.is_empty());
    let trusted_keys = match &model.server.trusted_keys {
        Some(file) => Some(read_trusted_keys(&relative_to(config, file))?),
        None => None,
    };
    let runtime = tokio::runtime::Runtime::new()?;
    if model.cluster.is_some() && tls.is_some() {
        bail!("{}: a cluster node serves plain HTTP (put TLS in front of the nodes)", config.display());
    }
    let options = starling_server::Options {
        model,
        database: database.clone(),
        plugins,
        test_clock,
        admin_token,
        event_log: None,
        trusted_keys,
        config_path: Some(config.to_path_buf()),
        outcomes: None,
        spread: None,
    };
    runtime.block_on(async move {
        if options.model.cluster.is_some() {
            let listener =
                tokio::net::TcpListener::bind(&listen).await.with_context(|| format!("listening on {listen}"))?;
            let addr = listener.local_addr()?;
            tracing::info!(database = %database.display(), "starling cluster node listening on http://{addr}");
            println!("listening on http://{addr}");
            starling_server::node::serve(options, listener, shutdown_signal()).await?;
            tracing::info!("stopped");
            return Ok(());
        }
        let app = starling_server::App::start(options).await?;
        let listener =
            tokio::net::TcpListener::bind(&listen).await.with_context(|| format!("listening on {listen}"))?;
        let addr = listener.local_addr()?;
        let scheme = if tls.is_some() { "https" } else { "http" };
        tracing::info!(database = %database.display(), "starling listening on {scheme}://{addr}");
        println!("listening on {scheme}://{addr}");
        match tls {
            Some(tls) => {
                app.serve_tls(starling_server::tls::TlsListener::new(listener, tls)?, shutdown_signal()).await?
            }
            None => app.serve(listener, shutdown_signal()).await?,
        }
        tracing::info!("stopped");
        Ok(())
    })
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = ctrl_c => {}
        _ = term.recv() => {}
    }
}

fn profile(server: &client::ServerArgs, command: ProfileCommand) -> Result<()> {
    let (method, id, tail) = match &command {
        ProfileCommand::Show { id } => (reqwest::Method::GET, id, None),
        ProfileCommand::Identity { id } => (reqwest::Method::GET, id, Some("identity")),
        ProfileCommand::Export { id } => (reqwest::Method::GET, id, Some("export")),
        ProfileCommand::Unstitch { id } => (reqwest::Method::POST, id, Some("unstitch")),
        ProfileCommand::Delete { id } => (reqwest::Method::DELETE, id, None),
    };
    let client = client::Client::new(server)?;
    let url = client.url(["v1", "profiles", id.as_str()].into_iter().chain(tail));
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let body = runtime.block_on(client.json(client.request(method, url)))?;
    println!("{}", serde_json::to_string_pretty(&body)?);
    Ok(())
}
