//! `starling plugin build`: plugin sources to components, with their manifests.
//!
//! Rust plugins (a `Cargo.toml`): built with rustup's `wasm32-unknown-unknown` target when it is
//! installed, otherwise with Debian's Rust (`rustc-web`) and a rebuilt standard library and
//! `wasm-ld-19`, installing those packages when missing; the core module is turned into a
//! component in-process (wit-component).
//!
//! Python plugins (an `app.py`): built with componentize-py (installed with pip when missing),
//! with WASI stubbed out so the component imports only what its world grants.
//!
//! JavaScript plugins (an `app.js`): built with componentize-js (installed with npm under
//! `target/guest/js` when missing), with every WASI feature disabled except, for connectors,
//! what `fetch` needs.
//!
//! C plugins (a `plugin.c`, and any other `.c` files beside it): bindings generated in-process
//! from `wit/` (wit-bindgen's C generator), compiled and linked by Debian's `clang-19` against
//! `wasi-libc` (installed when missing), then componentized like a Rust module.

use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::process::Command;

const TARGET: &str = "wasm32-unknown-unknown";
const DEBIAN_PACKAGES: &[&str] =
    &["rustc-web", "cargo-web", "rust-web-src", "libstd-rust-web-dev", "wasi-libc", "clang-19", "lld-19"];
const DEBIAN_C_PACKAGES: &[&str] = &["wasi-libc", "clang-19", "lld-19", "libclang-rt-19-dev-wasm32"];

enum Toolchain {
    Rustup,
    Debian,
}

pub(crate) fn build_all(dirs: &[PathBuf], out: &Path) -> Result<()> {
    let mut sources = Vec::new();
    for dir in dirs {
        if dir.join("plugin.toml").is_file() {
            sources.push(dir.clone());
        } else {
            let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
                .with_context(|| format!("reading {}", dir.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.join("plugin.toml").is_file())
                .collect();
            found.sort();
            sources.extend(found);
        }
    }
    if sources.is_empty() {
        bail!(
            "no plugin sources (directories with a plugin.toml) in {}",
            dirs.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(", ")
        );
    }
    let target_dir = std::path::absolute(out.parent().unwrap_or(Path::new(".")).join("guest"))?;
    let mut rust = None;
    for source in sources {
        let built = if source.join("Cargo.toml").is_file() {
            if rust.is_none() {
                rust = Some(toolchain()?);
            }
            build_rust(&source, out, &target_dir, rust.as_ref().expect("set above"))
        } else if source.join("app.py").is_file() {
            build_python(&source, out)
        } else if source.join("app.js").is_file() {
            build_js(&source, out, &target_dir)
        } else if source.join("plugin.c").is_file() {
            build_c(&source, out, &target_dir)
        } else {
            Err(anyhow::anyhow!("no Cargo.toml, app.py, app.js or plugin.c: unknown plugin language"))
        };
        let built = built.with_context(|| format!("building {}", source.display()))?;
        println!("built {}", built.display());
    }
    Ok(())
}

const COMPONENTIZE_PY: &str = "componentize-py==0.25.1";
const COMPONENTIZE_JS: &str = "@bytecodealliance/componentize-js@0.23.0";

/// A plugin built by a language toolchain from sources with extension `ext`.
struct ToolchainBuild {
    manifest_text: String,
    manifest: starling_runtime::Manifest,
    dest: PathBuf,
    component_path: PathBuf,
    /// The WIT the toolchain builds against (see [`guest_wit`]), in `_wit_dir`.
    wit: PathBuf,
    _wit_dir: tempfile::TempDir,
    /// The component is newer than every source and WIT file.
    fresh: bool,
}

impl ToolchainBuild {
    fn prepare(source: &Path, out: &Path, ext: &str) -> Result<ToolchainBuild> {
        let manifest_text = std::fs::read_to_string(source.join("plugin.toml"))?;
        let manifest =
            starling_runtime::Manifest::parse(&manifest_text).map_err(|e| anyhow::anyhow!("plugin.toml:{e}"))?;
        let dest = out.join(&manifest.name);
        std::fs::create_dir_all(&dest)?;
        let component_path = dest.join(&manifest.component);
        let repository_wit = wit_dir()?;
        let newest_input = newest_mtime(source, ext)?.max(newest_mtime(&repository_wit, "wit")?);
        let fresh =
            std::fs::metadata(&component_path).and_then(|m| m.modified()).is_ok_and(|built| built >= newest_input);
        let wit_dir = tempfile::tempdir()?;
        let wit = guest_wit(&repository_wit, manifest.api(), wit_dir.path())?;
        Ok(ToolchainBuild { manifest_text, manifest, dest, component_path, wit, _wit_dir: wit_dir, fresh })
    }

    fn finish(self, source: &Path) -> Result<PathBuf> {
        write_manifest(source, &self.manifest_text, &self.dest, &self.component_path)?;
        Ok(self.component_path)
    }
}

fn build_js(source: &Path, out: &Path, target_dir: &Path) -> Result<PathBuf> {
    let build = ToolchainBuild::prepare(source, out, "js")?;
    let (manifest, component_path, wit) = (&build.manifest, &build.component_path, &build.wit);
    if !build.fresh {
        let tools = target_dir.join("js");
        let tool = tools.join("node_modules/.bin/componentize-js");
        if !tool.is_file() {
            eprintln!("installing {COMPONENTIZE_JS} into {}", tools.display());
            std::fs::create_dir_all(&tools)?;
            let ok = Command::new("npm")
                .args(["install", "--silent", "--no-audit", "--no-fund", "--prefix"])
                .arg(&tools)
                .arg(COMPONENTIZE_JS)
                .status()
                .context("running npm (Node.js is needed to build JavaScript plugins)")?
                .success();
            if !ok {
                bail!("could not install {COMPONENTIZE_JS} with npm");
            }
        }
        let status = Command::new(&tool)
            .arg(source.join("app.js"))
            .arg("--wit")
            .arg(wit)
            .args(["-n", &manifest.world, "-d"])
            .args(js_disabled_features(manifest.kind))
            .arg("-o")
            .arg(component_path)
            .status()
            .context("running componentize-js")?;
        if !status.success() {
            bail!("componentize-js failed ({status})");
        }
    }
    build.finish(source)
}

/// StarlingMonkey features turned off: an enricher gets none, a connector keeps `fetch` (over
/// wasi:http, with the clocks and randomness it uses) and loses only stdio and the incoming
/// HTTP handler.
fn js_disabled_features(kind: starling_runtime::Kind) -> &'static [&'static str] {
    match kind {
        starling_runtime::Kind::Enricher => &["stdio", "random", "clocks", "http", "fetch-event"],
        starling_runtime::Kind::Connector => &["stdio", "fetch-event"],
    }
}

