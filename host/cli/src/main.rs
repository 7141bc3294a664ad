//! The `starling` command.

mod build;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use std::path::{Path, PathBuf};

#[derive(Parser)]
#[command(name = "starling", version, about = "Real-time customer segmentation and action engine")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server.
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
    },
    /// Work with configuration files.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Work with plugins.
    Plugin {
        #[command(subcommand)]
        command: PluginCommand,
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
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve { config, listen, database, plugins, log_json } => {
            init_logging(log_json);
            serve(&config, listen, database, plugins)
        }
        Command::Config { command: ConfigCommand::Check { file, plugins } } => check(&file, plugins),
        Command::Plugin { command: PluginCommand::Build { dirs, out } } => {
            let dirs = if dirs.is_empty() { vec![PathBuf::from("connectors")] } else { dirs };
            build::build_all(&dirs, &out)
        }
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// Reads and validates a configuration file; errors are rendered as `file:line:column: message`.
fn load_model(file: &Path) -> Result<starling_core::Model> {
    let text = std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    starling_core::parse(&text).map_err(|errors| anyhow::anyhow!("{}", errors.render(&file.display().to_string()).trim_end()))
}

/// A path from the configuration file, relative to the file's directory.
fn relative_to(config: &Path, path: &str) -> PathBuf {
    let path = Path::new(path);
    if path.is_absolute() { path.to_path_buf() } else { config.parent().unwrap_or(Path::new(".")).join(path) }
}

fn check(file: &Path, plugins: Option<PathBuf>) -> Result<()> {
    let model = load_model(file)?;
    let plugins = plugins.or_else(|| model.server.plugins.as_deref().map(|p| relative_to(file, p)));
    if let Some(dir) = plugins.filter(|d| d.is_dir()) {
        let host = starling_runtime::PluginHost::new()?;
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

fn serve(config: &Path, listen: Option<String>, database: Option<PathBuf>, plugins: Option<PathBuf>) -> Result<()> {
    let model = load_model(config)?;
    let listen = listen.unwrap_or_else(|| model.server.listen.clone());
    let database = database.unwrap_or_else(|| relative_to(config, &model.server.database));
    let plugins = plugins.or_else(|| model.server.plugins.as_deref().map(|p| relative_to(config, p)));
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async move {
        let app = starling_server::App::start(starling_server::Options { model, database: database.clone(), plugins })
            .await?;
        let listener = tokio::net::TcpListener::bind(&listen).await.with_context(|| format!("listening on {listen}"))?;
        let addr = listener.local_addr()?;
        tracing::info!(database = %database.display(), "starling listening on http://{addr}");
        println!("listening on http://{addr}");
        app.serve(listener, shutdown_signal()).await?;
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
