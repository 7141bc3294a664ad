//! The plugin registry and the hardened sandbox: install, inspect, verify, sign, hot reload,
//! disable after repeated failures, and refused egress to internal addresses.

use crate::delivery::{action, toggle, toggle_config};
use crate::harness::{self, Receiver, Server, eventually, get_json};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

fn starling(config: &Path, args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_starling")).args(args).arg("--config").arg(config).output().unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

/// A copy of a built plugin in `dir/name`, its manifest edited.
fn copy_plugin(from: &Path, name: &str, dir: &Path, edit: impl Fn(String) -> String) -> std::path::PathBuf {
    harness::install(from, name, dir, edit);
    dir.join(name)
}

/// A registry-only configuration: no `server.plugins` directory.
fn registry_config(dir: &Path, actions: &str, extra_server: &str) -> std::path::PathBuf {
    let config = toggle_config(dir, actions);
    let text = std::fs::read_to_string(&config).unwrap().replace("plugins = \"plugins\"\n", extra_server);
    std::fs::write(&config, text).unwrap();
    std::fs::remove_dir_all(dir.join("plugins")).unwrap();
    config
}

#[tokio::test(flavor = "multi_thread")]
async fn installed_plugins_are_inspected_verified_and_hot_reloaded() {
    // The receiver holds its first answer for a second, so that call is under way during the swap.
    let receiver = Receiver::start_on(
        "127.0.0.1:0",
        Arc::new(|n| {
            if n == 0 {
                std::thread::sleep(Duration::from_millis(1_000));
            }
            (200, vec![])
        }),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let config = registry_config(dir.path(), &action("hook", &format!("{}/x", receiver.url), ""), "");
    let staging = dir.path().join("staging");
    let v1 = copy_plugin(harness::connectors(), "webhook", &staging.join("v1"), |m| m);

    let (ok, out) = starling(&config, &["plugin", "add", v1.to_str().unwrap()]);
    assert!(ok && out.contains("installed webhook 0.1.0 (starling:plugin/connector@0.2.0"), "{out}");
    let (ok, out) = starling(&config, &["plugin", "list"]);
    assert!(ok && out.contains("webhook") && out.contains("installed"), "{out}");
    let (ok, out) = starling(&config, &["plugin", "inspect", "webhook"]);
    assert!(ok, "{out}");
    for expected in [
        "world:     starling:plugin/connector@0.2.0",
        "limits:    32 MiB memory, 5000 ms per call",
        "wasi:http/outgoing-handler@0.2",
        "starling:plugin/deliver@0.2.0",
        "secret: auth_header",
    ] {
        assert!(out.contains(expected), "inspect lacks `{expected}`:\n{out}");
    }
    let (ok, out) = starling(&config, &["plugin", "verify"]);
    assert!(ok && out.contains("webhook: ok"), "{out}");

    let server = Server::start(&config);
    toggle(&server, "first", true).await;
    eventually("the first call to be under way", Duration::from_secs(10), async || {
        (!receiver.received().is_empty()).then_some(())
    })
    .await;

    // Version 0.2.0 may only reach another host: installed while the first call is in flight.
    let v2 = copy_plugin(harness::connectors(), "webhook", &staging.join("v2"), |m| {
        let start = m.find("allowed_hosts").unwrap();
        let end = start + m[start..].find('\n').unwrap();
        format!("{}allowed_hosts = [\"https://api.example.com\"]{}", &m[..start], &m[end..])
            .replace("version = \"0.1.0\"", "version = \"0.2.0\"")
    });
    let (ok, out) = starling(&config, &["plugin", "add", v2.to_str().unwrap()]);
    assert!(ok && out.contains("installed webhook 0.2.0") && out.contains("replacing 0.1.0"), "{out}");
    eventually("the in-flight call to complete as delivered", Duration::from_secs(10), async || {
        let (_, rows) = get_json(&format!("{}/v1/actions?status=delivered", server.url)).await;
        (rows["actions"].as_array().unwrap().len() == 1).then_some(())
    })
    .await;
    eventually("the new version to be loaded", Duration::from_secs(10), async || {
        server.logs().contains("version=0.2.0").then_some(())
    })
    .await;
    toggle(&server, "second", true).await;
    let failed = eventually("the second action, under 0.2.0, to be refused", Duration::from_secs(10), async || {
        let (_, rows) = get_json(&format!("{}/v1/actions?status=failed", server.url)).await;
        rows["actions"].as_array().and_then(|a| a.first().cloned())
    })
    .await;
    assert_eq!(failed["profile_id"], "second");
    assert_eq!(receiver.received().len(), 1, "no restart, and 0.2.0 sent nothing");

    // Disable, then tamper with the stored component: verify notices.
    let (ok, _) = starling(&config, &["plugin", "disable", "webhook"]);
    assert!(ok);
    let (_, out) = starling(&config, &["plugin", "list"]);
    assert!(out.contains("disabled by an operator"), "{out}");
    let blobs = dir.path().join("starling.db.plugins");
    let blob = std::fs::read_dir(&blobs)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "wasm"))
        .unwrap();
    let mut bytes = std::fs::read(&blob).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&blob, bytes).unwrap();
    let (ok, out) = starling(&config, &["plugin", "verify", "webhook"]);
    assert!(!ok && out.contains("webhook: FAILED: stored component has sha256"), "{out}");
    let (ok, out) = starling(&config, &["plugin", "remove", "webhook"]);
    assert!(ok && out.contains("removed webhook"), "{out}");
    server.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn with_trusted_keys_only_correctly_signed_plugins_install() {
    let dir = tempfile::tempdir().unwrap();
    let config = registry_config(dir.path(), "", "trusted_keys = \"trusted.keys\"\n");
    let keys = dir.path().join("release");
    let (ok, out) = starling(&config, &["plugin", "keygen", "--out", keys.to_str().unwrap()]);
    assert!(ok, "{out}");
    std::fs::copy(keys.with_extension("pub"), dir.path().join("trusted.keys")).unwrap();

    let unsigned = copy_plugin(harness::connectors(), "webhook", &dir.path().join("unsigned"), |m| m);
    let (ok, out) = starling(&config, &["plugin", "add", unsigned.to_str().unwrap()]);
    assert!(!ok && out.contains("refused webhook: unsigned, and trusted keys are configured"), "{out}");

    let signed = copy_plugin(harness::connectors(), "webhook", &dir.path().join("signed"), |m| m);
    let secret = keys.with_extension("secret");
    let (ok, out) = starling(&config, &["plugin", "sign", signed.to_str().unwrap(), "--key", secret.to_str().unwrap()]);
    assert!(ok, "{out}");
    // Widening the allowed hosts after signing breaks the signature.
    let manifest = signed.join("plugin.toml");
    let original = std::fs::read_to_string(&manifest).unwrap();
    std::fs::write(&manifest, original.replace("allowed_hosts = [", "allowed_hosts = [\"http://*:*\", ")).unwrap();
    let (ok, out) = starling(&config, &["plugin", "add", signed.to_str().unwrap()]);
    assert!(!ok && out.contains("signature does not match the manifest and component"), "{out}");
    std::fs::write(&manifest, original).unwrap();
    let (ok, out) = starling(&config, &["plugin", "add", signed.to_str().unwrap()]);
    let public = std::fs::read_to_string(keys.with_extension("pub")).unwrap();
    assert!(ok && out.contains(&format!("signed by {}", public.trim())), "{out}");

    let (other, _) = (dir.path().join("other"), ());
    starling(&config, &["plugin", "keygen", "--out", other.to_str().unwrap()]);
    let stranger = copy_plugin(harness::connectors(), "webhook", &dir.path().join("stranger"), |m| m);
    starling(
        &config,
        &["plugin", "sign", stranger.to_str().unwrap(), "--key", other.with_extension("secret").to_str().unwrap()],
    );
    let (ok, out) = starling(&config, &["plugin", "add", stranger.to_str().unwrap()]);
    assert!(!ok && out.contains("which is not a trusted key"), "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn with_trusted_keys_every_load_checks_the_signature() {
    let dir = tempfile::tempdir().unwrap();
    // Installed while no keys were trusted: an unsigned row in the registry.
    let open = registry_config(dir.path(), "", "");
    let unsigned = copy_plugin(harness::connectors(), "webhook", &dir.path().join("unsigned"), |m| m);
    let (ok, out) = starling(&open, &["plugin", "add", unsigned.to_str().unwrap()]);
    assert!(ok, "{out}");
    let (ok, out) = starling(&open, &["plugin", "verify"]);
    assert!(ok && out.contains("webhook: ok"), "{out}");

    // Now the configuration trusts one key.
    let keys = dir.path().join("release");
    let (ok, out) = starling(&open, &["plugin", "keygen", "--out", keys.to_str().unwrap()]);
    assert!(ok, "{out}");
    std::fs::copy(keys.with_extension("pub"), dir.path().join("trusted.keys")).unwrap();
    let text =
        std::fs::read_to_string(&open).unwrap().replace("[server]\n", "[server]\ntrusted_keys = \"trusted.keys\"\n");
    std::fs::write(&open, text).unwrap();
    let (ok, out) = starling(&open, &["plugin", "verify"]);
    assert!(!ok && out.contains("webhook: FAILED: unsigned, and trusted keys are configured"), "{out}");
    let server = Server::start(&open);
    let (_, plugins) = get_json(&format!("{}/v1/plugins", server.url)).await;
    assert_eq!(plugins["plugins"].as_array().map(Vec::len), Some(0), "the unsigned row was not loaded: {plugins}");
    assert!(server.logs().contains("cannot load installed plugin: ") && server.logs().contains("unsigned"));
    server.stop();

    // A plugin directory named by server.plugins is held to the same rule, at start.
    let text = std::fs::read_to_string(&open).unwrap().replace("[server]\n", "[server]\nplugins = \"plugins\"\n");
    std::fs::write(&open, text).unwrap();
    copy_plugin(harness::connectors(), "webhook", &dir.path().join("plugins"), |m| m);
    let refused = Command::new(env!("CARGO_BIN_EXE_starling"))
        .current_dir(dir.path())
        .args(["serve", "--config", "starling.toml", "--listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success() && said.contains("unsigned, and trusted keys are configured"), "{said}");
    let (ok, out) = starling(
        &open,
        &[
            "plugin",
            "sign",
            dir.path().join("plugins/webhook").to_str().unwrap(),
            "--key",
            keys.with_extension("secret").to_str().unwrap(),
        ],
    );
    assert!(ok, "{out}");
    let server = Server::start(&open);
    assert!(server.logs().contains("plugin loaded"), "signed, it loads");
    server.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_plugin_failing_repeatedly_is_disabled_until_enabled() {
    let dir = tempfile::tempdir().unwrap();
    let config = registry_config(dir.path(), "", "plugin_failure_limit = 2\n");
    let text = std::fs::read_to_string(&config).unwrap() + "\n[[enricher]]\nplugin = \"spin-forever\"\n";
    std::fs::write(&config, text).unwrap();
    let spin = copy_plugin(harness::test_plugins(), "spin-forever", &dir.path().join("staging"), |m| m);
    let (ok, out) = starling(&config, &["plugin", "add", spin.to_str().unwrap()]);
    assert!(ok, "{out}");
    let server = Server::start(&config);
    for i in 0..3 {
        toggle(&server, &format!("v{i}"), true).await;
    }
    assert!(server.logs().contains("disabled after 2 consecutive failures"), "{}", server.logs());
    let (_, out) = eventually("the registry to show it disabled", Duration::from_secs(10), async || {
        let (ok, out) = starling(&config, &["plugin", "list"]);
        out.contains("disabled after 2 consecutive failures").then_some((ok, out))
    })
    .await;
    assert!(out.contains("false"), "{out}");
    let (ok, out) = starling(&config, &["plugin", "inspect", "spin-forever"]);
    assert!(ok && out.contains("failures:  2 (2 consecutive)"), "{out}");
    let (ok, _) = starling(&config, &["plugin", "enable", "spin-forever"]);
    assert!(ok);
    eventually("the plugin to be loaded again", Duration::from_secs(10), async || {
        (server.logs().matches("plugin loaded from the registry").count() >= 2).then_some(())
    })
    .await;
    let (_, profile) = get_json(&format!("{}/v1/profiles/v2", server.url)).await;
    assert_eq!(profile["attributes"]["on"], true, "events kept flowing while the plugin failed");
    server.stop();
}

/// Waits for the first action that failed, and checks the host refused its request.
async fn refused_action(server: &Server) {
    let failed = eventually("the refused action", Duration::from_secs(10), async || {
        let (_, rows) = get_json(&format!("{}/v1/actions?status=failed", server.url)).await;
        rows["actions"].as_array().and_then(|a| a.first().cloned())
    })
    .await;
    assert!(failed["last_error"].as_str().unwrap().contains("denied"), "{failed}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wildcard_host_never_reaches_an_internal_address() {
    let receiver = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = toggle_config(dir.path(), &action("hook", &format!("{}/x", receiver.url), ""));
    harness::install(harness::connectors(), "webhook", &dir.path().join("plugins"), |m| {
        let start = m.find("allowed_hosts").unwrap();
        let end = start + m[start..].find('\n').unwrap();
        format!("{}allowed_hosts = [\"http://*:*\"]{}", &m[..start], &m[end..])
    });
    let server = Server::start(&config);
    toggle(&server, "v1", true).await;
    refused_action(&server).await;
    assert!(server.logs().contains("resolves to internal address 127.0.0.1, which a wildcard does not allow"));
    assert!(receiver.received().is_empty());
    server.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn no_plugin_reaches_the_servers_own_listener() {
    // The webhook's manifest allows `http://127.0.0.1:*`; the server listens on loopback too.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let own = format!("http://127.0.0.1:{port}/v1/profiles/v1/unstitch");
    let config = toggle_config(dir.path(), &action("inward", &own, ""));
    let listen = format!("127.0.0.1:{port}");
    let server = Server::start_with(&config, &["--listen", &listen]);
    assert_eq!(server.url, format!("http://{listen}"));
    toggle(&server, "v1", true).await;
    refused_action(&server).await;
    assert!(server.logs().contains(&format!("127.0.0.1:{port} (127.0.0.1:{port}) is this server's own listener")));
    let (_, audit) = get_json(&format!("{}/v1/audit", server.url)).await;
    assert!(!audit.to_string().contains("unstitch"), "the call never reached the admin API: {audit}");
    server.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_plugins_fail_alone_and_see_nothing_of_the_host() {
    let dir = tempfile::tempdir().unwrap();
    let config = toggle_config(dir.path(), "");
    let text = std::fs::read_to_string(&config).unwrap()
        + "\n[[attribute]]\nname = \"snooped\"\nscope = \"visitor\"\ntype = \"string\"\n\n[[enricher]]\nplugin = \"hostile\"\n";
    std::fs::write(&config, text).unwrap();
    harness::install(harness::test_plugins(), "hostile", &dir.path().join("plugins"), |m| m);
    let server = Server::start(&config);
    let post = |name: &'static str, visitor: &'static str| {
        let url = format!("{}/v1/events", server.url);
        async move {
            harness::post_json(&url, &serde_json::json!({"event": name, "visitor_id": visitor, "data": {"on": true}}))
                .await
        }
    };

    // While a plugin call exhausts its memory, other requests are answered.
    let bomb = tokio::spawn(post("bomb", "v-bomb"));
    let (status, _) = get_json(&format!("{}/healthz", server.url)).await;
    assert_eq!(status, 200);
    assert_eq!(bomb.await.unwrap().0, 202, "the event is applied even though the enricher failed");
    assert_eq!(post("trap", "v-trap").await.0, 202);
    assert_eq!(post("snoop", "v-snoop").await.0, 202);
    assert_eq!(post("page", "v-after").await.0, 202);

    let logs = server.logs();
    assert!(logs.contains("enricher `hostile` failed: plugin `hostile` failed"), "{logs}");
    assert!(
        logs.matches("enricher `hostile` failed").count() >= 2,
        "the bomb and the trap each fail their call: {logs}"
    );
    let (_, snooped) = get_json(&format!("{}/v1/profiles/v-snoop", server.url)).await;
    let seen = snooped["attributes"]["snooped"].as_str().unwrap();
    assert!(seen.starts_with("file error:") && seen.contains("env error:"), "the plugin saw: {seen}");
    for visitor in ["v-bomb", "v-trap", "v-after"] {
        let (status, p) = get_json(&format!("{}/v1/profiles/{visitor}", server.url)).await;
        assert_eq!((status, &p["attributes"]["on"]), (200, &serde_json::json!(true)), "{visitor}");
    }
    server.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn python_and_javascript_enrichers_run_and_the_compiled_code_cache_makes_the_second_start_fast() {
    let _alone = harness::exclusive().await;
    let dir = tempfile::tempdir().unwrap();
    let config = toggle_config(dir.path(), "");
    let text = std::fs::read_to_string(&config).unwrap()
        + "\n[[attribute]]\nname = \"device\"\nscope = \"visitor\"\ntype = \"string\"\n\
           [[attribute]]\nname = \"browser\"\nscope = \"visitor\"\ntype = \"string\"\n\
           [[attribute]]\nname = \"os\"\nscope = \"visitor\"\ntype = \"string\"\n\
           [[attribute]]\nname = \"engagement\"\nscope = \"visitor\"\ntype = \"number\"\n\
           [[enricher]]\nplugin = \"user-agent\"\n\
           [[enricher]]\nplugin = \"engagement\"\n";
    std::fs::write(&config, text).unwrap();
    harness::install(harness::connectors(), "user-agent", &dir.path().join("plugins"), |m| m);
    harness::install(harness::connectors(), "engagement", &dir.path().join("plugins"), |m| m);

    let cold = std::time::Instant::now();
    let server = Server::start(&config);
    let cold = cold.elapsed();
    let agent = "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.4 Mobile/15E148 Safari/604.1";
    let (status, _) = harness::post_json(
        &format!("{}/v1/events", server.url),
        &serde_json::json!({"event": "page_view", "visitor_id": "phone-1", "data": {"user_agent": agent}}),
    )
    .await;
    assert_eq!(status, 202);
    let (_, profile) = get_json(&format!("{}/v1/profiles/phone-1", server.url)).await;
    assert_eq!(profile["attributes"]["device"], "mobile", "{}", server.logs());
    assert_eq!(profile["attributes"]["browser"], "Safari");
    assert_eq!(profile["attributes"]["os"], "iOS");
    assert_eq!(profile["attributes"]["engagement"], 7.0, "JavaScript: 1 event this visit × 2 + 1 visit × 5");
    server.stop();

    let warm = std::time::Instant::now();
    let server = Server::start(&config);
    let warm = warm.elapsed();
    eprintln!("start with an 18 MB Python and a 12 MB JavaScript component: cold {cold:?}, warm {warm:?}");
    assert!(warm * 3 < cold, "the second start uses the compiled-code cache: cold {cold:?}, warm {warm:?}");
    server.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_python_connector_gets_errors_for_files_the_environment_and_sockets_and_nothing_else_happens() {
    // A real listener on loopback: a socket the plugin opened would reach it.
    let listener = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret.txt");
    std::fs::write(&secret, "the host's secret").unwrap();
    let text = format!(
        r#"
[server]
database = "starling.db"
plugins = "plugins"

[[attribute]]
name = "spend"
scope = "visitor"
type = "number"

[[enrichment]]
attribute = "spend"
op = "increment"
event = "total"

[[audience]]
name = "buyers"
rule = {{ attribute = "spend", op = ">", value = 0 }}

[[action]]
name = "probe"
audience = "buyers"
trigger = "joined"
connector = "py-sandbox"
settings = {{ file = "{}", port = "{}" }}
"#,
        secret.display(),
        listener.addr.port()
    );
    let config = dir.path().join("starling.toml");
    std::fs::write(&config, text).unwrap();
    harness::install(harness::test_plugins(), "py-sandbox", &dir.path().join("plugins"), |m| m);
    let server = Server::start(&config);
    let (status, _) = harness::post_json(
        &format!("{}/v1/events", server.url),
        &serde_json::json!({"event": "buy", "visitor_id": "v1", "data": {"total": 5}}),
    )
    .await;
    assert_eq!(status, 202);
    let failed = eventually("the probe's answer", Duration::from_secs(60), async || {
        let (_, actions) = get_json(&format!("{}/v1/actions?status=failed", server.url)).await;
        actions["actions"].as_array().and_then(|a| a.first().cloned())
    })
    .await;
    let message = failed["last_error"].as_str().unwrap();
    let report: serde_json::Value = serde_json::from_str(message.strip_prefix("permanent: ").unwrap()).unwrap();
    assert_eq!(report["file"]["outcome"], "refused", "{report}");
    assert!(report["file"]["error"].as_str().unwrap().contains("No such file or directory"), "{report}");
    assert_eq!(report["listdir"]["outcome"], "refused", "no directory is open to it: {report}");
    assert_eq!(
        report["environ"],
        serde_json::json!({}),
        "the host's environment (RUST_LOG, PATH...) is not shown: {report}"
    );
    assert_eq!(report["socket"]["outcome"], "refused", "{report}");
    assert!(report["socket"]["error"].as_str().unwrap().contains("Permission denied"), "{report}");
    assert!(listener.received().is_empty(), "nothing reached the listener");
    assert_eq!(std::fs::read_to_string(&secret).unwrap(), "the host's secret");
    server.stop();
}