fn build_python(source: &Path, out: &Path) -> Result<PathBuf> {
    let build = ToolchainBuild::prepare(source, out, "py")?;
    let (manifest, component_path, wit) = (&build.manifest, &build.component_path, &build.wit);
    if !build.fresh {
        let installed = Command::new("componentize-py").arg("--version").output().is_ok_and(|o| o.status.success());
        if !installed {
            eprintln!("installing {COMPONENTIZE_PY}");
            let ok = Command::new("python3").args(["-m", "pip", "install", "-q", COMPONENTIZE_PY]).status()?.success();
            if !ok {
                bail!("could not install {COMPONENTIZE_PY} with pip");
            }
        }
        // Enrichers import nothing of WASI (all of it is stubbed); connectors keep it: the host
        // grants them nothing but wasi:http.
        let stub_wasi: &[&str] = if manifest.kind == starling_runtime::Kind::Enricher { &["--stub-wasi"] } else { &[] };
        let status = Command::new("componentize-py")
            .arg("-d")
            .arg(wit)
            .args(["-w", &manifest.world, "componentize"])
            .args(stub_wasi)
            .arg("-p")
            .arg(source)
            .arg("app")
            .arg("-o")
            .arg(component_path)
            .status()
            .context("running componentize-py")?;
        if !status.success() {
            bail!("componentize-py failed ({status})");
        }
    }
    build.finish(source)
}

