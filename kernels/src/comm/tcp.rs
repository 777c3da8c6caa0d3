//! [`TcpComm`]: ranks in separate processes (any hosts) over a full mesh of TCP connections.
//!
//! **Rendezvous.** The caller gives every rank one address, the *rendezvous address*, where
//! rank 0 listens ([`TcpRendezvous::bind`], or [`TcpComm::connect`] with rank 0). Rank `i > 0`
//! connects there (retrying until rank 0 is up), binds its own data listener on the local IP of
//! that connection (the interface that reaches rank 0; port chosen by the OS) and sends
//! `hello(rank, world, port)`. Rank 0 records each peer at `peer_ip:port`, and once all `W-1`
//! have joined sends every rank the address table and a session nonce. Then rank `i` connects
//! to ranks `1..i` and accepts from ranks `i+1..W` (hello carries the nonce, so a connection
//! from an older run is refused). The connection to rank 0 from the rendezvous is kept as the
//! data connection. Everything is bounded by [`CommOptions::connect_timeout`]; ranks that never
//! join are named in [`CommError::Timeout`] `{ op: "rendezvous" }`.
//!
//! **Cost.** `W(W-1)/2` connections, one reader thread per connection per rank (`W-1` threads
//! per rank) that drains frames into the rank's [`Mailbox`], so writers never block on a peer
//! that is busy writing too (no send/receive ordering deadlocks) — at the price of one extra
//! copy per message and buffering in memory. Frames are `[comm u64][seq u64][len u64]` +
//! payload, little-endian. Fine up to a few dozen ranks; beyond that a relayed or hierarchical
//! design would be needed (NCCL covers the GPU case).
//!
//! **Failure.** A closed connection (EOF, reset) marks the peer gone, so a waiting op fails with
//! `PeerLost` naming it. A peer that stops reading makes a write hit the op's deadline
//! (`Timeout` naming it); the stream is then abandoned (shut down), as its framing is lost.

use super::CommOptions;
use super::communicator::{Communicator, Link, LinkError};
use super::error::CommError;
use super::mailbox::{Mailbox, Tag};
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

/// The TCP implementation of [`super::Collective`].
pub type TcpComm = Communicator<TcpLink>;

const MAGIC: [u8; 8] = *b"FATHOMC1";
const HELLO_LEN: usize = 8 + 4 + 4 + 2 + 8;
const HEADER_LEN: usize = 24;
/// Frames larger than this are treated as a corrupt stream.
const MAX_FRAME: u64 = 1 << 36;
/// Payloads up to this size are written together with their header in one syscall.
const COALESCE: usize = 64 * 1024;

/// Rank 0's listening socket, bound before the other ranks are started (so a caller can bind
/// port 0 and hand the actual address to the other ranks).
#[derive(Debug)]
pub struct TcpRendezvous {
    listener: TcpListener,
}

impl TcpRendezvous {
    /// Binds the rendezvous address (e.g. `127.0.0.1:0`, `0.0.0.0:29500`).
    pub fn bind(addr: impl ToSocketAddrs + std::fmt::Debug) -> Result<Self, CommError> {
        let listener = TcpListener::bind(&addr)
            .map_err(|source| CommError::Io { context: format!("bind {addr:?}"), source })?;
        Ok(Self { listener })
    }

    /// The address other ranks must connect to.
    pub fn local_addr(&self) -> Result<SocketAddr, CommError> {
        self.listener
            .local_addr()
            .map_err(|source| CommError::Io { context: "rendezvous local_addr".into(), source })
    }

