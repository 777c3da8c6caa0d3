//! `fathom checkpoint synth|inspect`: argument parsing and printing only; the work is in
//! `fathom_worker::weights` (synth, reader, inspect) and `fathom_common::tensors`.

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use fathom_common::ModelConfig;
use fathom_worker::weights::inspect::{CheckpointSummary, summarize_checkpoint, summarize_dry};
use fathom_worker::weights::{CheckpointReader, SynthDtype, SynthOptions, synth_checkpoint};
use std::io::Write;
use std::path::PathBuf;

/// Write synthetic checkpoints and inspect checkpoints.
#[derive(Debug, Args)]
pub struct CheckpointArgs {
    #[command(subcommand)]
    command: CheckpointCommand,
}

#[derive(Debug, Subcommand)]
enum CheckpointCommand {
    /// Write a deterministic synthetic checkpoint in the HF DeepSeek-V3.2 format.
    Synth(SynthArgs),
    /// Validate a checkpoint and print params, dtypes, bytes and a per-layer summary.
    Inspect(InspectArgs),
}

#[derive(Debug, Args)]
struct SynthArgs {
    /// Model shape: tiny, small, full or full-width:N.
    #[arg(long)]
    preset: String,
    /// Element format: f32, bf16 or fp8 (e4m3 + 128×128 ue8m0 block scales).
    #[arg(long, default_value = "f32")]
    dtype: SynthDtype,
    /// Seed of the weights; the same seed gives the same values at every dtype.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Output directory (created; earlier shards in it are replaced).
    #[arg(long)]
    out: PathBuf,
    /// Largest shard in MiB.
    #[arg(long, default_value_t = 4096)]
    shard_mb: u64,
    /// Added to the router's e_score_correction_bias of the first experts, so routing favours
    /// them (load-balancing tests).
    #[arg(long, default_value_t = 0.0)]
    router_skew: f32,
    /// How many experts get --router-skew (default: num_experts_per_tok).
    #[arg(long)]
    router_skew_experts: Option<usize>,
    /// Do not write tokenizer.json.
    #[arg(long)]
    no_tokenizer: bool,
}

#[derive(Debug, Args)]
struct InspectArgs {
    /// Checkpoint directory (config.json + safetensors).
    dir: Option<PathBuf>,
    /// With --dry: the preset whose shapes to summarize.
    #[arg(long)]
    preset: Option<String>,
    /// Summarize from shapes alone, without files.
    #[arg(long)]
    dry: bool,
    /// With --dry: the storage to assume (default fp8 for presets with quantization_config,
    /// else f32).
    #[arg(long)]
    dtype: Option<SynthDtype>,
    /// Print one JSON object instead of tables.
    #[arg(long)]
    json: bool,
}

/// Runs `fathom checkpoint ...`.
pub fn run(args: CheckpointArgs) -> Result<()> {
    match args.command {
        CheckpointCommand::Synth(a) => synth(a),
        CheckpointCommand::Inspect(a) => inspect(a),
    }
}

fn synth(a: SynthArgs) -> Result<()> {
    let cfg = ModelConfig::preset(&a.preset)?;
    if !a.router_skew.is_finite() {
        bail!("--router-skew {} is not a finite number", a.router_skew);
    }
    let opts = SynthOptions {
        dtype: a.dtype,
        seed: a.seed,
        shard_bytes: a.shard_mb.max(1) << 20,
        router_skew: a.router_skew,
        router_skew_experts: a.router_skew_experts,
        tokenizer: !a.no_tokenizer,
    };
    let report = synth_with_progress(&cfg, &opts, &a.out)
        .with_context(|| format!("synth {} into {}", a.preset, a.out.display()))?;
    println!(
        "wrote {} tensors, {} in {} file(s) to {}",
        report.tensors,
        human_bytes(report.bytes),
        report.files.len(),
        a.out.display()
    );
    Ok(())
}

