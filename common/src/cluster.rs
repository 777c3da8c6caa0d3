//! The cluster config file: what `fathom coordinator --config` and `fathom worker --config` read,
//! and exactly what the Helm chart's ConfigMap holds (TOML).
//!
//! One file serves both roles; each reads its own section plus the shared ones. Every field has
//! a default so a minimal file is a few lines; unknown keys are rejected so that a typo in a
//! chart value is an error, not a silently ignored setting. Command-line flags override the
//! file (done by the binary, not here).
//!
//! ```toml
//! cluster = "prod"                      # etcd keys live under /fathom/<cluster>/
//! [model]
//! path = "/models/DeepSeek-V3.2"
//! [parallel]
//! world_size = 16
//! tp = 8
//! [membership]
//! etcd_endpoints = ["http://fathom-etcd:2379"]
//! ```

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Errors reading a cluster config file.
#[derive(Debug, thiserror::Error)]
pub enum ClusterConfigError {
    #[error("cannot read cluster config {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("malformed cluster config {path}: {message}")]
    Parse { path: String, message: String },
    #[error("invalid cluster config: {key}: {reason}")]
    Invalid { key: &'static str, reason: String },
}

/// The whole file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// Cluster name; etcd keys live under `/fathom/<cluster>/`.
    #[serde(default = "default_cluster")]
    pub cluster: String,
    #[serde(default)]
    pub model: ModelSection,
    #[serde(default)]
    pub parallel: ParallelSection,
    #[serde(default)]
    pub membership: MembershipSection,
    #[serde(default)]
    pub coordinator: CoordinatorSection,
    #[serde(default)]
    pub worker: WorkerSection,
}

fn default_cluster() -> String {
    "default".into()
}

/// Where the checkpoint is (the same path on every worker).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// HF DeepSeek-V3.2 directory (`config.json`, safetensors, `tokenizer.json`).
    #[serde(default)]
    pub path: PathBuf,
}

/// The parallel layout (ARCHITECTURE §2).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParallelSection {
    /// W: ranks (one per GPU) in the world.
    #[serde(default = "one")]
    pub world_size: usize,
    /// T: ranks per tensor-parallel attention group; divides W.
    #[serde(default = "one")]
    pub tp: usize,
    /// Extra expert slots per rank beyond the even share, for redundant replicas.
    #[serde(default)]
    pub redundant_slots_per_rank: usize,
    /// Redundant replicas per MoE layer the first plan places (the `experts set redundant N`
    /// policy with no load measured yet); unset fills every redundant slot. Must fit in the
    /// `world_size · redundant_slots_per_rank` slots (checked when the plan is built).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redundant_experts: Option<usize>,
    /// Pinned replica counts: `{ "3:17" = 2 }` gives expert 17 of layer 3 two replicas;
    /// `"*:17"` applies to every MoE layer.
    #[serde(default)]
    pub pinned_replicas: std::collections::BTreeMap<String, usize>,
    /// Elastic growth (issue 9): workers that register while serving join at the next epoch
    /// boundary as new ranks (T at a time) with redundant replica slots, up to this many ranks.
    /// Unset: `world_size` (no growth beyond the configured world; a world that shrank still
    /// grows back to it). A multiple of `tp`, at least `world_size`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_world_size: Option<usize>,
    /// Elastic shrink (issue 10): when a rank is lost and no spare can replace it, the next epoch
    /// runs on the surviving ranks (whole groups) if they still hold every expert and are at
    /// least this many; otherwise the cluster waits for a replacement. Unset: `tp` (shrink to
    /// any covered world); set it to `world_size` to always wait for a replacement. A multiple
    /// of `tp`, at most `world_size`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_world_size: Option<usize>,
}

impl ParallelSection {
    /// The largest world an epoch may have (`max_world_size`, default `world_size`).
    pub fn max_world(&self) -> usize {
        self.max_world_size.unwrap_or(self.world_size).max(self.world_size)
    }

    /// The smallest world a shrunk epoch may have (`min_world_size`, default `tp`).
    pub fn min_world(&self) -> usize {
        self.min_world_size.unwrap_or(self.tp).max(1)
    }
}

fn one() -> usize {
    1
}

impl Default for ParallelSection {
    fn default() -> Self {
        Self {
            world_size: 1,
            tp: 1,
            redundant_slots_per_rank: 0,
            redundant_experts: None,
            pinned_replicas: Default::default(),
            max_world_size: None,
            min_world_size: None,
        }
    }
}

/// Membership store.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MembershipSection {
    /// etcd client URLs; empty means the in-memory store (single host only).
    #[serde(default)]
    pub etcd_endpoints: Vec<String>,
    /// Worker lease TTL; keep-alive runs at TTL/2.
    #[serde(default = "default_ttl")]
    pub lease_ttl_s: u64,
}

fn default_ttl() -> u64 {
    10
}