    /// Becomes rank 0 of a `world`-rank communicator once every other rank has joined.
    pub fn into_comm(self, world: usize, opts: CommOptions) -> Result<TcpComm, CommError> {
        if world == 0 {
            return Err(rv_err("world size must be >= 1"));
        }
        let deadline = Instant::now() + opts.connect_timeout;
        let nonce = make_nonce(&self.listener);
        let mut peers: Vec<Option<TcpStream>> = (0..world).map(|_| None).collect();
        let mut table = vec![String::new(); world];
        table[0] = self.local_addr()?.to_string();
        let started = Instant::now();
        while peers.iter().skip(1).any(Option::is_none) {
            let missing = |p: &[Option<TcpStream>]| -> Vec<usize> {
                (1..world).filter(|&r| p[r].is_none()).collect()
            };
            let Some(mut s) = accept_until(&self.listener, deadline)? else {
                return Err(CommError::Timeout {
                    op: "rendezvous",
                    missing_ranks: missing(&peers),
                    waited: started.elapsed(),
                });
            };
            let hello = read_hello(&mut s, deadline)?;
            if hello.world != world || hello.rank == 0 || hello.rank >= world {
                return Err(rv_err(&format!(
                    "a peer announced rank {} of world {}, expected a rank in 1..{world}",
                    hello.rank, hello.world
                )));
            }
            if peers[hello.rank].is_some() {
                return Err(rv_err(&format!("rank {} joined twice", hello.rank)));
            }
            let ip = s.peer_addr().map_err(|e| io_err("peer_addr", e))?.ip();
            table[hello.rank] = SocketAddr::new(ip, hello.port).to_string();
            peers[hello.rank] = Some(s);
        }
        let mut msg = nonce.to_le_bytes().to_vec();
        for a in &table {
            msg.extend_from_slice(&(a.len() as u16).to_le_bytes());
            msg.extend_from_slice(a.as_bytes());
        }
        for s in peers.iter_mut().flatten() {
            s.write_all(&msg).map_err(|e| io_err("sending the address table", e))?;
        }
        TcpLink::start(0, peers, opts)
    }
}

impl TcpComm {
    /// Joins (rank > 0) or hosts (rank 0, binding `rendezvous`) a `world`-rank communicator.
    pub fn connect(
        rendezvous: &str,
        rank: usize,
        world: usize,
        opts: CommOptions,
    ) -> Result<TcpComm, CommError> {
        if rank == 0 {
            return TcpRendezvous::bind(rendezvous)?.into_comm(world, opts);
        }
        if rank >= world {
            return Err(rv_err(&format!("rank {rank} is not below world size {world}")));
        }
        let deadline = Instant::now() + opts.connect_timeout;
        let to0 = connect_until(rendezvous, deadline)?;
        let local_ip = to0.local_addr().map_err(|e| io_err("local_addr", e))?.ip();
        let listener = TcpListener::bind((local_ip, 0))
            .map_err(|source| CommError::Io { context: format!("bind {local_ip}:0"), source })?;
        let port = listener.local_addr().map_err(|e| io_err("local_addr", e))?.port();
        let mut to0 = to0;
        write_hello(&mut to0, Hello { rank, world, port, nonce: 0 })?;
        let (nonce, table) = read_table(&mut to0, world, deadline)?;

        let mut peers: Vec<Option<TcpStream>> = (0..world).map(|_| None).collect();
        peers[0] = Some(to0);
        for (j, addr) in table.iter().enumerate().take(rank).skip(1) {
            let mut s = connect_until(addr, deadline)?;
            write_hello(&mut s, Hello { rank, world, port: 0, nonce })?;
            peers[j] = Some(s);
        }
        let started = Instant::now();
        while peers.iter().skip(rank + 1).any(Option::is_none) {
            let Some(mut s) = accept_until(&listener, deadline)? else {
                return Err(CommError::Timeout {
                    op: "rendezvous",
                    missing_ranks: (rank + 1..world).filter(|&r| peers[r].is_none()).collect(),
                    waited: started.elapsed(),
                });
            };
            let h = read_hello(&mut s, deadline)?;
            if h.nonce != nonce || h.world != world || h.rank <= rank || h.rank >= world {
                // Not a peer of this session (stale or misdirected): refuse it, keep waiting.
                continue;
            }
            if peers[h.rank].is_some() {
                return Err(rv_err(&format!("rank {} connected twice", h.rank)));
            }
            peers[h.rank] = Some(s);
        }
        TcpLink::start(rank, peers, opts)
    }
}

/// One rank's connections and the threads that drain them.
#[derive(Debug)]
pub struct TcpLink {
    rank: usize,
    mailbox: Arc<Mailbox>,
    /// Writer side per world rank (`None` for this rank).
    writers: Vec<Option<Mutex<TcpStream>>>,
    readers: Vec<JoinHandle<()>>,
}

