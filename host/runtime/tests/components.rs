//! Runtime tests on WAT component fixtures: no guest toolchain needed. Each fixture is a core
//! module written in WAT, given its world's metadata and turned into a component here. Most
//! target `starling:plugin@0.1.0`, so they also show that components built against the earlier
//! interface keep working beside 0.2.0.

use starling_runtime::{PluginError, PluginHost, types};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const ALLOCATOR: &str = r#"
  (memory (export "memory") 2)
  (global $next (mut i32) (i32.const 8192))
  (func (export "cabi_realloc") (param i32 i32) (param $align i32) (param $size i32) (result i32)
    (local $ptr i32)
    (local.set $ptr
      (i32.and
        (i32.add (global.get $next) (i32.sub (local.get $align) (i32.const 1)))
        (i32.xor (i32.sub (local.get $align) (i32.const 1)) (i32.const -1))))
    (global.set $next (i32.add (local.get $ptr) (local.get $size)))
    (local.get $ptr))
"#;

/// An enricher whose `enrich` runs `body`, which must leave a result pointer on the stack.
/// Offset 1024 holds zeroes: `ok(empty list)`.
fn enricher(body: &str) -> String {
    format!(
        r#"(module {ALLOCATOR}
  (func (export "starling:plugin/enrich@0.1.0#enrich") (param i32) (result i32) {body}))"#
    )
}

const CONNECTOR: &str = r#"(module
  (memory (export "memory") 2)
  (global $next (mut i32) (i32.const 8192))
  (func (export "cabi_realloc") (param i32 i32 i32 i32) (result i32) (global.get $next))
  (func (export "starling:plugin/deliver@0.1.0#describe") (result i32) (i32.const 1024))
  (func (export "starling:plugin/deliver@0.1.0#deliver") (param i32 i32) (result i32) (i32.const 1024)))"#;

fn wit_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../wit")
}

/// Turns a WAT core module into a component of `world`, which may be given inline as WIT.
fn component(wat: &str, world: &str, extra_wit: Option<&str>) -> Vec<u8> {
    let mut module = wat::parse_str(wat).expect("fixture WAT parses");
    let mut resolve = wit_parser::Resolve::default();
    let (mut package, _) = resolve.push_dir(wit_dir()).expect("wit/ parses");
    if let Some(wit) = extra_wit {
        package = resolve.push_str("fixture.wit", wit).expect("fixture WIT parses");
    }
    // The repository's worlds by kind name are the 0.1.0 ones these fixtures were written for.
    let world = match world {
        "enricher" | "connector" => format!("starling:plugin/{world}@0.1.0"),
        other => other.to_string(),
    };
    let world = resolve.select_world(&[package], Some(&world)).expect("world exists");
    wit_component::embed_component_metadata(&mut module, &resolve, world, wit_component::StringEncoding::UTF8)
        .expect("metadata embeds");
    starling_runtime::componentize(&module).expect("componentizes")
}

/// Writes a plugin (manifest and component) into `dir` and returns the manifest path.
fn plugin(dir: &Path, name: &str, kind: &str, bytes: &[u8], extra: &str) -> PathBuf {
    let plugin_dir = dir.join(name);
    std::fs::create_dir_all(&plugin_dir).unwrap();
    std::fs::write(plugin_dir.join("c.wasm"), bytes).unwrap();
    let manifest = format!(
        "name = \"{name}\"\nversion = \"0.1.0\"\nkind = \"{kind}\"\nworld = \"starling:plugin/{kind}@0.1.0\"\ncomponent = \"c.wasm\"\n{extra}"
    );
    std::fs::write(plugin_dir.join("plugin.toml"), manifest).unwrap();
    plugin_dir.join("plugin.toml")
}

fn event() -> types::Occasion {
    types::Occasion::Event(types::Event {
        id: None,
        name: "view".into(),
        visitor_id: "v".into(),
        source: None,
        timestamp_ms: 0,
        data_json: "{}".into(),
    })
}

fn profile() -> types::ProfileView {
    let visit = types::Visit { number: 1, started_at_ms: 0, event_count: 1, ended: false };
    types::ProfileView { id: "v".into(), attributes: vec![], badges: vec![], audiences: vec![], visit }
}

