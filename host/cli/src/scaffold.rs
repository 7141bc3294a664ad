//! `starling plugin new NAME --lang rust|python|js|c --kind connector|enricher`: a plugin that
//! builds and passes its `tests.toml` as it is, to start from.
//!
//! Enrichers set a string attribute to the latest event's name; connectors POST each action's
//! parameters as JSON to its `url` setting. All come with test cases for `starling plugin test`.

use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub(crate) enum Lang {
    Rust,
    Python,
    Js,
    C,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub(crate) enum PluginKind {
    Connector,
    Enricher,
}

pub(crate) fn create(name: &str, lang: Lang, kind: PluginKind, parent: &Path) -> Result<PathBuf> {
    let valid = !name.is_empty()
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && name.starts_with(|c: char| c.is_ascii_lowercase());
    if !valid {
        bail!("plugin name `{name}`: use lowercase letters, digits and `-`, starting with a letter");
    }
    let dir = parent.join(name);
    if dir.exists() {
        bail!("{} already exists", dir.display());
    }
    let connector = matches!(kind, PluginKind::Connector);
    let kind_name = if connector { "connector" } else { "enricher" };
    let snake = name.replace('-', "_");
    let (source_name, source, component) = match (lang, connector) {
        (Lang::Rust, false) => ("src/lib.rs", include_str!("../templates/rust/enricher.rs"), &snake),
        (Lang::Rust, true) => ("src/lib.rs", include_str!("../templates/rust/connector.rs"), &snake),
        (Lang::Python, false) => ("app.py", include_str!("../templates/python/enricher.py"), &snake),
        (Lang::Python, true) => ("app.py", include_str!("../templates/python/connector.py"), &snake),
        (Lang::Js, false) => ("app.js", include_str!("../templates/js/enricher.js"), &snake),
        (Lang::Js, true) => ("app.js", include_str!("../templates/js/connector.js"), &snake),
        (Lang::C, false) => ("plugin.c", include_str!("../templates/c/enricher.c"), &snake),
        (Lang::C, true) => ("plugin.c", include_str!("../templates/c/connector.c"), &snake),
    };
    let (manifest, tests) = if connector {
        (include_str!("../templates/connector.plugin.toml"), include_str!("../templates/connector.tests.toml"))
    } else {
        (include_str!("../templates/enricher.plugin.toml"), include_str!("../templates/enricher.tests.toml"))
    };
    // Language runtimes need room: CPython and SpiderMonkey start with tens of MiB.
    let memory = match lang {
        Lang::Rust | Lang::C => "32",
        Lang::Python => "64",
        Lang::Js => "128",
    };
    let sdk = sdk_path(parent)?;
    let fill = |text: &str| {
        text.replace("{{name}}", name)
            .replace("{{component}}", &format!("{component}.wasm"))
            .replace("{{kind}}", kind_name)
            .replace("{{sdk}}", &sdk)
            .replace("{{memory}}", memory)
    };
    let mut files =
        vec![("plugin.toml", fill(manifest)), ("tests.toml", tests.to_string()), (source_name, fill(source))];
    if matches!(lang, Lang::Rust) {
        files.push(("Cargo.toml", fill(include_str!("../templates/rust/Cargo.toml"))));
    }
    for (file, text) in files {
        let path = dir.join(file);
        std::fs::create_dir_all(path.parent().expect("inside the plugin directory"))?;
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(dir)
}

/// The Rust SDK's path as seen from a plugin directory under `parent`: relative inside the
/// repository, absolute otherwise.
fn sdk_path(parent: &Path) -> Result<String> {
    let cwd = std::env::current_dir()?;
    let sdk = cwd
        .ancestors()
        .map(|d| d.join("sdk/rust"))
        .find(|d| d.join("Cargo.toml").is_file())
        .context("sdk/rust not found: run `starling plugin new` inside the Starling repository")?;
    let plugin_dir = std::path::absolute(parent)?.join("plugin");
    let common = plugin_dir.ancestors().find(|a| sdk.starts_with(a)).map(Path::to_path_buf);
    Ok(match common {
        Some(common) => {
            let ups = plugin_dir.strip_prefix(&common).map(|p| p.components().count()).unwrap_or(0);
            let rest = sdk.strip_prefix(&common).unwrap_or(&sdk);
            format!("{}{}", "../".repeat(ups), rest.display())
        }
        None => sdk.display().to_string(),
    })
}
