//! What the end-to-end tests share: built plugins, a `starling serve` child process on a
//! temporary SQLite file, and a loopback HTTP receiver that records what it gets.

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

pub(crate) fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().expect("repository root")
}

/// Builds `sources` into `out` once per test run with `starling plugin build`.
fn build_plugins(cell: &'static OnceLock<PathBuf>, sources: &str, out: &str) -> &'static Path {
    cell.get_or_init(|| {
        let root = root();
        let output = Command::new(env!("CARGO_BIN_EXE_starling"))
            .current_dir(&root)
            .args(["plugin", "build", sources, "--out", out])
            .output()
            .expect("running starling plugin build");
        assert!(
            output.status.success(),
            "starling plugin build {sources} failed:\n{}\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        root.join(out)
    })
}

/// The plugins in `connectors/`, built.
pub(crate) fn connectors() -> &'static Path {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    build_plugins(&BUILT, "connectors", "target/plugins")
}

/// The hostile test plugins in `tests/plugins/`, built.
pub(crate) fn test_plugins() -> &'static Path {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    build_plugins(&BUILT, "tests/plugins", "target/test-plugins")
}

/// Copies a built plugin into a test's plugin directory, optionally rewriting its manifest.
pub(crate) fn install(from: &Path, name: &str, plugins_dir: &Path, edit_manifest: impl Fn(String) -> String) {
    let dest = plugins_dir.join(name);
    std::fs::create_dir_all(&dest).unwrap();
    for entry in std::fs::read_dir(from.join(name)).unwrap() {
        let path = entry.unwrap().path();
        let target = dest.join(path.file_name().unwrap());
        if path.file_name().unwrap() == "plugin.toml" {
            std::fs::write(target, edit_manifest(std::fs::read_to_string(&path).unwrap())).unwrap();
        } else {
            std::fs::copy(&path, target).unwrap();
        }
    }
}

/// A running `starling serve`.
pub(crate) struct Server {
    child: Child,
    pub url: String,
    pub log: PathBuf,
}

impl Server {
    /// Starts the server on `config` and waits until it listens.
    pub(crate) fn start(config: &Path) -> Server {
        Server::start_with(config, &[])
    }

    /// Starts the server on `config` with extra `serve` arguments.
    pub(crate) fn start_with(config: &Path, extra: &[&str]) -> Server {
        Server::start_with_env(config, extra, &[])
    }

