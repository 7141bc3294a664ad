//! Warm start with 10 plugins: a new plugin host loads every plugin from a directory, mapping
//! each one's precompiled artifact from the artifact cache (filled once, cold, before timing).
//!
//! The 10: the repository's connectors (webhook, value-tier, user-agent in Python, engagement in
//! JavaScript) and test plugins (hostile, spin-forever), plus two more copies each of the
//! Python and the JavaScript component, each made distinct by a custom section so that it has
//! its own hash and its own artifact: six of the ten are 12-18 MB components.
//!
//! `scripts/bench-enricher.sh` builds the plugins and runs this with the enricher comparison;
//! alone: `cargo run --release -p starling-cli -- plugin build connectors tests/plugins --out
//! target/bench-plugins && cargo bench -p starling-bench --bench warm_start`.

use criterion::{Criterion, criterion_group, criterion_main};
use starling_bench::repo;
use starling_runtime::{HostOptions, PluginHost};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

/// Copies a built plugin into `dir`, optionally renamed with a custom section appended to its
/// component so that it compiles to an artifact of its own.
fn install(built: &Path, dir: &Path, copy: Option<u8>) {
    let manifest_text = std::fs::read_to_string(built.join("plugin.toml")).unwrap();
    let mut manifest: toml::Table = toml::from_str(&manifest_text).unwrap();
    let component_name = manifest["component"].as_str().unwrap().to_string();
    let mut component = std::fs::read(built.join(&component_name)).unwrap();
    let mut name = manifest["name"].as_str().unwrap().to_string();
    if let Some(n) = copy {
        name = format!("{name}-copy-{n}");
        let section_name = b"starling-bench-copy";
        let payload = [n];
        component.push(0); // custom section
        component.push((1 + section_name.len() + payload.len()) as u8);
        component.push(section_name.len() as u8);
        component.extend_from_slice(section_name);
        component.extend_from_slice(&payload);
        manifest.insert("name".into(), name.clone().into());
        manifest.remove("sha256");
    }
    let dest = dir.join(&name);
    std::fs::create_dir_all(&dest).unwrap();
    std::fs::write(dest.join(&component_name), component).unwrap();
    std::fs::write(dest.join("plugin.toml"), toml::to_string(&manifest).unwrap()).unwrap();
}

fn warm_start(c: &mut Criterion) {
    let built = repo().join("target/bench-plugins");
    let plugins = ["webhook", "value-tier", "user-agent", "engagement", "hostile", "spin-forever"];
    for name in plugins {
        assert!(
            built.join(name).join("plugin.toml").is_file(),
            "{} is missing: run `cargo run --release -p starling-cli -- plugin build connectors tests/plugins --out target/bench-plugins`",
            built.join(name).display()
        );
    }
    let work = tempfile::tempdir().unwrap();
    let (dir, cache) = (work.path().join("plugins"), work.path().join("artifacts"));
    for name in plugins {
        install(&built.join(name), &dir, None);
    }
    for n in 1..=2 {
        install(&built.join("user-agent"), &dir, Some(n));
        install(&built.join("engagement"), &dir, Some(n));
    }
    let options = || HostOptions { cache_dir: Some(cache.clone()), ..HostOptions::default() };
    let config = BTreeMap::new();

    let cold = Instant::now();
    let host = PluginHost::with_options(options()).unwrap();
    assert_eq!(host.load_dir(&dir, &config).unwrap().len(), 10);
    println!("cold start (compiling 10 plugins): {:.1} s", cold.elapsed().as_secs_f64());
    drop(host);

    let mut group = c.benchmark_group("start");
    group.sample_size(20);
    group.bench_function("warm_10_plugins", |b| {
        b.iter(|| {
            let host = PluginHost::with_options(options()).unwrap();
            assert_eq!(host.load_dir(&dir, &config).unwrap().len(), 10);
            host
        })
    });
    group.finish();
}

criterion_group!(benches, warm_start);
criterion_main!(benches);
