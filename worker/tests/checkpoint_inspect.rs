//! `inspect` summaries: the dry count of the 671B preset equals spec §1, and a real checkpoint's
//! summary agrees with the dry summary of its preset.

use fathom_common::ModelConfig;
use fathom_worker::weights::inspect::{summarize_checkpoint, summarize_dry};
use fathom_worker::weights::{CheckpointReader, SynthDtype, SynthOptions, synth_checkpoint};

#[test]
fn dry_full_matches_spec_parameter_counts() {
    let s = summarize_dry(&ModelConfig::full(), "preset full".into(), SynthDtype::Fp8);
    // spec §1: main ≈ 671.88 B, MTP ≈ 11.6 B unique.
    assert_eq!(s.params.main, 671_877_944_064);
    assert_eq!(format!("{:.2}", s.params.main as f64 / 1e9), "671.88");
    assert_eq!(format!("{:.1}", s.params.mtp_unique as f64 / 1e9), "11.6");
    assert!(s.has_mtp && s.fp8 && s.dry);
    // 61 main layers + 1 MTP layer + the non-layer row.
    assert_eq!(s.layers.len(), 63);
    assert_eq!(s.layers.iter().filter(|l| l.kind == "dense").count(), 3);
    assert_eq!(s.layers.iter().filter(|l| l.kind == "moe").count(), 58);
    assert_eq!(s.layers[61].kind, "mtp");
    assert_eq!(s.layers[62].kind, "other");
    // MoE layer: 11,320,164,608 (spec) + MLA 187,107,328 + indexer 13,959,424 + 2 norms.
    assert_eq!(s.layers[3].params, 11_320_164_608 + 187_107_328 + 13_959_424 + 2 * 7168);
    // Storage: FP8 weights are 1 byte per element, so the checkpoint is ≈ 690 GB.
    let f8 = &s.dtypes["F8_E4M3"];
    assert!(f8.elements > 670_000_000_000, "{}", f8.elements);
    assert!((680e9..700e9).contains(&(s.total_bytes as f64)), "{}", s.total_bytes);
    let full_width =
        summarize_dry(&ModelConfig::preset("full-width:2").unwrap(), "fw2".into(), SynthDtype::Fp8);
    assert_eq!(full_width.params.mtp_unique, 0);
    assert!((14e9..17e9).contains(&(full_width.total_bytes as f64)), "{}", full_width.total_bytes);
}

#[test]
fn checkpoint_summary_agrees_with_dry_summary() {
    for dtype in [SynthDtype::F32, SynthDtype::Fp8] {
        let dir = tempfile::tempdir().unwrap();
        let cfg = ModelConfig::tiny();
        let opts = SynthOptions { dtype, shard_bytes: 100 << 10, ..Default::default() };
        let report = synth_checkpoint(&cfg, &opts, dir.path()).unwrap();
        let r = CheckpointReader::open(dir.path()).unwrap();
        let real = summarize_checkpoint(&r);
        let dry = summarize_dry(&cfg, "tiny".into(), dtype);
        assert_eq!(real.params, dry.params);
        assert_eq!(real.total_bytes, dry.total_bytes);
        assert_eq!(real.total_bytes, report.bytes);
        assert_eq!(real.dtypes, dry.dtypes);
        assert_eq!(real.layers, dry.layers);
        assert_eq!(real.files, report.files.len());
        assert!(real.files > 1);
        // Sum over layers = whole.
        assert_eq!(real.layers.iter().map(|l| l.bytes).sum::<u64>(), real.total_bytes);
        assert_eq!(
            real.layers.iter().map(|l| l.params).sum::<u64>(),
            real.params.main + real.params.mtp_stored
        );
    }
}
