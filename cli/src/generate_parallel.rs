//! `fathom generate --world-size W --tp T --comm local|tcp` (CLI.md): the sharded model of
//! `fathom_worker::parallel` in this machine's processes, and the hidden `fathom rank`
//! subcommand that runs one rank of a `--comm tcp` world.
//!
//! - `local`: W threads of this process over `LocalComm`.
//! - `tcp`: this process is rank 0; it binds a rendezvous on `127.0.0.1:0` and starts W-1
//!   child processes `fathom rank --rendezvous ADDR --rank R ...` (explicit flags, no
//!   environment), which connect with `TcpComm`. A child that fails or dies makes rank 0's
//!   collectives fail naming it; the parent then kills the children it started and reports.
//!   Children open the checkpoint with the mmap `CheckpointReader`, so each reads only its own
//!   tensors (rank 0 uses what `generate` already loaded).
//!
//! Group 0 generates the request; with D = W/T > 1 the other groups step with empty batches
//! (they serve their experts). Greedy or seeded sampling (identical on every rank).

use anyhow::{Context, Result, anyhow, bail};
use fathom_common::ModelConfig;
use fathom_common::ids::{Epoch, Rank};
use fathom_common::plan::{ParallelPlan, PlanSpec};
use fathom_kernels::comm::{Collective, CommOptions, TcpComm, TcpRendezvous};
use fathom_worker::parallel::{GenerateRequest, RankModel, generate_on_rank, run_local};
use fathom_worker::sampling::SamplingParams;
use fathom_worker::weights::TensorSource;
use fathom_worker::weights::reader::CheckpointReader;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

/// Transport between the ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CommKind {
    Local,
    Tcp,
}

/// The parallel flags of `fathom generate`.
#[derive(Debug, Clone, clap::Args)]
pub struct ParallelArgs {
    /// W: ranks (threads with --comm local, processes with --comm tcp).
    #[arg(long, default_value_t = 1)]
    pub world_size: usize,
    /// T: ranks per attention group (default: W, i.e. TP attention + EP).
    #[arg(long)]
    pub tp: Option<usize>,
    /// How the ranks talk.
    #[arg(long, value_enum, default_value_t = CommKind::Local)]
    pub comm: CommKind,
    /// Redundant expert slots per rank (replicas of hot experts).
    #[arg(long, default_value_t = 0)]
    pub redundant_slots: usize,
    /// Deadline of each collective, in seconds.
    #[arg(long, default_value_t = 30)]
    pub comm_timeout_s: u64,
    /// Testing (`--comm tcp`): `R:exit` or `R:sleep:SECONDS` makes child rank R die or stall
    /// after joining the world.
    #[arg(long, hide = true)]
    pub fault: Option<String>,
}

impl ParallelArgs {
    /// Whether the sharded path is asked for (anything but the one-rank default).
    pub fn is_parallel(&self) -> bool {
        self.world_size != 1 || self.tp.is_some_and(|t| t != 1) || self.comm != CommKind::Local
    }
}

/// What one generation needs besides the model.
#[derive(Debug, Clone)]
pub struct Job {
    pub prompt_ids: Vec<u32>,
    pub max_new_tokens: usize,
    pub stop_ids: Vec<u32>,
    pub block_size: usize,
    pub record_routing: bool,
    /// Sampling of every step (greedy or seeded; every rank of the group draws the same).
    pub sampling: SamplingParams,
}

/// What group 0's sequence got: ids, the logits of each step, routed experts per position fed.
pub type Generated = (Vec<u32>, Vec<Vec<f32>>, Vec<Vec<Vec<u32>>>);

fn plan_for(cfg: &ModelConfig, w: usize, t: usize, redundant: usize) -> Result<ParallelPlan> {
    let mut spec = PlanSpec::new(Epoch(0), w, t);
    spec.redundant_slots_per_rank = redundant;
    ParallelPlan::build(&spec, cfg).with_context(|| format!("parallel plan W={w} T={t}"))
}

fn requests(job: &Job, d: usize, prompt_here: bool) -> Vec<GenerateRequest> {
    (0..d)
        .map(|g| GenerateRequest {
            prompts: if g == 0 && prompt_here { vec![job.prompt_ids.clone()] } else { Vec::new() },
            max_new_tokens: job.max_new_tokens,
            sampling: job.sampling,
            stop_ids: job.stop_ids.clone(),
            keep_logits: true,
            record_routing: job.record_routing,
            block_size: job.block_size,
        })
        .collect()
}