impl Default for MembershipSection {
    fn default() -> Self {
        Self { etcd_endpoints: Vec::new(), lease_ttl_s: default_ttl() }
    }
}

/// Coordinator role.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoordinatorSection {
    /// gRPC listen address (Inference, Admin, health, reflection).
    #[serde(default = "default_coord_listen")]
    pub listen: String,
    /// Address workers use to reach the coordinator (defaults to `listen`).
    #[serde(default)]
    pub advertise: Option<String>,
    /// Prometheus `/metrics` listen address; empty disables.
    #[serde(default)]
    pub metrics_listen: String,
    /// OpenAI-compatible HTTP listen address; empty disables.
    #[serde(default)]
    pub http_listen: String,
    /// Requests waiting for admission beyond this are answered RESOURCE_EXHAUSTED.
    #[serde(default = "default_queue")]
    pub max_queue: usize,
    /// Tokens per scheduler step (prefill chunks + decodes) per attention group.
    #[serde(default = "default_step_tokens")]
    pub max_step_tokens: usize,
    /// Sequences per step per attention group.
    #[serde(default = "default_batch")]
    pub max_batch: usize,
    /// KV cache block size in tokens.
    #[serde(default = "default_block")]
    pub kv_block_size: usize,
    /// KV blocks per attention group (each rank of the group holds them all).
    #[serde(default = "default_blocks")]
    pub kv_blocks: usize,
    /// Admin API token; when unset the Admin service refuses every call.
    #[serde(default)]
    pub admin_token: Option<String>,
    /// Steps (with tokens) the expert-load window covers (`fathom admin experts load`).
    #[serde(default = "default_expert_window")]
    pub expert_load_window_steps: usize,
}

fn default_coord_listen() -> String {
    "0.0.0.0:50051".into()
}
fn default_queue() -> usize {
    1024
}
fn default_step_tokens() -> usize {
    2048
}
fn default_batch() -> usize {
    256
}
fn default_block() -> usize {
    64
}
fn default_blocks() -> usize {
    4096
}
fn default_expert_window() -> usize {
    256
}

impl Default for CoordinatorSection {
    fn default() -> Self {
        toml::from_str("").expect("defaults")
    }
}

/// Worker role.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerSection {
    /// Worker gRPC listen address.
    #[serde(default = "default_worker_listen")]
    pub listen: String,
    /// Address the coordinator and peers use to reach this worker (defaults to `listen`).
    #[serde(default)]
    pub advertise: Option<String>,
    /// `cpu` or `cuda[:N]`.
    #[serde(default = "default_device")]
    pub device: String,
    /// Collective backend between ranks: `tcp` (CPU) or `nccl` (GPU).
    #[serde(default = "default_comm")]
    pub comm: String,
    /// Prometheus `/metrics` listen address; empty disables.
    #[serde(default)]
    pub metrics_listen: String,
    /// A step that does not finish within this many seconds is reported by the watchdog.
    #[serde(default = "default_step_deadline")]
    pub step_deadline_s: u64,
}

fn default_worker_listen() -> String {
    "0.0.0.0:50061".into()
}
fn default_device() -> String {
    "cpu".into()
}
fn default_comm() -> String {
    "tcp".into()
}
fn default_step_deadline() -> u64 {
    30
}

impl Default for WorkerSection {
    fn default() -> Self {
        toml::from_str("").expect("defaults")
    }
}