/// [`synth_checkpoint`] on a thread while this one shows the bytes written so far against the
/// expected size (a bar on a TTY, periodic lines otherwise).
fn synth_with_progress(
    cfg: &ModelConfig,
    opts: &SynthOptions,
    out: &std::path::Path,
) -> Result<fathom_worker::weights::synth::SynthReport, fathom_worker::weights::WeightsError> {
    let expected = summarize_dry(cfg, String::new(), opts.dtype).total_bytes;
    let mut progress =
        crate::progress::Progress::new("synthesizing the checkpoint", expected, "bytes");
    let written = |dir: &std::path::Path| -> u64 {
        std::fs::read_dir(dir)
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .filter(|e| e.path().extension().is_some_and(|x| x == "safetensors"))
                    .filter_map(|e| e.metadata().ok())
                    .map(|m| m.len())
                    .sum()
            })
            .unwrap_or(0)
    };
    std::thread::scope(|s| {
        let job = s.spawn(|| synth_checkpoint(cfg, opts, out));
        while !job.is_finished() {
            progress.set(written(out));
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
        let result = job.join().unwrap_or_else(|p| std::panic::resume_unwind(p));
        if result.is_ok() {
            progress.finish();
        }
        result
    })
}

fn inspect(a: InspectArgs) -> Result<()> {
    let summary = match (a.dry, a.dir, a.preset) {
        (true, None, Some(preset)) => {
            let cfg = ModelConfig::preset(&preset)?;
            let dtype =
                a.dtype.unwrap_or(if cfg.is_fp8() { SynthDtype::Fp8 } else { SynthDtype::F32 });
            summarize_dry(&cfg, format!("preset {preset}"), dtype)
        }
        (true, _, _) => bail!("--dry takes --preset NAME and no directory"),
        (false, Some(dir), None) => {
            if a.dtype.is_some() {
                bail!("--dtype applies to --dry only");
            }
            let reader = CheckpointReader::open(&dir)?;
            summarize_checkpoint(&reader)
        }
        (false, _, Some(_)) => {
            bail!("--preset needs --dry (inspect a directory or --preset NAME --dry)")
        }
        (false, None, None) => bail!("inspect needs a checkpoint directory or --preset NAME --dry"),
    };
    let mut out = std::io::stdout().lock();
    let printed = if a.json {
        writeln!(out, "{}", serde_json::to_string(&summary)?)
    } else {
        print_summary(&mut out, &summary)
    };
    match printed {
        // A reader that stopped early (`| head`) is not an error.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other?),
    }
}

fn human_bytes(b: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 { format!("{b} B") } else { format!("{v:.2} {}", units[u]) }
}

fn giga(n: u64) -> String {
    if n >= 100_000_000 {
        format!("{:.2} B", n as f64 / 1e9)
    } else {
        format!("{:.3} M", n as f64 / 1e6)
    }
}

fn print_summary(out: &mut impl Write, s: &CheckpointSummary) -> std::io::Result<()> {
    let p = &s.params;
    let what = if s.dry { "dry run, shapes only" } else { "valid" };
    writeln!(out, "{} ({what}{})", s.source, if s.fp8 { ", fp8" } else { "" })?;
    writeln!(
        out,
        "params: main {} ({}), activated per token {}",
        p.main,
        giga(p.main),
        giga(p.main_activated)
    )?;
    if s.has_mtp {
        writeln!(
            out,
            "        MTP {} unique ({}), {} stored with embedding/head copies",
            p.mtp_unique,
            giga(p.mtp_unique),
            giga(p.mtp_stored)
        )?;
    } else {
        writeln!(out, "        no MTP layer stored")?;
    }
    let files = if s.dry { String::new() } else { format!(" in {} file(s)", s.files) };
    writeln!(out, "bytes:  {} ({}){files}", s.total_bytes, human_bytes(s.total_bytes))?;
    writeln!(out)?;
    writeln!(out, "{:<10} {:>8} {:>16} {:>12}", "dtype", "tensors", "elements", "bytes")?;
    for (d, t) in &s.dtypes {
        writeln!(out, "{d:<10} {:>8} {:>16} {:>12}", t.tensors, t.elements, human_bytes(t.bytes))?;
    }
    writeln!(out)?;
    writeln!(
        out,
        "{:<6} {:<6} {:>16} {:>12} {:>8}",
        "layer", "kind", "params", "bytes", "tensors"
    )?;
    for l in &s.layers {
        let layer = l.layer.map(|l| l.to_string()).unwrap_or_else(|| "-".into());
        writeln!(
            out,
            "{layer:<6} {:<6} {:>16} {:>12} {:>8}",
            l.kind,
            l.params,
            human_bytes(l.bytes),
            l.tensors
        )?;
    }
    Ok(())
}