fn comm_options(timeout_s: u64) -> CommOptions {
    CommOptions { timeout: Duration::from_secs(timeout_s.max(1)), ..CommOptions::default() }
}

/// Runs `job` sharded over `args.world_size` ranks; `model_dir` is what tcp children load.
pub fn generate(
    args: &ParallelArgs,
    model_dir: &Path,
    cfg: &ModelConfig,
    src: &dyn TensorSource,
    job: &Job,
) -> Result<Generated> {
    let w = args.world_size;
    let t = args.tp.unwrap_or(w);
    let plan = plan_for(cfg, w, t, args.redundant_slots)?;
    let opts = comm_options(args.comm_timeout_s);
    let out = match args.comm {
        CommKind::Local => {
            let outs = run_local(cfg, src, &plan, &requests(job, plan.num_groups(), true), opts)?;
            outs.into_iter().next().ok_or_else(|| anyhow!("no output from group 0"))?
        }
        CommKind::Tcp => {
            let rv = TcpRendezvous::bind("127.0.0.1:0")?;
            let addr = rv.local_addr()?.to_string();
            let mut children = Children(Vec::new());
            for r in 1..w {
                let child = Command::new(std::env::current_exe()?)
                    .args(rank_argv(args, model_dir, job, &addr, r, t))
                    .spawn()
                    .with_context(|| format!("starting rank {r}"))?;
                children.0.push((r, child));
            }
            let mut world =
                rv.into_comm(w, CommOptions { connect_timeout: opts.connect_timeout, ..opts })?;
            let result = run_rank(cfg, src, &plan, &mut world, job, true);
            drop(world);
            let out = match result {
                Ok(o) => o,
                Err(e) => {
                    children.kill_all();
                    return Err(e);
                }
            };
            children.wait_all()?;
            out
        }
    };
    let generated = out.generated.into_iter().next().unwrap_or_default();
    let logits = out.logits.into_iter().next().unwrap_or_default();
    let routed = out.routed_experts.into_iter().next().unwrap_or_default();
    Ok((generated, logits, routed))
}

/// One rank over an established world communicator: load, split, generate.
fn run_rank(
    cfg: &ModelConfig,
    src: &dyn TensorSource,
    plan: &ParallelPlan,
    world: &mut TcpComm,
    job: &Job,
    prompt_here: bool,
) -> Result<fathom_worker::parallel::GenerateOutput> {
    let rank = world.rank();
    let model = RankModel::load(cfg.clone(), src, plan, rank)?;
    let mut group =
        world.split(&plan.groups())?.ok_or_else(|| anyhow!("rank {rank} is in no group"))?;
    let g = plan.group_of(Rank(rank as u32));
    let req = requests(job, plan.num_groups(), prompt_here).swap_remove(g);
    Ok(generate_on_rank(&model, world, group.as_mut(), &req)?)
}

fn rank_argv(
    args: &ParallelArgs,
    model_dir: &Path,
    job: &Job,
    rendezvous: &str,
    rank: usize,
    tp: usize,
) -> Vec<String> {
    let csv = |v: &[u32]| v.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
    let mut argv: Vec<String> = vec![
        "rank".into(),
        "--model".into(),
        model_dir.display().to_string(),
        "--rendezvous".into(),
        rendezvous.into(),
        "--rank".into(),
        rank.to_string(),
        "--world-size".into(),
        args.world_size.to_string(),
        "--tp".into(),
        tp.to_string(),
        "--redundant-slots".into(),
        args.redundant_slots.to_string(),
        "--comm-timeout-s".into(),
        args.comm_timeout_s.to_string(),
        "--prompt-ids".into(),
        csv(&job.prompt_ids),
        "--max-new-tokens".into(),
        job.max_new_tokens.to_string(),
        "--stop-ids".into(),
        csv(&job.stop_ids),
        "--block-size".into(),
        job.block_size.to_string(),
        "--temperature".into(),
        job.sampling.temperature.to_string(),
        "--top-p".into(),
        job.sampling.top_p.to_string(),
        "--top-k".into(),
        job.sampling.top_k.to_string(),
        "--seed".into(),
        job.sampling.seed.to_string(),
    ];
    if job.record_routing {
        // The group gathers routing only when every member records it.
        argv.push("--record-routing".into());
    }
    if let Some(f) = args.fault.as_deref().and_then(|f| f.strip_prefix(&format!("{rank}:"))) {
        argv.extend(["--fault".into(), f.to_string()]);
    }
    argv
}

