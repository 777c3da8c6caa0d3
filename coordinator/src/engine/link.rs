//! gRPC to one worker: connecting, PrepareEpoch, and the long-lived Step stream.
//!
//! Owns the transport details (endpoint URLs, connect and per-call timeouts, message limits) so
//! the loop only sees `send`/`recv` of steps. A broken connection or a worker that stops
//! answering surfaces as a [`LinkError`] naming the rank and worker, never as a hang: every wait
//! here is bounded by the timeout the caller passes.

use fathom_proto::v1::worker_client::WorkerClient;
use fathom_proto::v1::{
    Plan, PrepareEpochRequest, PrepareEpochResponse, Rendezvous, StepEvent, StepProgress,
    StepRequest, StepResult, WorkerHealthRequest, WorkerHealthResponse, rendezvous, step_event,
};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;
use tonic::transport::{Channel, Endpoint};

/// Largest message accepted from a worker (step results with extras can be large).
const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// The TCP rendezvous address of an epoch whose rank 0 serves gRPC at `rank0_address`
/// (`host:port`): the same host, and a port free on it when that host is an address of this
/// machine (the coordinator binds port 0 there and releases it); otherwise the rank's gRPC port
/// + 1 (a worker reserves its gRPC port + 1 for collectives).
pub fn rendezvous_address(rank0_address: &str) -> Result<String, String> {
    let (host, port) = rank0_address
        .rsplit_once(':')
        .ok_or_else(|| format!("rank 0 address {rank0_address:?} is not host:port"))?;
    let port: u16 =
        port.parse().map_err(|_| format!("rank 0 address {rank0_address:?} has no valid port"))?;
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    if let Ok(a) = std::net::TcpListener::bind((bare, 0)).and_then(|l| l.local_addr()) {
        return Ok(format!("{host}:{}", a.port()));
    }
    let next = port
        .checked_add(1)
        .ok_or_else(|| format!("rank 0 address {rank0_address:?}: no port above {port}"))?;
    Ok(format!("{host}:{next}"))
}

/// A failure talking to one worker.
#[derive(Debug, Clone, thiserror::Error)]
#[error("worker {worker_id} ({address}): {reason}")]
pub struct LinkError {
    pub worker_id: String,
    pub address: String,
    pub reason: String,
}

/// Opens a channel to `address` (`host:port`), failing after `timeout`.
pub async fn connect(address: &str, timeout: Duration) -> Result<WorkerClient<Channel>, String> {
    let ep = Endpoint::from_shared(format!("http://{address}"))
        .map_err(|e| format!("bad address {address:?}: {e}"))?
        .connect_timeout(timeout)
        .tcp_nodelay(true);
    let ch = tokio::time::timeout(timeout, ep.connect())
        .await
        .map_err(|_| format!("connect timed out after {timeout:?}"))?
        .map_err(|e| format!("connect: {e}"))?;
    Ok(WorkerClient::new(ch)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES))
}

/// Asks a worker for its health, bounded by `timeout`.
pub async fn health(
    client: &mut WorkerClient<Channel>,
    timeout: Duration,
) -> Result<WorkerHealthResponse, String> {
    tokio::time::timeout(timeout, client.health(WorkerHealthRequest {}))
        .await
        .map_err(|_| "health timed out".to_string())?
        .map(|r| r.into_inner())
        .map_err(|s| format!("health: {}", s.message()))
}

/// One rank of the serving epoch.
#[derive(Debug)]
pub struct WorkerLink {
    pub rank: u32,
    pub worker_id: String,
    pub address: String,
    pub client: WorkerClient<Channel>,
    tx: Option<mpsc::Sender<StepRequest>>,
    rx: Option<Streaming<StepEvent>>,
    /// The last progress event the rank sent (for the step watchdog).
    progress: Arc<Mutex<Option<StepProgress>>>,
}

