//! `starling plugin add|list|inspect|remove|enable|disable|verify|keygen|sign`: the plugin
//! registry lives in the server's SQLite database, components in a content-addressed directory
//! next to it. Running servers pick changes up within a second.

use crate::{DatabaseArgs, PluginCommand};
use anyhow::{Context, Result, bail};
use sha2::Digest;
use starling_runtime::signing::{self, SIGNATURE_FILE};
use starling_runtime::{HostOptions, Manifest, PluginHost};
use std::path::{Path, PathBuf};

pub(crate) fn run(db: &DatabaseArgs, command: PluginCommand) -> Result<()> {
    let now = starling_server::system_clock();
    match command {
        PluginCommand::Build { .. } | PluginCommand::New { .. } | PluginCommand::Test { .. } => {
            unreachable!("handled by main")
        }
        PluginCommand::Keygen { out } => {
            let (secret, public) = signing::generate()?;
            let secret_path = out.with_extension("secret");
            write_private(&secret_path, &secret)?;
            std::fs::write(out.with_extension("pub"), format!("{public}\n"))?;
            println!("wrote {} and {}.pub\npublic key: {public}", secret_path.display(), out.display());
        }
        PluginCommand::Sign { dir, key } => {
            let (manifest_text, _, bytes) = read_plugin_dir(&dir)?;
            let secret = std::fs::read_to_string(&key).with_context(|| format!("reading {}", key.display()))?;
            let sha = hex::encode(sha2::Sha256::digest(&bytes));
            let signature = signing::sign(&secret, &manifest_text, &sha)?;
            std::fs::write(dir.join(SIGNATURE_FILE), signature)?;
            println!("signed {}", dir.display());
        }
        PluginCommand::Add { path, trusted_keys } => {
            let dir = if path.is_file() { path.parent().unwrap_or(Path::new(".")).to_path_buf() } else { path };
            let (manifest_text, manifest, bytes) = read_plugin_dir(&dir)?;
            let sha = hex::encode(sha2::Sha256::digest(&bytes));
            let trusted = match trusted_keys.or(db.trusted_keys()?) {
                Some(file) => {
                    let text = std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
                    Some(signing::parse_trusted_keys(&text).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?)
                }
                None => None,
            };
            let signature = std::fs::read_to_string(dir.join(SIGNATURE_FILE)).ok();
            let signed_by = match (&signature, &trusted) {
                (Some(sig), trusted) => Some(
                    signing::verify(sig, &manifest_text, &sha, trusted.as_deref())
                        .map_err(|e| anyhow::anyhow!("refused {}: {e}", manifest.name))?,
                ),
                (None, Some(_)) => bail!("refused {}: unsigned, and trusted keys are configured", manifest.name),
                (None, None) => None,
            };
            let database = db.path()?;
            let blobs = starling_store::blob_dir(&database);
            std::fs::create_dir_all(&blobs)?;
            // Compiling here validates the component and fills the compiled-code cache that
            // servers share, so they start without compiling it again.
            let host = PluginHost::with_options(HostOptions {
                cache_dir: Some(blobs.join("cache")),
                ..HostOptions::default()
            })?;
            let plugin = host
                .validate(manifest.clone(), &bytes)
                .map_err(|e| anyhow::anyhow!("refused {}: {e}", manifest.name))?;
            let blob = blobs.join(format!("{sha}.wasm"));
            if !blob.is_file() {
                std::fs::write(&blob, &bytes)?;
            }
            let conn = starling_store::open(&database)?;
            let previous = starling_store::installed_plugin(&conn, &manifest.name)?;
            starling_store::install_plugin(
                &conn,
                &starling_store::InstalledPlugin {
                    name: manifest.name.clone(),
                    version: manifest.version.clone(),
                    kind: manifest.kind.name().into(),
                    world: manifest.world.clone(),
                    sha256: sha.clone(),
                    size: bytes.len() as i64,
                    manifest: manifest_text,
                    signed_by: signed_by.clone(),
                    signature,
                    enabled: true,
                    status: "installed".into(),
                    failures: 0,
                    consecutive_failures: 0,
                    installed_ms: now,
                    updated_ms: now,
                },
            )?;
            let replaced = previous.map(|p| format!(", replacing {}", p.version)).unwrap_or_default();
            let signer = signed_by.map(|k| format!(", signed by {k}")).unwrap_or_default();
            println!(
                "installed {} {} ({}, {} bytes, sha256 {}{signer}{replaced})",
                manifest.name,
                manifest.version,
                plugin.manifest.world,
                bytes.len(),
                &sha[..16]
            );
        }
        PluginCommand::List => {
            let conn = db.open()?;
            println!("{:<20} {:<10} {:<10} {:<8} {:<18} status", "name", "version", "kind", "enabled", "sha256");
            for p in starling_store::installed_plugins(&conn)? {
                println!(
                    "{:<20} {:<10} {:<10} {:<8} {:<18} {}",
                    p.name,
                    p.version,
                    p.kind,
                    p.enabled,
                    &p.sha256[..16],
                    p.status
                );
            }
        }
        PluginCommand::Inspect { name } => {
            let conn = db.open()?;
            let p = installed(&conn, &name)?;
            let manifest = Manifest::parse(&p.manifest)?;
            let bytes = std::fs::read(blob_path(db, &p)?)?;
            let host = PluginHost::with_options(HostOptions {
                cache_dir: Some(starling_store::blob_dir(&db.path()?).join("cache")),
                ..HostOptions::default()
            })?;
            let plugin = host.validate(manifest.clone(), &bytes)?;
            println!("name:      {} {}", p.name, p.version);
            println!("kind:      {}", p.kind);
            println!("world:     {}", p.world);
            println!("sha256:    {}", p.sha256);
            println!("size:      {} bytes", p.size);
            println!("signed by: {}", p.signed_by.as_deref().unwrap_or("(unsigned)"));
            println!("enabled:   {}", p.enabled);
            println!("status:    {}", p.status);
            println!("failures:  {} ({} consecutive)", p.failures, p.consecutive_failures);
            println!(
                "limits:    {} MiB memory, {} ms per call",
                manifest.limits.memory_mib, manifest.limits.timeout_ms
            );
            println!("hosts:     {}", manifest.capabilities.allowed_hosts.join(", "));
            let secrets: Vec<&str> = manifest
                .config
                .iter()
                .map(|(k, v)| if v.secret { k.as_str() } else { "" })
                .filter(|k| !k.is_empty())
                .collect();
            println!(
                "config:    {} (secret: {})",
                manifest.config.keys().cloned().collect::<Vec<_>>().join(", "),
                secrets.join(", ")
            );
            println!("imports:   {}", plugin.imports.join(", "));
            println!("exports:   {}", plugin.exports.join(", "));
        }
        PluginCommand::Remove { name } => {
            let conn = db.open()?;
            let p = installed(&conn, &name)?;
            starling_store::remove_plugin(&conn, &name)?;
            if !starling_store::installed_plugins(&conn)?.iter().any(|o| o.sha256 == p.sha256) {
                let _ = std::fs::remove_file(blob_path(db, &p)?);
            }
            println!("removed {name}");
        }
        PluginCommand::Enable { name } => {
            let conn = db.open()?;
            if !starling_store::set_plugin_enabled(&conn, &name, true, "enabled", now)? {
                bail!("no plugin named `{name}` is installed");
            }
            println!("enabled {name}");
        }
        PluginCommand::Disable { name } => {
            let conn = db.open()?;
            if !starling_store::set_plugin_enabled(&conn, &name, false, "disabled by an operator", now)? {
                bail!("no plugin named `{name}` is installed");
            }
            println!("disabled {name}");
        }
        PluginCommand::Verify { name } => {
            let conn = db.open()?;
            let plugins = match name {
                Some(n) => vec![installed(&conn, &n)?],
                None => starling_store::installed_plugins(&conn)?,
            };
            let host = PluginHost::new()?;
            let mut bad = 0;
            for p in plugins {
                match verify_one(db, &host, &p) {
                    Ok(()) => println!("{}: ok", p.name),
                    Err(e) => {
                        bad += 1;
                        println!("{}: FAILED: {e}", p.name);
                    }
                }
            }
            if bad > 0 {
                bail!("{bad} plugin(s) failed verification");
            }
        }
    }
    Ok(())
}