#[tokio::test]
async fn an_enricher_is_called() {
    let dir = tempfile::tempdir().unwrap();
    let host = PluginHost::new().unwrap();
    let bytes = component(&enricher("(i32.const 1024)"), "enricher", None);
    host.load(&plugin(dir.path(), "ok", "enricher", &bytes, ""), BTreeMap::new()).unwrap();
    let updates = host.enrich("ok", &event(), &profile()).await.unwrap();
    assert_eq!(updates, Ok(vec![]));
}

#[tokio::test]
async fn a_loop_is_stopped_at_its_deadline_and_other_calls_go_on() {
    let dir = tempfile::tempdir().unwrap();
    let host = PluginHost::new().unwrap();
    let looping = component(&enricher("(loop $l (br $l)) (unreachable)"), "enricher", None);
    host.load(&plugin(dir.path(), "spin", "enricher", &looping, "[limits]\ntimeout_ms = 50\n"), BTreeMap::new())
        .unwrap();
    let ok = component(&enricher("(i32.const 1024)"), "enricher", None);
    host.load(&plugin(dir.path(), "ok", "enricher", &ok, ""), BTreeMap::new()).unwrap();

    let started = Instant::now();
    let err = host.enrich("spin", &event(), &profile()).await.unwrap_err();
    let took = started.elapsed();
    assert!(matches!(err, PluginError::Timeout { timeout_ms: 50, .. }), "{err}");
    // Generous upper bound: test machines are noisy. Typically stopped within one 10 ms epoch tick.
    assert!(
        took >= Duration::from_millis(50) && took < Duration::from_millis(400),
        "stopped soon after the deadline: {took:?}"
    );
    assert_eq!(host.enrich("ok", &event(), &profile()).await.unwrap(), Ok(vec![]));
}

