//! Makes a *trained* tiny OpenVLA for quantization-accuracy measurements: LoRA (r=32,
//! all-linear) on the first frame of each of the 16 fractal episodes in `testdata/data` until
//! every action token is right, then `extra` more steps. Writes `<out>/adapter/` (PEFT, with
//! the episodes' `dataset_statistics.json`) and `<out>/pairs/` (the 16 frames and instructions
//! in the `openvla bench --dump-pairs` format).
//!
//! ```text
//! cargo run --release -p openvla-train --example memorize_fractal -- bench-models/tiny-trained 15
//! openvla merge --model models/openvla-tiny --adapter bench-models/tiny-trained/adapter --out bench-models/tiny-trained/model --recipe float32
//! openvla bench --model bench-models/tiny-trained/model --runs 0 --configs bf16,int8,int4 --accuracy 16 --accuracy-pairs bench-models/tiny-trained/pairs
//! ```

use anyhow::{bail, Context, Result};
use candle_core::Device;
use openvla::processor::PromptTokenizer;
use openvla_data::source::DatasetSource;
use openvla_data::stats::{StatisticsFile, StatsAccumulator};
use openvla_train::batch::ExampleBuilder;
use openvla_train::data::first_frames;
use openvla_train::lora::targets::{select_targets, OPENVLA_OUTPUT_EMBEDDING};
use openvla_train::lora::{LoraAdapter, LoraConfig, TargetModules};
use openvla_train::model::{LoadTrainOptions, OpenVlaTrain, WeightStorage};
use openvla_train::optim::{AdamW, AdamWConfig};
use openvla_train::rng::TrainRng;
use openvla_train::seam::{make_batch, TrainModel, VlaObjective, VlaSample};
use openvla_train::trainer::Objective;
use openvla_train::TrainMode;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let out = PathBuf::from(
        args.next()
            .context("usage: memorize_fractal OUT_DIR [EXTRA_STEPS]")?,
    );
    let extra: usize = match args.next() {
        Some(s) => s
            .parse()
            .with_context(|| format!("EXTRA_STEPS {s:?} is not a number"))?,
        None => 15,
    };
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let tiny = root.join("models/openvla-tiny");
    let data = root.join("testdata/data/rlds/fractal20220817_data");
    std::fs::create_dir_all(out.join("pairs"))?;

    let source = DatasetSource::open(&data, None, None)?;
    let stats = source.compute_statistics("all", false, None, None, StatsAccumulator::new())?;
    let mut stats_file = StatisticsFile::new();
    stats_file.insert(source.name().to_string(), stats.clone());
    let pre = openvla_image::PreprocessorConfig::from_file(&tiny.join("preprocessor_config.json"))?;
    let (mut samples, mut list) = (Vec::new(), Vec::new());
    for s in first_frames(&source, stats, 16)? {
        let name = format!("pair_{:03}.ppm", samples.len());
        let mut ppm = format!("P6\n{} {}\n255\n", s.image.width, s.image.height).into_bytes();
        ppm.extend_from_slice(&s.image.data);
        std::fs::write(out.join("pairs").join(&name), ppm)?;
        list.push(serde_json::json!({"image": name, "instruction": s.instruction}));
        let img = openvla_image::RgbImage::from_raw(s.image.width, s.image.height, s.image.data)?;
        samples.push(VlaSample {
            pixel_values: openvla_image::preprocess(&img, &pre)?,
            instruction: s.instruction,
            action: s.action,
        });
    }
    std::fs::write(
        out.join("pairs/pairs.json"),
        serde_json::to_string_pretty(&list)?,
    )?;

    let tok = PromptTokenizer::from_file(&tiny.join("tokenizer.json"))?;
    let builder = ExampleBuilder::new(&tok, openvla::config::PromptStyle::Pure, 256, 32000);
    let batch = make_batch(&builder, &samples, &Device::Cpu)?;
    let mode = TrainMode::Lora;
    let options = LoadTrainOptions {
        mode,
        storage: WeightStorage::F32,
    };
    let model = OpenVlaTrain::load(&tiny, options, &Device::Cpu)?;
    let cfg = model.config().clone();
    let modules = model.modules();
    let targets = select_targets(
        &modules,
        &TargetModules::Pattern("all-linear".into()),
        Some(OPENVLA_OUTPUT_EMBEDDING),
    )?;
    let mut lora = LoraConfig::finetune_default(32, None, 0.0);
    lora.target_modules = TargetModules::List(targets.iter().map(|m| m.name.clone()).collect());
    let adapter = LoraAdapter::init(lora, &targets, &mut TrainRng::new(5), &Device::Cpu)?;
    let layers = cfg.text.num_hidden_layers;
    let mut objective = VlaObjective::new(
        model,
        |n| openvla_train::mode::is_trainable(mode, n, layers),
        Some(adapter),
        openvla::action::ActionTokenizer::new(cfg.n_action_bins, cfg.action_vocab_size),
        1,
    )?;
    let params = objective.params();
    let mut opt = AdamW::new(AdamWConfig {
        lr: 3e-3,
        ..AdamWConfig::default()
    });
    let mut rng = TrainRng::new(2);
    let mut memorized_at = None;
    for step in 1..=300 {
        let o = objective.forward(&batch, &mut rng)?;
        let loss = o.loss.to_scalar::<f32>()?;
        let acc = o.action_accuracy.unwrap_or(0.0);
        eprintln!("step {step}: loss {loss:.4} action accuracy {acc:.3}");
        if acc == 1.0 && memorized_at.is_none() {
            memorized_at = Some(step);
        }
        if memorized_at.is_some_and(|m| step >= m + extra) {
            break;
        }
        let grads = o.loss.backward()?;
        let g: BTreeMap<_, _> = params
            .iter()
            .filter_map(|(n, v)| grads.get(v).map(|g| (n.clone(), g.clone())))
            .collect();
        opt.step(&params, &g)?;
    }
    let Some(at) = memorized_at else {
        bail!("no 100% action accuracy after 300 steps");
    };
    let adapter = objective
        .backbone
        .adapter
        .as_ref()
        .context("LoRA adapter missing")?;
    adapter.save(&out.join("adapter"))?;
    std::fs::write(
        out.join("adapter/dataset_statistics.json"),
        serde_json::to_string_pretty(&stats_file)?,
    )?;
    eprintln!(
        "memorized at step {at}; adapter in {}, pairs in {}",
        out.join("adapter").display(),
        out.join("pairs").display()
    );
    Ok(())
}