    /// Starts the server on `config` with extra `serve` arguments and environment variables.
    pub(crate) fn start_with_env(config: &Path, extra: &[&str], env: &[(&str, &str)]) -> Server {
        let log = config.with_extension("log");
        let stderr = std::fs::OpenOptions::new().create(true).append(true).open(&log).unwrap();
        // Run from the configuration's directory with a relative path, as an operator would.
        let mut child = Command::new(env!("CARGO_BIN_EXE_starling"))
            .current_dir(config.parent().unwrap())
            .args(["serve", "--config"])
            .arg(config.file_name().unwrap())
            .args(["--listen", "127.0.0.1:0"])
            .args(extra)
            // `STARLING_TEST_LOG=info,starling_server::pipeline=debug` to follow a failing test.
            .env("RUST_LOG", std::env::var("STARLING_TEST_LOG").unwrap_or("info".into()))
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("starting starling");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(url) = line.strip_prefix("listening on ") {
                    let _ = tx.send(url.to_string());
                }
            }
        });
        // Generous: a first start compiles large (Python, JavaScript) components.
        match rx.recv_timeout(Duration::from_secs(240)) {
            Ok(url) => Server { child, url, log },
            Err(_) => {
                let _ = child.kill();
                panic!("starling did not start:\n{}", std::fs::read_to_string(&log).unwrap_or_default());
            }
        }
    }

    /// Stops the server with SIGTERM (a graceful shutdown) and waits for it.
    pub(crate) fn stop(mut self) {
        let _ = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status();
        // Generous: with every core busy compiling other tests' plugins, draining can be slow.
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("starling did not stop on SIGTERM:\n{}", self.logs());
    }

    /// Sends SIGTERM and returns how long the server took to exit (at most `limit`).
    pub(crate) fn terminate_within(mut self, limit: Duration) -> Duration {
        let started = Instant::now();
        let _ = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status();
        while started.elapsed() < limit {
            if let Ok(Some(_)) = self.child.try_wait() {
                return started.elapsed();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("starling did not exit within {limit:?} of SIGTERM:\n{}", self.logs());
    }

    /// Waits up to `limit` for the server to exit on its own, and returns how it exited.
    pub(crate) fn exits_within(&mut self, limit: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("starling did not exit within {limit:?}:\n{}", self.logs());
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills the server with SIGKILL: no shutdown, no flushing.
    pub(crate) fn kill9(mut self) {
        self.child.kill().expect("SIGKILL");
        self.child.wait().expect("reaping");
    }

    /// Resident memory of the server process, in KiB.
    pub(crate) fn rss_kib(&self) -> u64 {
        self.memory_kib("VmRSS:")
    }

    /// The most resident memory the server process has had, in KiB.
    pub(crate) fn peak_rss_kib(&self) -> u64 {
        self.memory_kib("VmHWM:")
    }

    fn memory_kib(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    }

    pub(crate) fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One request a [`Receiver`] got.
#[derive(Debug, Clone)]
pub(crate) struct Received {
    pub method: String,
    pub path: String,
    pub headers: HeaderMap,
    pub body: serde_json::Value,
    pub at: Instant,
}

impl Received {
    pub(crate) fn header(&self, name: &str) -> &str {
        self.headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or("")
    }
}

/// Decides the answer to the n-th request (from 0): a status and extra headers.
pub(crate) type Responder = Arc<dyn Fn(usize) -> (u16, Vec<(&'static str, String)>) + Send + Sync>;

/// Decides the whole answer to the n-th request from the request itself: status, extra headers
/// and body.
pub(crate) type Answer = Arc<dyn Fn(usize, &Received) -> (u16, Vec<(&'static str, String)>, String) + Send + Sync>;

#[derive(Clone)]
struct ReceiverState {
    got: Arc<Mutex<Vec<Received>>>,
    answer: Answer,
}

/// A loopback HTTP server standing in for an outside service; it records every request.
pub(crate) struct Receiver {
    pub url: String,
    pub addr: std::net::SocketAddr,
    got: Arc<Mutex<Vec<Received>>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Receiver {
    /// A receiver answering 200 to everything, on a free port.
    pub(crate) async fn start() -> Receiver {
        Receiver::start_on("127.0.0.1:0", Arc::new(|_| (200, vec![]))).await
    }

    pub(crate) async fn start_on(addr: &str, respond: Responder) -> Receiver {
        let answer: Answer = Arc::new(move |n, _| {
            let (status, headers) = respond(n);
            (status, headers, String::new())
        });
        Receiver::answering(addr, answer).await
    }

    pub(crate) async fn answering(addr: &str, answer: Answer) -> Receiver {
        let got: Arc<Mutex<Vec<Received>>> = Arc::default();
        let state = ReceiverState { got: got.clone(), answer };
        let app = axum::Router::new()
            .fallback(
                |State(state): State<ReceiverState>,
                 method: axum::http::Method,
                 uri: axum::http::Uri,
                 headers: HeaderMap,
                 body: axum::body::Bytes| async move {
                    let at = Instant::now();
                    let body = serde_json::from_slice(&body)
                        .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(&body).into()));
                    let received =
                        Received { method: method.to_string(), path: uri.path().to_string(), headers, body, at };
                    let n = {
                        let mut got = state.got.lock().unwrap();
                        got.push(received.clone());
                        got.len() - 1
                    };
                    let (status, extra, body) = (state.answer)(n, &received);
                    let mut response = axum::response::Response::new(axum::body::Body::from(body));
                    *response.status_mut() = StatusCode::from_u16(status).unwrap();
                    for (k, v) in extra {
                        response.headers_mut().insert(k, v.parse().unwrap());
                    }
                    response
                },
            )
            .with_state(state);
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await
                .unwrap()
        });
        Receiver { url: format!("http://{addr}"), addr, got, stop: Some(stop) }
    }

    /// Stops listening: later connections are refused.
    pub(crate) async fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(self.addr).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("receiver on {} did not stop", self.addr);
    }

    pub(crate) fn received(&self) -> Vec<Received> {
        self.got.lock().unwrap().clone()
    }
}

/// Polls `check` until it returns `Some`, or panics with `what` after `timeout`.
pub(crate) async fn eventually<T>(what: &str, timeout: Duration, mut check: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub(crate) fn client() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap()
}

pub(crate) async fn post_json(url: &str, body: &serde_json::Value) -> (u16, serde_json::Value) {
    let r = client().post(url).json(body).send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(serde_json::Value::Null))
}

pub(crate) async fn get_json(url: &str) -> (u16, serde_json::Value) {
    let r = client().get(url).send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(serde_json::Value::Null))
}

/// Whether process `pid` runs (exited and not yet waited for counts as gone).
pub(crate) fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|stat| stat.rsplit(") ").next().is_some_and(|rest| !rest.starts_with('Z')))
}

/// Held by tests that load the machine heavily or measure latency, so they never overlap.
pub(crate) async fn exclusive() -> tokio::sync::MutexGuard<'static, ()> {
    static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    LOCK.lock().await
}
