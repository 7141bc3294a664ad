//! A NATS JetStream cluster on loopback, for development, tests and benchmarks: nats-server
//! processes (2.15.1, installed from the pinned wheel by `scripts/nats.sh`) forming one cluster,
//! each syncing every write to disk (`sync_interval: always`), in a temporary directory removed
//! with it.

use std::io::{Error, Result};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The pinned nats-server binary, installed on first use.
fn nats_server() -> Result<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let out = Command::new(root.join("scripts/nats.sh")).output()?;
    if !out.status.success() {
        return Err(Error::other(format!("scripts/nats.sh: {}", String::from_utf8_lossy(&out.stderr))));
    }
    Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

/// nats-server processes forming one JetStream cluster.
pub struct LocalNats {
    servers: Vec<Option<Child>>,
    pub urls: Vec<String>,
    dir: tempfile::TempDir,
}

impl LocalNats {
    /// Starts `count` servers named `n0`, `n1`, ... (the names a stream's leader is given by).
    pub fn start(count: usize) -> Result<LocalNats> {
        let binary = nats_server()?;
        let dir = tempfile::tempdir()?;
        let clients: Vec<u16> = (0..count).map(|_| free_port()).collect::<Result<_>>()?;
        let routes: Vec<u16> = (0..count).map(|_| free_port()).collect::<Result<_>>()?;
        let route_list: Vec<String> = routes.iter().map(|p| format!("nats-route://127.0.0.1:{p}")).collect();
        // Named apart from any other cluster started at once: a port two of them were given
        // in turn (free one moment, taken the next) cannot join them into one.
        let name = format!("starling-local-{}", dir.path().file_name().unwrap_or_default().to_string_lossy());
        let name: String = name.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '-' }).collect();
        let mut servers = Vec::new();
        for i in 0..count {
            let config = format!(
                "server_name: n{i}\nlisten: 127.0.0.1:{}\njetstream {{\n  store_dir: \"{}\"\n  sync_interval: always\n}}\n\
                 cluster {{\n  name: \"{}\"\n  listen: 127.0.0.1:{}\n  routes: [{}]\n}}\n",
                clients[i],
                dir.path().join(format!("n{i}")).display(),
                name,
                routes[i],
                route_list.join(", ")
            );
            let path = dir.path().join(format!("n{i}.conf"));
            std::fs::write(&path, config)?;
            let log = std::fs::File::create(dir.path().join(format!("n{i}.log")))?;
            servers.push(Some(Command::new(&binary).arg("-c").arg(&path).stdout(Stdio::null()).stderr(log).spawn()?));
        }
        let urls = clients.iter().map(|p| format!("nats://127.0.0.1:{p}")).collect();
        Ok(LocalNats { servers, urls, dir })
    }

    /// Kills server `n{i}` with SIGKILL.
    pub fn kill9(&mut self, i: usize) {
        if let Some(mut child) = self.servers[i].take() {
            // Already gone is as good as killed.
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Pauses server `n{i}` (SIGSTOP): its connections stay open and nothing on them is answered,
    /// as with a server stalled or cut off behind a network that drops packets.
    pub fn pause(&self, i: usize) {
        self.signal(i, "-STOP");
    }

    /// Resumes server `n{i}` after [`LocalNats::pause`] (SIGCONT).
    pub fn resume(&self, i: usize) {
        self.signal(i, "-CONT");
    }

    fn signal(&self, i: usize, signal: &str) {
        if let Some(child) = &self.servers[i] {
            let sent = Command::new("kill").arg(signal).arg(child.id().to_string()).status();
            assert!(sent.is_ok_and(|s| s.success()), "kill {signal} n{i}");
        }
    }

    /// Bytes the servers hold on disk.
    pub fn disk_bytes(&self) -> u64 {
        fn size(path: &Path) -> u64 {
            match std::fs::read_dir(path) {
                Ok(entries) => entries.filter_map(|e| e.ok()).map(|e| size(&e.path())).sum(),
                Err(_) => std::fs::metadata(path).map_or(0, |m| m.len()),
            }
        }
        size(self.dir.path())
    }
}

impl Drop for LocalNats {
    fn drop(&mut self) {
        for i in 0..self.servers.len() {
            self.kill9(i);
        }
    }
}
