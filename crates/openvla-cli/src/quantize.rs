//! `openvla quantize`: write an int8 or int4 copy of a model directory.

use anyhow::{Context, Result};
use openvla::quant::Quantization;
use std::path::PathBuf;

/// Arguments of `openvla quantize`.
#[derive(clap::Args)]
pub struct QuantizeArgs {
    /// HF model directory to quantize (bf16/f16/f32 safetensors).
    #[arg(long)]
    model: PathBuf,
    /// Output directory (created; must not exist or be empty).
    #[arg(long)]
    out: PathBuf,
    /// int8 (q8_0 everywhere) or int4 (q4_0 LLM decoder layers, q8_0 elsewhere).
    #[arg(long)]
    format: Quantization,
}

/// Runs `openvla quantize`.
pub fn run(a: QuantizeArgs) -> Result<()> {
    let bar = crate::progress::Progress::new("quantizing");
    let cb = |d: u64, t: u64| bar.update(d, t);
    let t0 = std::time::Instant::now();
    let report = openvla::quantize::quantize_model_dir(&a.model, &a.out, a.format, Some(&cb))
        .with_context(|| format!("quantizing {} into {}", a.model.display(), a.out.display()))?;
    bar.finish();
    let matrices: Vec<String> = report
        .matrices
        .iter()
        .map(|(f, n)| format!("{n} {f}"))
        .collect();
    eprintln!(
        "wrote {} ({}: {} matrices; {} -> {}) in {:.1} s",
        a.out.display(),
        report.quantization,
        matrices.join(", "),
        crate::human_bytes(report.source_bytes),
        crate::human_bytes(report.output_bytes),
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}