/// Children started by this process; killed (by their own ids) unless waited for.
struct Children(Vec<(usize, Child)>);

impl Children {
    fn kill_all(&mut self) {
        for (_, c) in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.0.clear();
    }

    fn wait_all(&mut self) -> Result<()> {
        let mut failed = Vec::new();
        for (r, c) in &mut self.0 {
            let status = c.wait()?;
            if !status.success() {
                failed.push(format!("rank {r} exited with {status}"));
            }
        }
        self.0.clear();
        if !failed.is_empty() {
            bail!("{}", failed.join("; "));
        }
        Ok(())
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        self.kill_all();
    }
}

/// `fathom rank`: one rank of a `--comm tcp` world (started by `fathom generate`).
#[derive(Debug, clap::Args)]
pub struct RankArgs {
    #[arg(long)]
    model: PathBuf,
    /// Rank 0's rendezvous address.
    #[arg(long)]
    rendezvous: String,
    #[arg(long)]
    rank: usize,
    #[arg(long)]
    world_size: usize,
    #[arg(long)]
    tp: usize,
    #[arg(long, default_value_t = 0)]
    redundant_slots: usize,
    #[arg(long, default_value_t = 30)]
    comm_timeout_s: u64,
    #[arg(long)]
    prompt_ids: String,
    #[arg(long)]
    max_new_tokens: usize,
    #[arg(long, default_value = "")]
    stop_ids: String,
    #[arg(long)]
    block_size: usize,
    /// Sampling, as rank 0 was given it (every rank of a group draws the same token).
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    #[arg(long, default_value_t = 0)]
    top_k: u32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Record routed experts (must match rank 0's --return-routed-experts).
    #[arg(long)]
    record_routing: bool,
    /// Testing: exit right after joining the world, or sleep this many seconds before the first
    /// step (a dead or stalled rank).
    #[arg(long, hide = true)]
    fault: Option<String>,
}

fn parse_csv(flag: &str, s: &str) -> Result<Vec<u32>> {
    s.split(',')
        .map(str::trim)
        .filter(|x| !x.is_empty())
        .map(|x| x.parse().map_err(|_| anyhow!("{flag}: {x:?} is not a token id")))
        .collect()
}

pub fn run_rank_cmd(a: RankArgs) -> Result<()> {
    // Memory-mapped: this rank reads only the bytes of its own tensors and slices.
    let src = CheckpointReader::open(&a.model)?;
    let cfg = src.config().clone();
    let plan = plan_for(&cfg, a.world_size, a.tp, a.redundant_slots)?;
    let job = Job {
        prompt_ids: parse_csv("--prompt-ids", &a.prompt_ids)?,
        max_new_tokens: a.max_new_tokens,
        stop_ids: parse_csv("--stop-ids", &a.stop_ids)?,
        block_size: a.block_size,
        record_routing: a.record_routing,
        sampling: SamplingParams {
            temperature: a.temperature,
            top_p: a.top_p,
            top_k: a.top_k,
            seed: a.seed,
            ..SamplingParams::greedy()
        },
    };
    let opts = comm_options(a.comm_timeout_s);
    let mut world = TcpComm::connect(&a.rendezvous, a.rank, a.world_size, opts)
        .with_context(|| format!("rank {} joining {}", a.rank, a.rendezvous))?;
    match a.fault.as_deref() {
        None => {}
        Some("exit") => std::process::exit(3),
        Some(s) => {
            let secs: u64 = s
                .strip_prefix("sleep:")
                .and_then(|x| x.parse().ok())
                .ok_or_else(|| anyhow!("--fault {s:?}: expected exit or sleep:SECONDS"))?;
            std::thread::sleep(Duration::from_secs(secs));
        }
    }
    run_rank(&cfg, &src, &plan, &mut world, &job, true)
        .with_context(|| format!("rank {}", a.rank))?;
    Ok(())
}