fn verify_one(db: &DatabaseArgs, host: &PluginHost, p: &starling_store::InstalledPlugin) -> Result<()> {
    let bytes = std::fs::read(blob_path(db, p)?).context("reading the stored component")?;
    let sha = hex::encode(sha2::Sha256::digest(&bytes));
    if sha != p.sha256 {
        bail!("stored component has sha256 {sha}, installed as {}", p.sha256);
    }
    let trusted = match db.trusted_keys()? {
        Some(file) => Some(signing::parse_trusted_keys(&std::fs::read_to_string(&file)?)?),
        None => None,
    };
    match (&p.signature, &trusted) {
        (Some(sig), trusted) => {
            signing::verify(sig, &p.manifest, &sha, trusted.as_deref())?;
        }
        (None, Some(_)) => bail!("unsigned, and trusted keys are configured"),
        (None, None) => {}
    }
    let manifest = Manifest::parse(&p.manifest)?;
    host.validate(manifest, &bytes)?;
    Ok(())
}

fn installed(conn: &rusqlite::Connection, name: &str) -> Result<starling_store::InstalledPlugin> {
    starling_store::installed_plugin(conn, name)?.with_context(|| format!("no plugin named `{name}` is installed"))
}

fn blob_path(db: &DatabaseArgs, p: &starling_store::InstalledPlugin) -> Result<PathBuf> {
    Ok(starling_store::blob_dir(&db.path()?).join(format!("{}.wasm", p.sha256)))
}

/// The manifest text, parsed manifest and component bytes of a built plugin directory.
fn read_plugin_dir(dir: &Path) -> Result<(String, Manifest, Vec<u8>)> {
    let manifest_path = dir.join("plugin.toml");
    let text =
        std::fs::read_to_string(&manifest_path).with_context(|| format!("reading {}", manifest_path.display()))?;
    let manifest = Manifest::parse(&text).map_err(|e| anyhow::anyhow!("{}:{e}", manifest_path.display()))?;
    let component = dir.join(&manifest.component);
    let bytes = std::fs::read(&component).with_context(|| format!("reading {}", component.display()))?;
    Ok((text, manifest, bytes))
}

fn write_private(path: &Path, secret: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    writeln!(file, "{secret}")?;
    Ok(())
}
