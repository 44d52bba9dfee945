//! Running a real etcd member (Debian's `etcd-server`): the arguments of
//! one member of a static cluster, and a child process that is killed and
//! whose data goes with it when dropped. Labs wrap the command to run it
//! inside their namespace; tests run it on loopback.

use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

use crate::Error;

/// The etcd binary (`etcd-server`'s).
pub const ETCD: &str = "/usr/bin/etcd";

/// One member of a static cluster.
#[derive(Clone, Debug)]
pub struct Member {
    pub name: String,
    pub client: SocketAddr,
    pub peer: SocketAddr,
    pub data_dir: PathBuf,
}

impl Member {
    pub fn client_url(&self) -> String {
        format!("http://{}", self.client)
    }

    fn peer_url(&self) -> String {
        format!("http://{}", self.peer)
    }

    /// etcd's arguments for this member of `cluster` (named `token`).
    pub fn args(&self, cluster: &[Member], token: &str) -> Vec<String> {
        let initial: Vec<String> = cluster
            .iter()
            .map(|m| format!("{}={}", m.name, m.peer_url()))
            .collect();
        [
            ("--name", self.name.clone()),
            ("--data-dir", self.data_dir.display().to_string()),
            ("--listen-client-urls", self.client_url()),
            ("--advertise-client-urls", self.client_url()),
            ("--listen-peer-urls", self.peer_url()),
            ("--initial-advertise-peer-urls", self.peer_url()),
            ("--initial-cluster", initial.join(",")),
            ("--initial-cluster-token", token.to_string()),
            ("--initial-cluster-state", "new".to_string()),
            // Lab and test clusters are small and short-lived.
            ("--heartbeat-interval", "50".to_string()),
            ("--election-timeout", "500".to_string()),
            ("--log-level", "warn".to_string()),
        ]
        .into_iter()
        .flat_map(|(k, v)| [k.to_string(), v])
        .collect()
    }
}

/// A running etcd member, killed (and its data directory removed) on drop.
pub struct Etcd {
    child: Child,
    member: Member,
}

impl Etcd {
    /// Starts `command` (etcd with `member.args(..)`, possibly wrapped) and
    /// waits until its client port accepts connections.
    pub fn spawn(mut command: Command, member: Member, log: &Path) -> Result<Self, Error> {
        let log = std::fs::File::create(log)
            .map_err(|e| Error::Start(format!("{}: {e}", log.display())))?;
        let err = log.try_clone().map_err(|e| Error::Start(e.to_string()))?;
        let child = command
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .map_err(|e| Error::Start(format!("{ETCD}: {e} (run `cargo xtask deps`)")))?;
        let mut etcd = Etcd { child, member };
        etcd.wait_ready(Duration::from_secs(20))?;
        Ok(etcd)
    }

    /// A one-member cluster on loopback, data in `dir` (tests).
    pub fn single(dir: &Path) -> Result<Self, Error> {
        let member = Member {
            name: "m0".into(),
            client: free_port()?,
            peer: free_port()?,
            data_dir: dir.join("data"),
        };
        let mut command = Command::new(ETCD);
        command.args(member.args(std::slice::from_ref(&member), "fibril-test"));
        Self::spawn(command, member, &dir.join("etcd.log"))
    }

    /// A cluster of `n` members on loopback, data under `dir` (tests).
    pub fn cluster(dir: &Path, n: usize) -> Result<Vec<Self>, Error> {
        let members: Vec<Member> = (0..n)
            .map(|i| {
                Ok(Member {
                    name: format!("m{i}"),
                    client: free_port()?,
                    peer: free_port()?,
                    data_dir: dir.join(format!("data{i}")),
                })
            })
            .collect::<Result<_, Error>>()?;
        // Started together: each waits for a quorum to serve.
        let mut children = Vec::new();
        for m in &members {
            let mut command = Command::new(ETCD);
            command.args(m.args(&members, "fibril-test"));
            let log = dir.join(format!("{}.log", m.name));
            let out = std::fs::File::create(&log)
                .map_err(|e| Error::Start(format!("{}: {e}", log.display())))?;
            let err = out.try_clone().map_err(|e| Error::Start(e.to_string()))?;
            let child = command
                .stdin(Stdio::null())
                .stdout(out)
                .stderr(err)
                .spawn()
                .map_err(|e| Error::Start(format!("{ETCD}: {e} (run `cargo xtask deps`)")))?;
            children.push(Etcd {
                child,
                member: m.clone(),
            });
        }
        for c in &mut children {
            c.wait_ready(Duration::from_secs(20))?;
        }
        Ok(children)
    }

    pub fn member(&self) -> &Member {
        &self.member
    }

    pub fn endpoint(&self) -> String {
        self.member.client_url()
    }

    fn wait_ready(&mut self, within: Duration) -> Result<(), Error> {
        let start = Instant::now();
        while start.elapsed() < within {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(Error::Start(format!("etcd exited: {status}")));
            }
            if TcpStream::connect_timeout(&self.member.client, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(Error::Start(format!(
            "no client port at {} after {within:?}",
            self.member.client
        )))
    }

    /// Kills the member and waits for it (its data stays: `start` again
    /// with the same member to bring it back).
    pub fn stop(mut self) {
        self.kill();
        std::mem::forget(self);
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.member.data_dir);
    }
}

/// A loopback port nothing listens on now. Taken from a block of 100 of
/// this process's own below the ephemeral range (32768-60999): a port the
/// kernel handed out for `bind(0)` and released could be handed out again
/// to a parallel test before its etcd binds it, and one test's etcd then
/// answered another's readiness check (seen as "connection refused" once
/// the other test ended). Falls back to `bind(0)` if the block is taken.
pub fn free_port() -> Result<SocketAddr, Error> {
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let base = 20_000 + (std::process::id() % 100) as u16 * 100;
    for _ in 0..100 {
        let port = base + NEXT.fetch_add(1, Ordering::Relaxed) % 100;
        if let Ok(l) = TcpListener::bind((Ipv4Addr::LOCALHOST, port)) {
            return l.local_addr().map_err(|e| Error::Start(e.to_string()));
        }
    }
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).map_err(|e| Error::Start(e.to_string()))?;
    l.local_addr().map_err(|e| Error::Start(e.to_string()))
}