#[tokio::test]
async fn a_spinning_connector_does_not_hold_the_callers_threads() {
    let dir = tempfile::tempdir().unwrap();
    let host = PluginHost::new().unwrap();
    let spinning = CONNECTOR.replace(
        "#deliver\") (param i32 i32) (result i32) (i32.const 1024)",
        "#deliver\") (param i32 i32) (result i32) (loop $l (br $l)) (unreachable)",
    );
    assert_ne!(spinning, CONNECTOR);
    let bytes = component(&spinning, "connector", None);
    host.load(&plugin(dir.path(), "spin", "connector", &bytes, "[limits]\ntimeout_ms = 300\n"), BTreeMap::new())
        .unwrap();
    // This test's runtime has one thread: a connector running on it would stop the ticker.
    let ticks = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    let ticker = tokio::spawn({
        let ticks = ticks.clone();
        async move {
            loop {
                tokio::time::sleep(Duration::from_millis(10)).await;
                ticks.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
    });
    let err = host.deliver("spin", &[]).await.unwrap_err();
    ticker.abort();
    assert!(matches!(err, PluginError::Timeout { timeout_ms: 300, .. }), "{err}");
    let ticks = ticks.load(std::sync::atomic::Ordering::Relaxed);
    assert!(ticks >= 10, "the caller's thread ticked {ticks} times in 300 ms");
}

#[tokio::test]
async fn the_host_keeps_at_most_a_thousand_characters_of_a_plugins_message() {
    // err(string) at 1024: discriminant 1, then a 100,000-byte string of NULs at 2048.
    let body = "(i32.store (i32.const 1024) (i32.const 1)) (i32.store (i32.const 1028) (i32.const 2048)) \
                (i32.store (i32.const 1032) (i32.const 100000)) (i32.const 1024)";
    let bytes = component(&enricher(body), "enricher", None);
    let dir = tempfile::tempdir().unwrap();
    let host = PluginHost::new().unwrap();
    host.load(&plugin(dir.path(), "loud", "enricher", &bytes, ""), BTreeMap::new()).unwrap();
    let message = host.enrich("loud", &event(), &profile()).await.unwrap().unwrap_err();
    assert_eq!(message, types::EnrichError::Failed("\0".repeat(1_000)), "0.1.0's string error, cut");
}

#[tokio::test]
async fn a_trap_fails_only_that_call() {
    let dir = tempfile::tempdir().unwrap();
    let host = PluginHost::new().unwrap();
    let trapping = component(&enricher("(unreachable)"), "enricher", None);
    host.load(&plugin(dir.path(), "trap", "enricher", &trapping, ""), BTreeMap::new()).unwrap();
    let err = host.enrich("trap", &event(), &profile()).await.unwrap_err();
    assert!(matches!(&err, PluginError::Trap { message, .. } if message.contains("unreachable")), "{err}");
    // The same plugin can be called again: a failed call's instance is not reused.
    assert!(host.enrich("trap", &event(), &profile()).await.is_err());
}

#[tokio::test]
async fn an_enricher_instance_serves_calls_until_one_fails() {
    // Counts its calls in a global and traps on its second: only a reused instance gets there.
    let counting = enricher(
        r#"(global.set $calls (i32.add (global.get $calls) (i32.const 1)))
           (if (i32.eq (global.get $calls) (i32.const 2)) (then (unreachable)))
           (i32.const 1024)"#,
    )
    .replace("(module", "(module (global $calls (mut i32) (i32.const 0))");
    let bytes = component(&counting, "enricher", None);
    let dir = tempfile::tempdir().unwrap();
    let host = PluginHost::new().unwrap();
    host.load(&plugin(dir.path(), "counting", "enricher", &bytes, ""), BTreeMap::new()).unwrap();
    assert_eq!(host.enrich("counting", &event(), &profile()).await.unwrap(), Ok(vec![]));
    let err = host.enrich("counting", &event(), &profile()).await.unwrap_err();
    assert!(matches!(&err, PluginError::Trap { .. }), "the second call reached the same instance: {err}");
    assert_eq!(
        host.enrich("counting", &event(), &profile()).await.unwrap(),
        Ok(vec![]),
        "after a failure the next call gets a fresh instance"
    );
}

#[tokio::test]
async fn memory_is_capped_by_the_manifest() {
    // Grows memory by 100 MiB: answers ok(empty) if the growth is refused, traps if it succeeds.
    let grow = enricher(
        "(if (i32.eq (memory.grow (i32.const 1600)) (i32.const -1)) (then (return (i32.const 1024)))) (unreachable)",
    );
    let bytes = component(&grow, "enricher", None);
    let dir = tempfile::tempdir().unwrap();
    let host = PluginHost::new().unwrap();
    host.load(&plugin(dir.path(), "small", "enricher", &bytes, "[limits]\nmemory_mib = 16\n"), BTreeMap::new())
        .unwrap();
    host.load(&plugin(dir.path(), "large", "enricher", &bytes, "[limits]\nmemory_mib = 256\n"), BTreeMap::new())
        .unwrap();
    assert_eq!(host.enrich("small", &event(), &profile()).await.unwrap(), Ok(vec![]), "growth past 16 MiB refused");
    assert!(host.enrich("large", &event(), &profile()).await.is_err(), "growth within 256 MiB allowed");
}

#[tokio::test]
async fn the_memory_cap_holds_for_all_of_a_components_memories_together() {
    // Grows its first memory by 10 MiB, then a second memory by 10 MiB: answers ok(empty) if
    // the second growth is refused, traps if it succeeds.
    let grow = enricher(
        "(drop (memory.grow 1 (i32.const 160)))
         (if (i32.eq (memory.grow $extra (i32.const 160)) (i32.const -1)) (then (return (i32.const 1024))))
         (unreachable)",
    )
    .replace("(module", "(module (memory $extra 0)");
    let bytes = component(&grow, "enricher", None);
    let dir = tempfile::tempdir().unwrap();
    let host = PluginHost::new().unwrap();
    host.load(&plugin(dir.path(), "two", "enricher", &bytes, "[limits]\nmemory_mib = 16\n"), BTreeMap::new()).unwrap();
    assert_eq!(host.enrich("two", &event(), &profile()).await.unwrap(), Ok(vec![]), "20 MiB in two memories refused");
    host.load(&plugin(dir.path(), "roomy", "enricher", &bytes, "[limits]\nmemory_mib = 32\n"), BTreeMap::new())
        .unwrap();
    assert!(host.enrich("roomy", &event(), &profile()).await.is_err(), "20 MiB within 32 MiB allowed");
}

#[tokio::test]
async fn the_operator_caps_what_a_manifest_may_ask_for() {
    let bytes = component(&enricher("(i32.const 1024)"), "enricher", None);
    let dir = tempfile::tempdir().unwrap();
    let host = PluginHost::with_options(starling_runtime::HostOptions {
        max_memory_mib: 32,
        max_timeout_ms: 1_000,
        ..Default::default()
    })
    .unwrap();
    let greedy = plugin(dir.path(), "greedy", "enricher", &bytes, "[limits]\nmemory_mib = 64\n");
    let err = host.load(&greedy, BTreeMap::new()).unwrap_err().to_string();
    assert!(
        err.contains("limits.memory_mib is 64, more than this server allows (server.plugin_max_memory_mib = 32)"),
        "{err}"
    );
    let slow = plugin(dir.path(), "slow", "enricher", &bytes, "[limits]\nmemory_mib = 16\ntimeout_ms = 600000\n");
    let err = host.load(&slow, BTreeMap::new()).unwrap_err().to_string();
    assert!(err.contains("limits.timeout_ms is 600000"), "{err}");
    assert!(host.names().is_empty(), "neither was loaded");
    host.load(&plugin(dir.path(), "modest", "enricher", &bytes, "[limits]\nmemory_mib = 32\n"), BTreeMap::new())
        .unwrap();
}

#[tokio::test]
async fn a_connector_is_described_and_called() {
    let dir = tempfile::tempdir().unwrap();
    let host = PluginHost::new().unwrap();
    let bytes = component(CONNECTOR, "connector", None);
    host.load(&plugin(dir.path(), "c", "connector", &bytes, ""), BTreeMap::new()).unwrap();
    let info = host.describe("c").await.unwrap();
    assert_eq!((info.description.as_str(), info.settings.len()), ("", 0));
    assert_eq!(host.deliver("c", &[]).await.unwrap(), vec![]);
    let err = host.enrich("c", &event(), &profile()).await.unwrap_err();
    assert!(matches!(err, PluginError::WrongKind { .. }), "{err}");
}

#[test]
fn a_component_must_implement_the_world_it_claims() {
    let dir = tempfile::tempdir().unwrap();
    let host = PluginHost::new().unwrap();
    let connector = component(CONNECTOR, "connector", None);
    let err = host.load(&plugin(dir.path(), "liar", "enricher", &connector, ""), BTreeMap::new()).unwrap_err();
    assert!(err.to_string().contains("does not implement starling:plugin/enricher@0.1.0"), "{err}");
}

#[test]
fn an_enricher_may_not_import_the_filesystem() {
    let wit = r#"package test:evil;
world evil {
  import wasi:filesystem/preopens@0.2.12;
  export starling:plugin/enrich@0.1.0;
}"#;
    let wat = format!(
        r#"(module
  (import "wasi:filesystem/preopens@0.2.12" "get-directories" (func $dirs (param i32)))
  {ALLOCATOR}
  (func (export "starling:plugin/enrich@0.1.0#enrich") (param i32) (result i32)
    (call $dirs (i32.const 2048)) (i32.const 1024)))"#
    );
    let bytes = component(&wat, "evil", Some(wit));
    let dir = tempfile::tempdir().unwrap();
    let host = PluginHost::new().unwrap();
    let err = host.load(&plugin(dir.path(), "evil", "enricher", &bytes, ""), BTreeMap::new()).unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("imports what the enricher world does not grant") && text.contains("wasi:filesystem/preopens"),
        "{text}"
    );
}