impl ClusterConfig {
    /// Parses TOML text; `origin` names the source in errors.
    pub fn from_toml_str(text: &str, origin: &str) -> Result<Self, ClusterConfigError> {
        let cfg: ClusterConfig = toml::from_str(text).map_err(|e| ClusterConfigError::Parse {
            path: origin.into(),
            message: e.to_string().trim().replace('\n', " "),
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads and validates a file.
    pub fn from_file(path: &Path) -> Result<Self, ClusterConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ClusterConfigError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_toml_str(&text, &path.display().to_string())
    }

    /// Serializes to TOML.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("ClusterConfig serializes")
    }

    /// Checks the rules that need no model config (those that do live in `ParallelPlan`).
    pub fn validate(&self) -> Result<(), ClusterConfigError> {
        let bad = |key, reason: String| Err(ClusterConfigError::Invalid { key, reason });
        if self.cluster.is_empty() || self.cluster.contains('/') {
            return bad("cluster", format!("{:?} must be non-empty without '/'", self.cluster));
        }
        let p = &self.parallel;
        if p.world_size == 0 {
            return bad("parallel.world_size", "must be >= 1".into());
        }
        if p.tp == 0 || p.world_size % p.tp != 0 {
            return bad("parallel.tp", format!("{} must divide world_size {}", p.tp, p.world_size));
        }
        if let Some(m) = p.max_world_size
            && (m < p.world_size || m % p.tp != 0)
        {
            return bad(
                "parallel.max_world_size",
                format!("{m} must be >= world_size {} and a multiple of tp {}", p.world_size, p.tp),
            );
        }
        if let Some(m) = p.min_world_size
            && (m == 0 || m > p.world_size || m % p.tp != 0)
        {
            return bad(
                "parallel.min_world_size",
                format!(
                    "{m} must be in 1..=world_size {} and a multiple of tp {}",
                    p.world_size, p.tp
                ),
            );
        }
        if self.membership.lease_ttl_s < 2 {
            return bad("membership.lease_ttl_s", "must be >= 2 (keep-alive runs at TTL/2)".into());
        }
        let c = &self.coordinator;
        if c.kv_block_size == 0 || c.kv_blocks == 0 {
            return bad("coordinator.kv_blocks", "kv_block_size and kv_blocks must be >= 1".into());
        }
        if c.expert_load_window_steps == 0 {
            return bad("coordinator.expert_load_window_steps", "must be >= 1".into());
        }
        if let Some(n) = p.redundant_experts
            && n > p.world_size * p.redundant_slots_per_rank
        {
            return bad(
                "parallel.redundant_experts",
                format!(
                    "{n} redundant replicas do not fit in world_size {} x redundant_slots_per_rank {}",
                    p.world_size, p.redundant_slots_per_rank
                ),
            );
        }
        if c.max_step_tokens == 0 || c.max_batch == 0 {
            return bad(
                "coordinator.max_step_tokens",
                "max_step_tokens and max_batch must be >= 1".into(),
            );
        }
        let d = &self.worker.device;
        let device_ok = d == "cpu"
            || d == "cuda"
            || d.strip_prefix("cuda:").is_some_and(|n| n.parse::<u32>().is_ok());
        if !device_ok {
            return bad("worker.device", format!("{d:?} must be cpu, cuda or cuda:N"));
        }
        if !matches!(self.worker.comm.as_str(), "tcp" | "nccl" | "local") {
            return bad(
                "worker.comm",
                format!("{:?} must be tcp, nccl or local", self.worker.comm),
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_defaults() {
        let c = ClusterConfig::from_toml_str("", "t").unwrap();
        assert_eq!(c.parallel.world_size, 1);
        assert_eq!(c.coordinator.kv_block_size, 64);
        assert_eq!(c.worker.device, "cpu");
    }

    #[test]
    fn round_trip() {
        let mut c = ClusterConfig::from_toml_str("", "t").unwrap();
        c.parallel.world_size = 16;
        c.parallel.tp = 8;
        c.parallel.pinned_replicas.insert("*:3".into(), 2);
        c.parallel.redundant_slots_per_rank = 2;
        c.parallel.redundant_experts = Some(4);
        c.parallel.max_world_size = Some(24);
        c.parallel.min_world_size = Some(8);
        c.coordinator.expert_load_window_steps = 64;
        c.membership.etcd_endpoints = vec!["http://etcd:2379".into()];
        let back = ClusterConfig::from_toml_str(&c.to_toml(), "t").unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn unknown_key_and_bad_layout_are_errors() {
        let e = ClusterConfig::from_toml_str("[parallel]\nworld_sise = 2\n", "x.toml").unwrap_err();
        assert!(e.to_string().contains("world_sise"), "{e}");
        let e =
            ClusterConfig::from_toml_str("[parallel]\nworld_size = 6\ntp = 4\n", "x").unwrap_err();
        assert!(e.to_string().contains("parallel.tp"), "{e}");
        let e = ClusterConfig::from_toml_str("[worker]\ndevice = \"tpu\"\n", "x").unwrap_err();
        assert!(e.to_string().contains("worker.device"), "{e}");
        let e = ClusterConfig::from_toml_str(
            "[parallel]\nworld_size = 2\nredundant_slots_per_rank = 1\nredundant_experts = 3\n",
            "x",
        )
        .unwrap_err();
        assert!(e.to_string().contains("parallel.redundant_experts"), "{e}");
        let elastic = |k: &str, v: usize| {
            ClusterConfig::from_toml_str(
                &format!("[parallel]\nworld_size = 4\ntp = 2\n{k} = {v}\n"),
                "x",
            )
        };
        for (k, v) in [
            ("max_world_size", 2),
            ("max_world_size", 7),
            ("min_world_size", 6),
            ("min_world_size", 3),
            ("min_world_size", 0),
        ] {
            let e = elastic(k, v).unwrap_err();
            assert!(e.to_string().contains(&format!("parallel.{k}")), "{k} = {v}: {e}");
        }
        let c = elastic("max_world_size", 8).unwrap();
        assert_eq!((c.parallel.max_world(), c.parallel.min_world()), (8, 2));
        let c = elastic("min_world_size", 4).unwrap();
        assert_eq!((c.parallel.max_world(), c.parallel.min_world()), (4, 4));
    }
}