fn build_c(source: &Path, out: &Path, target_dir: &Path) -> Result<PathBuf> {
    let build = ToolchainBuild::prepare(source, out, "c")?;
    if !build.fresh {
        install_debian_packages(DEBIAN_C_PACKAGES)?;
        let generated = target_dir.join("c").join(&build.manifest.name);
        std::fs::create_dir_all(&generated)?;
        let objects = c_bindings(&build.wit, &build.manifest.world, &generated)?;
        let mut sources: Vec<PathBuf> = std::fs::read_dir(source)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "c"))
            .collect();
        sources.sort();
        let module = generated.join("module.wasm");
        let status = Command::new("clang-19")
            .args(["--target=wasm32-wasi", "-mexec-model=reactor", "-O2", "-Wall", "-Wl,--strip-debug", "-I"])
            .arg(&generated)
            .args(&sources)
            .args(&objects)
            .arg("-o")
            .arg(&module)
            .status()
            .context("running clang-19")?;
        if !status.success() {
            bail!("clang-19 failed ({status})");
        }
        let component = starling_runtime::componentize(&std::fs::read(&module)?)?;
        std::fs::write(&build.component_path, component)?;
    }
    build.finish(source)
}

/// Writes wit-bindgen's C bindings for `world` into `dir`: the header and source to compile,
/// and the object carrying the world's type information; returns the files to compile with.
fn c_bindings(wit: &Path, world: &str, dir: &Path) -> Result<Vec<PathBuf>> {
    let mut resolve = wit_parser::Resolve::default();
    let (package, _) = resolve.push_dir(wit).with_context(|| format!("reading {}", wit.display()))?;
    let world = resolve.select_world(&[package], Some(world))?;
    let mut files = wit_bindgen_core::Files::default();
    wit_bindgen_c::Opts::default().build().generate(&mut resolve, world, &mut files)?;
    let mut compile = Vec::new();
    for (name, bytes) in files.iter() {
        let path = dir.join(name);
        std::fs::write(&path, bytes)?;
        if !name.ends_with(".h") {
            compile.push(path);
        }
    }
    Ok(compile)
}

/// The WIT a language toolchain builds against, written into `dir`: the Starling package version
/// the manifest targets as the root, with the WASI packages, and without the other Starling
/// version, whose presence would make generated names spell out versions
/// (`starling_plugin_0_2_0_types_...` in C).
fn guest_wit(wit: &Path, api: starling_runtime::Api, dir: &Path) -> Result<PathBuf> {
    let root = match api {
        starling_runtime::Api::V0_2 => wit.join("plugin.wit"),
        starling_runtime::Api::V0_1 => wit.join("deps/starling-plugin-0.1.0/plugin.wit"),
    };
    std::fs::copy(&root, dir.join("plugin.wit")).with_context(|| format!("reading {}", root.display()))?;
    for dep in std::fs::read_dir(wit.join("deps"))? {
        let dep = dep?.path();
        let name = dep.file_name().expect("a directory entry has a name");
        if name.to_string_lossy().starts_with("starling-plugin-") {
            continue;
        }
        let to = dir.join("deps").join(name);
        std::fs::create_dir_all(&to)?;
        for file in std::fs::read_dir(&dep)? {
            let file = file?.path();
            std::fs::copy(&file, to.join(file.file_name().expect("a file has a name")))?;
        }
    }
    Ok(dir.to_path_buf())
}

/// The repository's `wit/` directory: found from the working directory upwards.
fn wit_dir() -> Result<PathBuf> {
    let cwd = std::env::current_dir()?;
    cwd.ancestors()
        .map(|d| d.join("wit"))
        .find(|d| d.join("plugin.wit").is_file())
        .context("no wit/plugin.wit in this directory or above it")
}

fn newest_mtime(dir: &Path, ext: &str) -> Result<std::time::SystemTime> {
    let mut newest = std::time::SystemTime::UNIX_EPOCH;
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            newest = newest.max(newest_mtime(&path, ext)?);
        } else if path.extension().is_some_and(|e| e == ext) {
            newest = newest.max(std::fs::metadata(&path)?.modified()?);
        }
    }
    Ok(newest)
}

/// Writes the built manifest, with the component's sha256.
fn write_manifest(source: &Path, manifest_text: &str, dest: &Path, component_path: &Path) -> Result<()> {
    let component = std::fs::read(component_path)?;
    let sha256 = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&component));
    let mut built: toml::Table = toml::from_str(manifest_text)?;
    built.insert("sha256".into(), toml::Value::String(sha256));
    let text = format!(
        "# Built by `starling plugin build` from {}; do not edit.\n{}",
        source.display(),
        toml::to_string(&built)?
    );
    std::fs::write(dest.join("plugin.toml"), text)?;
    Ok(())
}