impl TcpLink {
    fn start(
        rank: usize,
        peers: Vec<Option<TcpStream>>,
        opts: CommOptions,
    ) -> Result<TcpComm, CommError> {
        let mailbox = Arc::new(Mailbox::default());
        let mut writers = Vec::with_capacity(peers.len());
        let mut readers = Vec::new();
        for (j, s) in peers.into_iter().enumerate() {
            let Some(s) = s else {
                writers.push(None);
                continue;
            };
            let prep = s
                .set_nodelay(true)
                .and_then(|()| s.set_read_timeout(None))
                .and_then(|()| s.set_nonblocking(false))
                .and_then(|()| s.try_clone());
            let rx = prep.map_err(|e| io_err("preparing a peer connection", e))?;
            let mb = Arc::clone(&mailbox);
            let handle = std::thread::Builder::new()
                .name(format!("comm-rx-{rank}<{j}"))
                .spawn(move || read_frames(rx, j, &mb))
                .map_err(|e| io_err("spawning a reader thread", e))?;
            readers.push(handle);
            writers.push(Some(Mutex::new(s)));
        }
        Ok(Communicator::root(Arc::new(TcpLink { rank, mailbox, writers, readers }), opts))
    }
}

impl Link for TcpLink {
    fn world_rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.writers.len()
    }

    fn mailbox(&self) -> &Mailbox {
        &self.mailbox
    }

    fn send(
        &self,
        to: usize,
        comm: u64,
        seq: u64,
        payload: &[u8],
        deadline: Instant,
    ) -> Result<(), LinkError> {
        if let Some(reason) = self.mailbox.gone_reason(to) {
            return Err(LinkError::Gone(reason));
        }
        let Some(Some(w)) = self.writers.get(to) else {
            return Err(LinkError::Gone(format!("no connection to rank {to}")));
        };
        let mut s = w.lock().unwrap_or_else(|p| p.into_inner());
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return Err(LinkError::Stalled);
        }
        let mut header = Vec::with_capacity(HEADER_LEN + payload.len().min(COALESCE));
        header.extend_from_slice(&comm.to_le_bytes());
        header.extend_from_slice(&seq.to_le_bytes());
        header.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        let small = payload.len() <= COALESCE;
        if small {
            header.extend_from_slice(payload);
        }
        let result = s
            .set_write_timeout(Some(remaining))
            .and_then(|()| s.write_all(&header))
            .and_then(|()| if small { Ok(()) } else { s.write_all(payload) });
        result.map_err(|e| {
            // The frame may be half written: this stream cannot be used again.
            let _ = s.shutdown(Shutdown::Both);
            let stalled = matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut);
            let reason = if stalled {
                format!("rank {to} stopped reading (write timed out)")
            } else {
                format!("connection to rank {to} failed: {e}")
            };
            self.mailbox.mark_gone(to, reason.clone());
            if stalled { LinkError::Stalled } else { LinkError::Gone(reason) }
        })
    }
}

impl Drop for TcpLink {
    fn drop(&mut self) {
        for w in self.writers.iter().flatten() {
            let s = w.lock().unwrap_or_else(|p| p.into_inner());
            let _ = s.shutdown(Shutdown::Both);
        }
        for h in self.readers.drain(..) {
            let _ = h.join();
        }
    }
}

/// Reader thread: frames from world rank `src` into `mb` until the connection ends.
fn read_frames(mut s: TcpStream, src: usize, mb: &Mailbox) {
    let reason = loop {
        let mut h = [0u8; HEADER_LEN];
        if let Err(e) = s.read_exact(&mut h) {
            break if e.kind() == io::ErrorKind::UnexpectedEof {
                format!("rank {src} closed its connection")
            } else {
                format!("connection to rank {src} failed: {e}")
            };
        }
        let word = |i: usize| u64::from_le_bytes(h[i * 8..i * 8 + 8].try_into().unwrap_or([0; 8]));
        let (comm, seq, len) = (word(0), word(1), word(2));
        if len > MAX_FRAME {
            break format!("rank {src} sent a corrupt frame ({len} bytes)");
        }
        let mut payload = vec![0u8; len as usize];
        if let Err(e) = s.read_exact(&mut payload) {
            break format!("connection to rank {src} failed mid-frame: {e}");
        }
        mb.deliver(Tag { comm, seq, src }, payload);
    };
    mb.mark_gone(src, reason);
}

#[derive(Debug, Clone, Copy)]
struct Hello {
    rank: usize,
    world: usize,
    port: u16,
    nonce: u64,
}

