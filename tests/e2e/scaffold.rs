//! `starling plugin new` in every language and kind gives a plugin that builds and passes its
//! generated cases under `starling plugin test`; a case that does not hold fails the command.

use crate::harness;
use std::process::Command;

fn starling(args: &[&str]) -> (bool, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_starling")).current_dir(harness::root()).args(args).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    (output.status.success(), text)
}

#[test]
fn new_plugins_in_every_language_build_and_pass_their_generated_tests() {
    // Compilers in four languages take both cores: not beside the tests that measure latency.
    let _alone = tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(crate::harness::exclusive());
    let dir = tempfile::tempdir().unwrap();
    let parent = dir.path().to_str().unwrap();
    for lang in ["rust", "python", "js", "c"] {
        for kind in ["enricher", "connector"] {
            let name = format!("my-{lang}-{kind}");
            let (ok, out) = starling(&["plugin", "new", &name, "--lang", lang, "--kind", kind, "--dir", parent]);
            assert!(ok, "plugin new {name}: {out}");
            let plugin = dir.path().join(&name);
            let (ok, out) = starling(&["plugin", "test", plugin.to_str().unwrap()]);
            assert!(ok, "plugin test {name}:\n{out}");
            let cases = if kind == "connector" { 3 } else { 2 };
            assert!(out.contains(&format!("{cases} cases passed")), "{name}:\n{out}");
        }
    }

    // A case that does not hold fails, naming what differed.
    let plugin = dir.path().join("my-rust-enricher");
    let tests = std::fs::read_to_string(plugin.join("tests.toml")).unwrap();
    std::fs::write(
        plugin.join("tests.toml"),
        tests.replace(r#"expect = { last_event = "page_view" }"#, r#"expect = { last_event = "purchase" }"#),
    )
    .unwrap();
    let (ok, out) = starling(&["plugin", "test", plugin.to_str().unwrap()]);
    assert!(!ok, "{out}");
    assert!(
        out.contains(
            r#"FAIL records the event name: expected updates {"last_event":"purchase"}, got {"last_event":"page_view"}"#
        ),
        "{out}"
    );
    assert!(out.contains("1 of 2 cases failed"), "{out}");

    let (ok, out) = starling(&["plugin", "new", "Bad_Name", "--lang", "rust", "--kind", "enricher", "--dir", parent]);
    assert!(!ok && out.contains("plugin name `Bad_Name`"), "{out}");
}

/// The Rust SDK's documentation examples compile and pass for both worlds (the SDK is a
/// guest crate outside the workspace, so its doc tests run here).
#[test]
fn the_rust_sdk_documentation_examples_pass() {
    let root = harness::root();
    for world in ["connector", "enricher"] {
        let output = Command::new(env!("CARGO"))
            .current_dir(&root)
            .args(["test", "--doc", "--manifest-path", "sdk/rust/Cargo.toml", "--features", world])
            .env("CARGO_TARGET_DIR", root.join("target/sdk"))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&output.stdout);
        assert!(output.status.success(), "{world}:\n{text}\n{}", String::from_utf8_lossy(&output.stderr));
        assert!(text.contains("test result: ok.") && !text.contains(" 0 passed"), "{world}: no examples ran:\n{text}");
    }
}