fn toolchain() -> Result<Toolchain> {
    let rustup_has_target = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).lines().any(|l| l.trim() == TARGET))
        .unwrap_or(false);
    if rustup_has_target {
        return Ok(Toolchain::Rustup);
    }
    install_debian_packages(DEBIAN_PACKAGES)?;
    Ok(Toolchain::Debian)
}

/// Installs the Debian packages of `packages` that are missing (apt, as root or through sudo).
fn install_debian_packages(packages: &[&str]) -> Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| {
            !Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", p])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
                .unwrap_or(false)
        })
        .collect();
    if !missing.is_empty() {
        eprintln!("installing the wasm guest toolchain from Debian: {}", missing.join(" "));
        let root = Command::new("id").arg("-u").output().map(|o| o.stdout.starts_with(b"0")).unwrap_or(false);
        let apt = |args: &[&str]| -> Result<bool> {
            let mut cmd = if root {
                Command::new("apt-get")
            } else {
                let mut c = Command::new("sudo");
                c.arg("apt-get");
                c
            };
            Ok(cmd.args(args).env("DEBIAN_FRONTEND", "noninteractive").status()?.success())
        };
        let mut install = vec!["install", "-y", "-q"];
        install.extend(&missing);
        let installed = apt(&install)? || (apt(&["update", "-q"])? && apt(&install)?);
        if !installed {
            bail!("could not install {}; install them and try again", missing.join(" "));
        }
    }
    Ok(())
}

fn build_rust(source: &Path, out: &Path, target_dir: &Path, toolchain: &Toolchain) -> Result<PathBuf> {
    let manifest_text = std::fs::read_to_string(source.join("plugin.toml"))?;
    let manifest = starling_runtime::Manifest::parse(&manifest_text).map_err(|e| anyhow::anyhow!("plugin.toml:{e}"))?;
    let cargo_toml: toml::Table = toml::from_str(&std::fs::read_to_string(source.join("Cargo.toml"))?)?;
    let crate_name = cargo_toml
        .get("package")
        .and_then(|p| p.get("name"))
        .and_then(|n| n.as_str())
        .context("Cargo.toml has no package name")?
        .replace('-', "_");

    let mut cargo = match toolchain {
        Toolchain::Rustup => Command::new("cargo"),
        Toolchain::Debian => {
            let mut c = Command::new("/usr/bin/cargo");
            // Debian's rustc must come first on PATH, before rustup's shims.
            let path = std::env::var("PATH").unwrap_or_default();
            c.env("PATH", format!("/usr/bin:{path}"))
                .env("RUSTC", "/usr/bin/rustc")
                .env("RUSTC_BOOTSTRAP", "1")
                .env("CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_LINKER", "wasm-ld-19")
                .env_remove("RUSTUP_TOOLCHAIN")
                .env_remove("RUSTC_WRAPPER");
            c
        }
    };
    cargo.current_dir(source).args(["build", "--release", "--target", TARGET]).env("CARGO_TARGET_DIR", target_dir);
    if matches!(toolchain, Toolchain::Debian) {
        cargo.arg("-Zbuild-std=std,panic_abort");
    }
    let status = cargo.status().context("running cargo")?;
    if !status.success() {
        bail!("cargo build failed ({status})");
    }

    let module_path = target_dir.join(TARGET).join("release").join(format!("{crate_name}.wasm"));
    let dest = out.join(&manifest.name);
    std::fs::create_dir_all(&dest)?;
    let component_path = dest.join(&manifest.component);
    let fresh = match (std::fs::metadata(&module_path), std::fs::metadata(&component_path)) {
        (Ok(m), Ok(c)) => c.modified()? >= m.modified()?,
        _ => false,
    };
    if !fresh {
        let module = std::fs::read(&module_path).with_context(|| format!("reading {}", module_path.display()))?;
        let component = starling_runtime::componentize(&module)?;
        std::fs::write(&component_path, component)?;
    }
    write_manifest(source, &manifest_text, &dest, &component_path)?;
    Ok(component_path)
}
