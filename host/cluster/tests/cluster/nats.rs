//! A real three-server NATS JetStream cluster on loopback for the tests (nats-server 2.15.1 from
//! the pinned wheel, installed by `scripts/nats.sh`), and nodes joining it.

use starling_cluster::{Changes, Cluster, Ownership, Settings};
use starling_log::Partition;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub(crate) const LEASE: Duration = Duration::from_secs(3);

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn nats_server() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let out = Command::new(root.join("scripts/nats.sh")).output().expect("running scripts/nats.sh");
    assert!(out.status.success(), "scripts/nats.sh: {}", String::from_utf8_lossy(&out.stderr));
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

/// Three nats-server processes forming one JetStream cluster, every write synced to disk.
pub(crate) struct NatsCluster {
    servers: Vec<Option<Child>>,
    pub urls: Vec<String>,
    _dir: tempfile::TempDir,
}

impl NatsCluster {
    pub(crate) fn start() -> NatsCluster {
        let binary = nats_server();
        let dir = tempfile::tempdir().unwrap();
        let clients: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let routes: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let route_list: Vec<String> = routes.iter().map(|p| format!("nats-route://127.0.0.1:{p}")).collect();
        let mut servers = Vec::new();
        for i in 0..3 {
            let config = format!(
                "server_name: n{i}\nlisten: 127.0.0.1:{}\njetstream {{\n  store_dir: \"{}\"\n  sync_interval: always\n}}\n\
                 cluster {{\n  name: starling-test\n  listen: 127.0.0.1:{}\n  routes: [{}]\n}}\n",
                clients[i],
                dir.path().join(format!("n{i}")).display(),
                routes[i],
                route_list.join(", ")
            );
            let path = dir.path().join(format!("n{i}.conf"));
            std::fs::write(&path, config).unwrap();
            let log = std::fs::File::create(dir.path().join(format!("n{i}.log"))).unwrap();
            let child = Command::new(&binary).arg("-c").arg(&path).stdout(Stdio::null()).stderr(log).spawn().unwrap();
            servers.push(Some(child));
        }
        let urls = clients.iter().map(|p| format!("nats://127.0.0.1:{p}")).collect();
        NatsCluster { servers, urls, _dir: dir }
    }

    pub(crate) fn kill9(&mut self, i: usize) {
        if let Some(mut child) = self.servers[i].take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for i in 0..self.servers.len() {
            self.kill9(i);
        }
    }
}

/// Connects as `node`, waiting for the cluster to elect its JetStream leader.
pub(crate) async fn join(nats: &NatsCluster, node: &str) -> Arc<Ownership> {
    let settings = Settings { node: node.into(), lease: LEASE, replicas: 3 };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match Cluster::connect(&nats.urls, settings.clone()).await {
            Ok(cluster) => return Arc::new(Ownership::new(cluster)),
            Err(e) if Instant::now() < deadline => {
                eprintln!("waiting for JetStream: {e}");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(e) => panic!("JetStream did not come up: {e}"),
        }
    }
}

/// Runs `ownership`'s rounds until `stop` is set; returns what each round changed.
pub(crate) fn run(
    ownership: Arc<Ownership>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<Vec<Changes>> {
    tokio::spawn(async move {
        let mut rounds = Vec::new();
        while !stop.load(std::sync::atomic::Ordering::SeqCst) {
            match ownership.tick().await {
                Ok(changes) => rounds.push(changes),
                Err(e) => eprintln!("{}: {e}", ownership.cluster().node()),
            }
            tokio::time::sleep(LEASE / 5).await;
        }
        rounds
    })
}

/// Waits until `check` holds, sampling that no partition is held by two nodes at once.
pub(crate) async fn until(
    what: &str,
    nodes: &[&Arc<Ownership>],
    timeout: Duration,
    check: impl Fn(&[Vec<Partition>]) -> bool,
) {
    let deadline = Instant::now() + timeout;
    loop {
        let held: Vec<Vec<Partition>> = nodes.iter().map(|n| n.held()).collect();
        let mut seen = BTreeSet::new();
        for (i, list) in held.iter().enumerate() {
            for p in list {
                assert!(seen.insert(*p), "partition {p} held by two nodes at once (node {i}): {held:?}");
            }
        }
        if check(&held) {
            return;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}: {held:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub(crate) fn counts(held: &[Vec<Partition>]) -> Vec<usize> {
    held.iter().map(Vec::len).collect()
}
