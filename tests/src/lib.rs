//! `fathom-tests`: harness for end-to-end tests (free loopback ports, starting a real etcd). The
//! end-to-end tests themselves live in `tests/tests/`; other crates use this crate as a
//! dev-dependency (e.g. the coordinator's membership tests).
//!
//! Owns: child processes it starts (each is killed when its handle drops) and their temporary
//! directories. Does not own: building binaries or anything inside the processes.
//!
//! Invariants: everything binds 127.0.0.1; a started [`EtcdServer`] answered `/health` before
//! `start` returned; dropping the handle kills the process and removes its data directory.
//! The API is synchronous (std only) so it works from plain and async tests alike; the blocking
//! waits are short (etcd starts in about half a second).

use anyhow::{Context, Result, bail};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A TCP port on 127.0.0.1 that was free when asked (the OS picked it; another process may
/// still take it before the caller binds, so servers started on it should be retried on failure).
pub fn free_port() -> std::io::Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    Ok(listener.local_addr()?.port())
}

/// How long [`EtcdServer::start`] waits for `/health` before giving up.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(15);

/// A real `etcd` server (Debian `etcd-server`, binary `etcd` on PATH) on free loopback ports with a
/// temporary data directory. Killed, and its directory removed, on drop.
#[derive(Debug)]
pub struct EtcdServer {
    child: Option<Child>,
    dir: tempfile::TempDir,
    client_port: u16,
    peer_port: u16,
}

impl EtcdServer {
    /// Starts etcd and waits until `GET /health` reports healthy. Retries with fresh ports if the
    /// chosen ones were taken meanwhile.
    pub fn start() -> Result<Self> {
        let mut last_err = None;
        for _ in 0..3 {
            let dir = tempfile::Builder::new().prefix("fathom-etcd-").tempdir()?;
            let mut server =
                EtcdServer { child: None, dir, client_port: free_port()?, peer_port: free_port()? };
            match server.spawn_and_wait() {
                Ok(()) => return Ok(server),
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.expect("at least one attempt"))
    }

    /// Client URL, e.g. `http://127.0.0.1:40123`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    /// The client port.
    pub fn client_port(&self) -> u16 {
        self.client_port
    }

    /// The data directory (kept across [`stop`](Self::stop) / [`restart`](Self::restart)).
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Whether the process is running (started and not stopped).
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Kills the process (SIGKILL: an abrupt outage; etcd's WAL is fsynced per commit, so
    /// committed data survives) and waits for it. The data directory is kept.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same ports and data directory (after [`stop`](Self::stop),
    /// or stops it first). Waits for `/health`.
    pub fn restart(&mut self) -> Result<()> {
        self.stop();
        // The old process's listening sockets are closed once it is reaped; the ports are
        // normally free again immediately, but allow a short retry for slow teardown.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match self.spawn_and_wait() {
                Ok(()) => return Ok(()),
                Err(_) if Instant::now() < deadline => {
                    self.stop();
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("etcd.log")
    }

    fn spawn_and_wait(&mut self) -> Result<()> {
        let client = format!("http://127.0.0.1:{}", self.client_port);
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.log_path())?;
        let child = Command::new("etcd")
            .arg("--name")
            .arg("fathom-test")
            .arg("--data-dir")
            .arg(self.data_dir())
            .arg("--listen-client-urls")
            .arg(&client)
            .arg("--advertise-client-urls")
            .arg(&client)
            .arg("--listen-peer-urls")
            .arg(&peer)
            .arg("--initial-advertise-peer-urls")
            .arg(&peer)
            .arg("--initial-cluster")
            .arg(format!("fathom-test={peer}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn();
        let child = match child {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                bail!("etcd not found on PATH (install etcd-server: scripts/deps.sh)")
            }
            Err(e) => return Err(e).context("spawning etcd"),
        };
        self.child = Some(child);
        let deadline = Instant::now() + HEALTH_TIMEOUT;
        loop {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                bail!("etcd exited with {status} during start-up: {}", self.log_tail());
            }
            if health_ok(self.client_port) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "etcd on port {} not healthy after {HEALTH_TIMEOUT:?}: {}",
                    self.client_port,
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The last lines of the server's log (for error messages).
    pub fn log_tail(&self) -> String {
        tail_of(&self.log_path(), 5)
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn tail_of(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join(" | ")
}

/// One `GET /health` over plain HTTP/1.0; true when etcd answers `"health":"true"`.
fn health_ok(port: u16) -> bool {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    if s.write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").is_err() {
        return false;
    }
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    body.contains("\"health\":\"true\"")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_port_is_bindable() {
        let p = free_port().unwrap();
        assert_ne!(p, 0);
        TcpListener::bind((Ipv4Addr::LOCALHOST, p)).unwrap();
    }

    #[test]
    fn etcd_starts_stops_and_restarts_on_the_same_port() {
        let mut etcd = EtcdServer::start().unwrap();
        let port = etcd.client_port();
        assert!(health_ok(port));
        etcd.stop();
        assert!(!etcd.is_running());
        assert!(!health_ok(port), "etcd still answering after stop");
        etcd.restart().unwrap();
        assert!(etcd.is_running());
        assert_eq!(etcd.client_port(), port);
        assert!(health_ok(port));
        assert!(etcd.data_dir().join("member").is_dir(), "data dir reused");
    }
}