impl WorkerLink {
    pub fn new(
        rank: u32,
        worker_id: String,
        address: String,
        client: WorkerClient<Channel>,
    ) -> Self {
        Self { rank, worker_id, address, client, tx: None, rx: None, progress: Arc::default() }
    }

    /// The last progress the rank reported (shared: readable while a `recv` runs).
    pub fn progress(&self) -> Arc<Mutex<Option<StepProgress>>> {
        self.progress.clone()
    }

    fn err(&self, reason: impl Into<String>) -> LinkError {
        LinkError {
            worker_id: self.worker_id.clone(),
            address: self.address.clone(),
            reason: reason.into(),
        }
    }

    /// PrepareEpoch for this rank, bounded by `timeout`. `rendezvous` is the TCP address rank 0
    /// binds and the others connect to (W > 1).
    pub async fn prepare(
        &mut self,
        plan: Plan,
        rendezvous: Option<String>,
        timeout: Duration,
    ) -> Result<PrepareEpochResponse, LinkError> {
        let rendezvous =
            rendezvous.map(|a| Rendezvous { kind: Some(rendezvous::Kind::TcpAddress(a)) });
        let mut req = tonic::Request::new(PrepareEpochRequest {
            plan: Some(plan),
            rank: self.rank,
            rendezvous,
        });
        crate::telemetry::inject_metadata(&tracing::Span::current(), &mut req);
        match tokio::time::timeout(timeout, self.client.prepare_epoch(req)).await {
            Err(_) => Err(self.err(format!("PrepareEpoch timed out after {timeout:?}"))),
            Ok(Err(s)) => Err(self.err(format!("PrepareEpoch: {}", s.message()))),
            Ok(Ok(r)) => Ok(r.into_inner()),
        }
    }

    /// Opens the step stream.
    pub async fn open_steps(&mut self, timeout: Duration) -> Result<(), LinkError> {
        let (tx, rx) = mpsc::channel::<StepRequest>(4);
        let mut req = tonic::Request::new(ReceiverStream::new(rx));
        crate::telemetry::inject_metadata(&tracing::Span::current(), &mut req);
        let call = self.client.step(req);
        let stream = match tokio::time::timeout(timeout, call).await {
            Err(_) => return Err(self.err("opening the step stream timed out")),
            Ok(Err(s)) => return Err(self.err(format!("step stream: {}", s.message()))),
            Ok(Ok(r)) => r.into_inner(),
        };
        self.tx = Some(tx);
        self.rx = Some(stream);
        Ok(())
    }

    /// Sends one step (does not wait for the answer).
    pub async fn send(&self, step: StepRequest) -> Result<(), LinkError> {
        let tx = self.tx.as_ref().ok_or_else(|| self.err("step stream not open"))?;
        tx.send(step).await.map_err(|_| self.err("step stream closed"))
    }

    /// The next `StepResult` (progress events are recorded, see [`progress`](Self::progress)),
    /// bounded by `timeout`.
    pub async fn recv(&mut self, timeout: Duration) -> Result<StepResult, LinkError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let rx = match self.rx.as_mut() {
                Some(rx) => rx,
                None => return Err(self.err("step stream not open")),
            };
            let msg = tokio::time::timeout_at(deadline, rx.message()).await;
            match msg {
                Err(_) => return Err(self.err(format!("no step result within {timeout:?}"))),
                Ok(Err(s)) => return Err(self.err(format!("step stream failed: {}", s.message()))),
                Ok(Ok(None)) => return Err(self.err("step stream ended")),
                Ok(Ok(Some(StepEvent { kind: Some(step_event::Kind::Result(r)) }))) => {
                    return Ok(r);
                }
                Ok(Ok(Some(StepEvent { kind: Some(step_event::Kind::Progress(p)) }))) => {
                    *self.progress.lock().unwrap_or_else(|e| e.into_inner()) = Some(p);
                }
                Ok(Ok(Some(_))) => continue,
            }
        }
    }
}