#[test]
fn core_modules_and_bad_hashes_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let host = PluginHost::new().unwrap();
    let module = wat::parse_str("(module)").unwrap();
    let err = host.load(&plugin(dir.path(), "m", "enricher", &module, ""), BTreeMap::new()).unwrap_err();
    assert!(err.to_string().contains("not a WebAssembly component"), "{err}");

    let bytes = component(&enricher("(i32.const 1024)"), "enricher", None);
    let err = host
        .load(
            &plugin(dir.path(), "h", "enricher", &bytes, &format!("sha256 = \"{}\"\n", "0".repeat(64))),
            BTreeMap::new(),
        )
        .unwrap_err();
    assert!(err.to_string().contains("sha256 mismatch"), "{err}");
}

#[tokio::test]
async fn repeated_failures_disable_a_plugin_and_a_reload_brings_it_back() {
    let dir = tempfile::tempdir().unwrap();
    let host = starling_runtime::PluginHost::with_options(starling_runtime::HostOptions {
        failure_limit: 2,
        ..Default::default()
    })
    .unwrap();
    let trapping = component(&enricher("(unreachable)"), "enricher", None);
    let manifest = plugin(dir.path(), "flaky", "enricher", &trapping, "");
    host.load(&manifest, BTreeMap::new()).unwrap();
    for _ in 0..2 {
        assert!(matches!(host.enrich("flaky", &event(), &profile()).await, Err(PluginError::Trap { .. })));
    }
    let err = host.enrich("flaky", &event(), &profile()).await.unwrap_err();
    assert!(
        matches!(&err, PluginError::Disabled { reason, .. } if reason.contains("disabled after 2 consecutive failures")),
        "{err}"
    );
    assert_eq!(host.get("flaky").unwrap().health().0, 2, "a disabled plugin is not called");
    host.load(&manifest, BTreeMap::new()).unwrap();
    assert!(matches!(host.enrich("flaky", &event(), &profile()).await, Err(PluginError::Trap { .. })));
}