fn write_hello(s: &mut TcpStream, h: Hello) -> Result<(), CommError> {
    let mut b = Vec::with_capacity(HELLO_LEN);
    b.extend_from_slice(&MAGIC);
    b.extend_from_slice(&(h.rank as u32).to_le_bytes());
    b.extend_from_slice(&(h.world as u32).to_le_bytes());
    b.extend_from_slice(&h.port.to_le_bytes());
    b.extend_from_slice(&h.nonce.to_le_bytes());
    s.write_all(&b).map_err(|e| io_err("sending hello", e))
}

fn read_hello(s: &mut TcpStream, deadline: Instant) -> Result<Hello, CommError> {
    let mut b = [0u8; HELLO_LEN];
    read_until(s, &mut b, deadline, "reading a peer's hello")?;
    if b[..8] != MAGIC {
        return Err(rv_err("a connection that is not a fathom TcpComm peer (bad magic)"));
    }
    let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]) as usize;
    let mut nonce = [0u8; 8];
    nonce.copy_from_slice(&b[18..26]);
    Ok(Hello {
        rank: u32_at(8),
        world: u32_at(12),
        port: u16::from_le_bytes([b[16], b[17]]),
        nonce: u64::from_le_bytes(nonce),
    })
}

fn read_table(
    s: &mut TcpStream,
    world: usize,
    deadline: Instant,
) -> Result<(u64, Vec<String>), CommError> {
    let what = "waiting for rank 0's address table (has every rank joined?)";
    let mut n = [0u8; 8];
    read_until(s, &mut n, deadline, what)?;
    let mut table = Vec::with_capacity(world);
    for _ in 0..world {
        let mut len = [0u8; 2];
        read_until(s, &mut len, deadline, what)?;
        let mut a = vec![0u8; u16::from_le_bytes(len) as usize];
        read_until(s, &mut a, deadline, what)?;
        table.push(String::from_utf8(a).map_err(|_| rv_err("address table is not UTF-8"))?);
    }
    Ok((u64::from_le_bytes(n), table))
}

/// `read_exact` bounded by `deadline`.
fn read_until(
    s: &mut TcpStream,
    buf: &mut [u8],
    deadline: Instant,
    what: &str,
) -> Result<(), CommError> {
    let remaining =
        deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
    s.set_read_timeout(Some(remaining))
        .and_then(|()| s.read_exact(buf))
        .map_err(|e| rv_err(&format!("{what}: {e}")))
}

/// Accepts one connection, or `None` once `deadline` passes.
fn accept_until(l: &TcpListener, deadline: Instant) -> Result<Option<TcpStream>, CommError> {
    l.set_nonblocking(true).map_err(|e| io_err("listener set_nonblocking", e))?;
    loop {
        match l.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false).map_err(|e| io_err("set_nonblocking", e))?;
                return Ok(Some(s));
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    return Ok(None);
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(e) => return Err(io_err("accept", e)),
        }
    }
}

/// Connects to `addr`, retrying (the peer may not be listening yet) until `deadline`.
fn connect_until(addr: &str, deadline: Instant) -> Result<TcpStream, CommError> {
    loop {
        let last = match addr.to_socket_addrs() {
            Ok(mut addrs) => match addrs.next() {
                Some(a) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    match TcpStream::connect_timeout(&a, left.max(Duration::from_millis(1))) {
                        Ok(s) => return Ok(s),
                        Err(e) => e.to_string(),
                    }
                }
                None => format!("{addr} resolves to no address"),
            },
            Err(e) => format!("cannot resolve {addr}: {e}"),
        };
        if Instant::now() >= deadline {
            return Err(rv_err(&format!("cannot connect to {addr}: {last}")));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A session id that differs between runs (time, pid and port), so that a stale peer of an
/// earlier run is never taken into this mesh.
fn make_nonce(l: &TcpListener) -> u64 {
    let t = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let port = l.local_addr().map(|a| a.port()).unwrap_or(0) as u64;
    (t.as_nanos() as u64) ^ ((std::process::id() as u64) << 32) ^ (port << 16) | 1
}

fn rv_err(what: &str) -> CommError {
    CommError::Rendezvous { what: what.to_string() }
}

fn io_err(context: &str, source: io::Error) -> CommError {
    CommError::Io { context: context.to_string(), source }
}