#[tokio::test]
async fn a_precompiled_artifact_is_used_only_for_the_component_it_was_sealed_for() {
    let dir = tempfile::tempdir().unwrap();
    let host_with_cache = |cache: &Path| {
        PluginHost::with_options(starling_runtime::HostOptions {
            cache_dir: Some(cache.to_path_buf()),
            ..Default::default()
        })
        .unwrap()
    };
    let artifact_in = |cache: &Path| {
        std::fs::read_dir(cache)
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.extension().is_some_and(|x| x == "cwasm"))
            .unwrap()
    };
    let answering = component(&enricher("(i32.const 1024)"), "enricher", None);
    let trapping = component(&enricher("(unreachable)"), "enricher", None);
    let (cache, other_cache) = (dir.path().join("cache"), dir.path().join("other"));
    host_with_cache(&cache).load(&plugin(dir.path(), "ok", "enricher", &answering, ""), BTreeMap::new()).unwrap();
    host_with_cache(&other_cache).load(&plugin(dir.path(), "bad", "enricher", &trapping, ""), BTreeMap::new()).unwrap();
    let (artifact, foreign) = (artifact_in(&cache), artifact_in(&other_cache));
    let sealed = std::fs::read(&artifact).unwrap();
    assert!(artifact.with_extension("seal").is_file());

    // Another component's artifact under this one's name is not used: it is compiled again.
    std::fs::copy(&foreign, &artifact).unwrap();
    let host = host_with_cache(&cache);
    host.load(&plugin(dir.path(), "ok", "enricher", &answering, ""), BTreeMap::new()).unwrap();
    assert_eq!(host.enrich("ok", &event(), &profile()).await.unwrap(), Ok(vec![]));
    assert_eq!(std::fs::read(&artifact).unwrap().len(), sealed.len(), "the artifact was written again");
}

#[tokio::test]
async fn both_interface_versions_load_side_by_side_and_only_0_2_enrichers_see_visit_ends() {
    let dir = tempfile::tempdir().unwrap();
    let host = PluginHost::new().unwrap();
    let old = component(&enricher("(i32.const 1024)"), "enricher", None);
    host.load(&plugin(dir.path(), "old", "enricher", &old, ""), BTreeMap::new()).unwrap();
    let current_wat = enricher("(i32.const 1024)").replace("enrich@0.1.0#enrich", "enrich@0.2.0#enrich");
    let current = component(&current_wat, "starling:plugin/enricher@0.2.0", None);
    let manifest = plugin(dir.path(), "current", "enricher", &current, "");
    let text = std::fs::read_to_string(&manifest).unwrap().replace("enricher@0.1.0", "enricher@0.2.0");
    std::fs::write(&manifest, text).unwrap();
    host.load(&manifest, BTreeMap::new()).unwrap();

    let ended = types::Occasion::VisitEnded(60_000);
    for name in ["old", "current"] {
        assert_eq!(host.enrich(name, &event(), &profile()).await.unwrap(), Ok(vec![]), "{name}");
        assert_eq!(host.enrich(name, &ended, &profile()).await.unwrap(), Ok(vec![]), "{name}");
    }
    let calls = |name: &str| host.get(name).unwrap().call_time().0;
    assert_eq!((calls("old"), calls("current")), (1, 2), "a 0.1.0 enricher is not called for a visit's end");
    assert_eq!(host.get("old").unwrap().manifest.api(), starling_runtime::Api::V0_1);

    // A world that is neither version is refused with what is expected.
    let text = std::fs::read_to_string(&manifest).unwrap().replace("enricher@0.2.0", "enricher@0.3.0");
    std::fs::write(&manifest, text).unwrap();
    let err = host.load(&manifest, BTreeMap::new()).unwrap_err().to_string();
    assert!(err.contains("must target world `starling:plugin/enricher@0.2.0` (or its 0.1.0)"), "{err}");
}
