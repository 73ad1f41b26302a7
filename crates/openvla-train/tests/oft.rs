//! The OpenVLA-OFT L1 objective (`openvla finetune --head l1`): parity with the reference's
//! loss and gradients, gradient checkpointing, learning, the exported OFT directory, errors.

mod common;

use candle_core::{Device, Tensor};
use common::*;
use openvla::oft::pt::{find_component, StateDict};
use openvla::oft::{ACTION_HEAD, PROPRIO_PROJECTOR};
use openvla_data::source::DatasetSource;
use openvla_data::stats::{DatasetStatistics, StatsAccumulator};
use openvla_data::stream::StreamConfig;
use openvla_train::batch::{ExampleBuilder, TextBatch, PAD_TOKEN_ID};
use openvla_train::data::{first_frames_with, oft_sample};
use openvla_train::lora::targets::{select_targets, OPENVLA_OUTPUT_EMBEDDING};
use openvla_train::lora::{LoraAdapter, LoraConfig, TargetModules};
use openvla_train::model::head::{L1HeadTrain, ProprioProjectorTrain};
use openvla_train::model::{LoadTrainOptions, OpenVlaTrain, WeightStorage};
use openvla_train::oft::{make_oft_batch, OftBatch};
use openvla_train::optim::{AdamW, AdamWConfig};
use openvla_train::rng::TrainRng;
use openvla_train::seam::{L1Objective, TrainModel};
use openvla_train::trainer::Objective;
use openvla_train::TrainMode;
use std::collections::BTreeMap;
use std::path::PathBuf;

/// The tiny OFT checkpoint (2 images, 8-D proprio, K = 8, D = 7, LLM width 32).
fn oft_model() -> PathBuf {
    root().join("testdata/openvla-oft-tiny/model")
}

/// The L1 reference golden (made by `tools/reference/oft_l1_ref.py`).
fn ref_dir() -> PathBuf {
    root().join("testdata/oft-train-ref")
}

fn load(mode: TrainMode) -> OpenVlaTrain {
    OpenVlaTrain::load(
        &oft_model(),
        LoadTrainOptions {
            mode,
            storage: WeightStorage::F32,
        },
        &Device::Cpu,
    )
    .unwrap()
}

/// The fixture's action head and proprio projector.
fn fixture_components() -> (L1HeadTrain, ProprioProjectorTrain) {
    let dir = oft_model();
    let head = StateDict::read(&find_component(&dir, ACTION_HEAD).unwrap().unwrap()).unwrap();
    let proj = StateDict::read(&find_component(&dir, PROPRIO_PROJECTOR).unwrap().unwrap()).unwrap();
    (
        L1HeadTrain::from_state_dict(&head, 32, 7).unwrap(),
        ProprioProjectorTrain::from_state_dict(&proj, 8, 32).unwrap(),
    )
}

fn objective(mode: TrainMode, adapter: Option<LoraAdapter>) -> L1Objective<OpenVlaTrain> {
    let model = load(mode);
    let layers = model.config().text.num_hidden_layers;
    let (head, proj) = fixture_components();
    L1Objective::new(
        model,
        |n| openvla_train::mode::is_trainable(mode, n, layers),
        adapter,
        head,
        Some(proj),
        0,
    )
    .unwrap()
}

fn l2(a: &[f32]) -> f64 {
    a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt()
}

fn l2_diff(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - *y as f64).powi(2))
        .sum::<f64>()
        .sqrt()
}

/// The reference golden's batch (B = 2, one padded).
fn ref_batch() -> OftBatch {
    let raw = read_raw(&ref_dir().join("inputs.safetensors"));
    let f = |k: &str| {
        let r = &raw[k];
        Tensor::from_vec(f32s(r), r.1.clone(), &Device::Cpu).unwrap()
    };
    let ids = i64s(&raw["input_ids"]);
    let (b, t) = (raw["input_ids"].1[0], raw["input_ids"].1[1]);
    let text = TextBatch {
        batch: b,
        seq_len: t,
        input_ids: ids.iter().map(|&x| x as u32).collect(),
        labels: i64s(&raw["labels"]),
        attention_mask: ids.iter().map(|&x| x != PAD_TOKEN_ID as i64).collect(),
    };
    OftBatch::from_parts(
        f("pixel_values"),
        text,
        f("actions"),
        Some(f("proprio")),
        31743,
    )
    .unwrap()
}

fn ref_objective() -> L1Objective<OpenVlaTrain> {
    let ad = LoraAdapter::load(&ref_dir().join("lora_adapter"), &Device::Cpu).unwrap();
    assert_eq!(ad.config.scaling(), 2.0);
    objective(TrainMode::Lora, Some(ad))
}

/// Gradients by parameter name (those that got one).
fn grads_of(
    obj: &mut L1Objective<OpenVlaTrain>,
    batch: &OftBatch,
    checkpointing: bool,
) -> (f64, BTreeMap<String, Vec<f32>>) {
    obj.checkpointing = checkpointing;
    let (out, grads) = obj
        .forward_backward(batch, &mut TrainRng::new(1), 1)
        .unwrap();
    let loss = out.loss.to_scalar::<f32>().unwrap() as f64;
    let g = obj
        .params()
        .iter()
        .filter_map(|(n, v)| grads.get(v).map(|g| (n.clone(), vec_f32(g))))
        .collect();
    (loss, g)
}

#[test]
fn loss_and_gradients_match_the_reference() {
    if !ref_dir().join("inputs.safetensors").is_file() {
        panic!(
            "{} is missing (the golden of tools/reference/oft_l1_ref.py)",
            ref_dir().display()
        );
    }
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ref_dir().join("expected.json")).unwrap())
            .unwrap();
    let batch = ref_batch();
    let mut obj = ref_objective();
    let (loss, grads) = grads_of(&mut obj, &batch, false);
    let want = expected["loss"].as_f64().unwrap();
    let rel = ((loss - want) / want).abs();
    eprintln!("L1 loss {loss} vs reference {want} (relative {rel:e})");
    assert!(rel <= 1e-5, "loss {loss} vs {want}: {rel:e}");
    // The causal control is far away: the bidirectional mask matters.
    let causal = expected["causal_control_loss"].as_f64().unwrap();
    assert!(((loss - causal) / causal).abs() > 1e-2);

    let golden =
        candle_core::safetensors::load(ref_dir().join("grads.safetensors"), &Device::Cpu).unwrap();
    let without: Vec<String> = expected["trainable_without_grad"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    let params = obj.params();
    assert_eq!(
        params.len(),
        golden.len() + without.len(),
        "every trainable tensor is in the golden (with a gradient or without)"
    );
    let mut worst = (0f64, String::new());
    for (name, _) in &params {
        match golden.get(name) {
            Some(g) => {
                let want = vec_f32(g);
                let got = grads
                    .get(name)
                    .unwrap_or_else(|| panic!("{name}: no gradient"));
                let r = l2_diff(got, &want) / l2(&want);
                if r > worst.0 {
                    worst = (r, name.clone());
                }
                assert!(r <= 1e-4, "{name}: gradient off by {r:e} of its norm");
            }
            None => {
                assert!(without.contains(name), "{name} is not in the golden");
                if let Some(g) = grads.get(name) {
                    assert_eq!(l2(g), 0.0, "{name} must get no gradient");
                }
            }
        }
    }
    eprintln!("worst gradient: {:e} of its norm ({})", worst.0, worst.1);
}

#[test]
fn checkpointing_gives_the_same_gradients() {
    let batch = ref_batch();
    let mut obj = ref_objective();
    let (plain_loss, plain) = grads_of(&mut obj, &batch, false);
    let (ck_loss, ck) = grads_of(&mut obj, &batch, true);
    assert_eq!(plain_loss.to_bits(), ck_loss.to_bits(), "same forward");
    assert_eq!(
        plain.keys().collect::<Vec<_>>(),
        ck.keys().collect::<Vec<_>>()
    );
    // Head, projector and LoRA of every stage (towers, projector, LLM) are compared.
    assert!(plain.keys().any(|k| k.starts_with("action_head.")));
    assert!(plain.keys().any(|k| k.starts_with("proprio_projector.")));
    assert!(plain.keys().any(|k| k.contains("featurizer.blocks.0")));
    assert!(plain
        .keys()
        .any(|k| k.contains("language_model.model.layers.0")));
    for (name, g) in &plain {
        let r = l2_diff(g, &ck[name]) / l2(g).max(1e-30);
        assert!(r <= 1e-5, "{name}: checkpointed gradient off by {r:e}");
    }
}

/// The LIBERO test data (RLDS, 12 episodes, with the wrist camera and the 8-D state).
fn libero() -> (DatasetSource, DatasetStatistics) {
    let source = DatasetSource::open(
        &root().join("testdata/data/rlds"),
        Some("libero_spatial_no_noops"),
        None,
    )
    .unwrap();
    let stats = source
        .compute_statistics(
            "all",
            false,
            None,
            None,
            StatsAccumulator::new().with_proprio(),
        )
        .unwrap();
    (source, stats)
}

/// The first frame of each of the first `n` LIBERO episodes with chunks of `k`, both cameras
/// and proprio, as one batch for the fixture model.
fn libero_batch(n: usize, k: usize) -> OftBatch {
    let (source, stats) = libero();
    let pre =
        openvla_image::PreprocessorConfig::from_file(&oft_model().join("preprocessor_config.json"))
            .unwrap();
    let samples: Vec<_> = first_frames_with(
        &source,
        stats,
        n,
        StreamConfig {
            action_chunk: k,
            wrist: true,
            proprio: true,
            ..Default::default()
        },
    )
    .unwrap()
    .into_iter()
    .map(|s| oft_sample(s, &pre).unwrap())
    .collect();
    let tok = openvla::processor::PromptTokenizer::from_file(&oft_model().join("tokenizer.json"))
        .unwrap();
    let builder = ExampleBuilder::new(&tok, openvla::config::PromptStyle::Pure, 256, 32000);
    make_oft_batch(&builder, &samples, k, &Device::Cpu).unwrap()
}

fn lora_adapter(model: &OpenVlaTrain, r: usize, seed: u64) -> LoraAdapter {
    let modules = model.modules();
    let t = TargetModules::Pattern("all-linear".into());
    let sel = select_targets(&modules, &t, Some(OPENVLA_OUTPUT_EMBEDDING)).unwrap();
    let mut lc = LoraConfig::finetune_default(r, None, 0.0);
    lc.target_modules = TargetModules::List(sel.iter().map(|m| m.name.clone()).collect());
    LoraAdapter::init(lc, &sel, &mut TrainRng::new(seed), &Device::Cpu).unwrap()
}

#[test]
fn the_l1_head_memorizes_eight_episodes() {
    // Chunks of 4: the test episodes have 4 to 9 steps (frames whose chunk would run past the
    // episode's end are not sampled).
    let batch = libero_batch(8, 4);
    assert_eq!(batch.pixel_values.dims(), [8, 12, 224, 224]);
    assert_eq!(batch.actions.dims(), [8, 4, 7]);
    assert_eq!(batch.proprio.as_ref().unwrap().dims(), [8, 8]);
    // The projector and the LLM train in full with the head and the proprio projector
    // (`--mode frozen-vision`): the backward stops before the vision towers, which keeps each
    // step cheap. LoRA and full runs go through the same objective (the parity test above).
    let mode = TrainMode::FrozenVision;
    let model = load(mode);
    let layers = model.config().text.num_hidden_layers;
    let mut rng = TrainRng::new(11);
    // A fresh head and projector, initialized as the reference's modules are.
    let proj = ProprioProjectorTrain::init(8, 32, &mut rng).unwrap();
    let head = L1HeadTrain::init(32, 7, &mut rng).unwrap();
    let mut obj = L1Objective::new(
        model,
        |n| openvla_train::mode::is_trainable(mode, n, layers),
        None,
        head,
        Some(proj),
        5,
    )
    .unwrap();
    let params = obj.params();
    let mut opt = AdamW::new(AdamWConfig {
        lr: 3e-3,
        ..AdamWConfig::default()
    });
    let mut losses = Vec::new();
    let t0 = std::time::Instant::now();
    for step in 1..=200 {
        let (out, grads) = obj.forward_backward(&batch, &mut rng, 1).unwrap();
        let loss = out.loss.to_scalar::<f32>().unwrap() as f64;
        losses.push(loss);
        if std::env::var_os("OPENVLA_TRAIN_VERBOSE").is_some() {
            eprintln!(
                "step {step}: L1 {loss:.4} (current {:.4}, next {:.4}) {:.1}s",
                out.action_l1_loss.unwrap(),
                out.next_actions_l1_loss.unwrap(),
                t0.elapsed().as_secs_f64()
            );
        }
        if loss < 0.01 {
            eprintln!(
                "L1 {:.4} -> {loss:.4} after {step} steps ({:.1} s)",
                losses[0],
                t0.elapsed().as_secs_f64()
            );
            return;
        }
        let g: BTreeMap<String, Tensor> = params
            .iter()
            .filter_map(|(n, v)| grads.get(v).map(|g| (n.clone(), g.clone())))
            .collect();
        opt.step(&params, &g).unwrap();
        // A decaying step size: an L1 loss under Adam settles at about the step size.
        if step >= 80 {
            opt.config.lr = (opt.config.lr * 0.95).max(3e-4);
        }
    }
    panic!("no L1 < 0.01 after 200 steps: {losses:?}");
}

/// `openvla finetune --head l1` flags on the LIBERO test data from the OFT fixture.
fn oft_args(out: &std::path::Path) -> openvla_train::cli::FinetuneArgs {
    use openvla_train::cli::{FinetuneArgs, HeadArg, NormalizationArg, Precision};
    FinetuneArgs {
        model: oft_model(),
        data: root().join("testdata/data/rlds"),
        dataset: Some("libero_spatial_no_noops".into()),
        dataset_config: None,
        out: out.to_path_buf(),
        mode: TrainMode::Lora,
        lora_rank: 4,
        lora_alpha: None,
        lora_dropout: 0.0,
        target_modules: "all-linear".into(),
        lr: 5e-3,
        weight_decay: 0.01,
        batch_size: 2,
        grad_accumulation: 1,
        max_steps: 2,
        save_interval: 1,
        keep_last: 0,
        image_aug: false,
        shuffle_buffer: 8,
        checkpointing: false,
        seed: 4,
        precision: Precision::F32,
        compute: Default::default(),
        resume: false,
        max_memory_gb: None,
        no_memory_check: true,
        export_dtype: openvla_train::export::ExportDtype::Float32,
        export_max_shard_gb: 5.0,
        export_checkpoints: false,
        lr_schedule: openvla_train::schedule::LrScheduleKind::Constant,
        warmup_steps: 0,
        head: HeadArg::L1,
        chunk: Some(8),
        images: "primary,wrist".into(),
        proprio: true,
        normalization: NormalizationArg::BoundsQ99,
        aux_environment_state: None,
    }
}

/// The raw key names of a `.pt` file.
fn pt_keys(path: &std::path::Path) -> Vec<String> {
    let mut k: Vec<String> = candle_core::pickle::read_all(path)
        .unwrap()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    k.sort();
    k
}

#[test]
fn finetune_l1_writes_an_oft_directory_the_engine_loads() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let args = oft_args(&out);
    let report = openvla_train::cli::run_finetune(&args).unwrap();
    assert_eq!(report.outcome.step, 2);
    let components = openvla_train::model::head::l1_head_param_count(32, 7)
        + openvla_train::model::head::proprio_projector_param_count(8, 32);
    assert!(
        report.trainable_params > components,
        "LoRA + head + projector"
    );
    // Metrics: the L1 loss and the current / next actions' L1, and the curves.
    let m = openvla_train::log::read_metrics(&out.join("metrics.jsonl")).unwrap();
    assert_eq!(m.len(), 2);
    for r in &m {
        assert!(r.loss > 0.0 && r.loss.is_finite());
        assert!(r.action_accuracy.is_none());
        assert!(r.action_l1_loss.is_some() && r.next_actions_l1_loss.is_some());
    }
    let svg = std::fs::read_to_string(out.join("curves.svg")).unwrap();
    assert!(svg.contains("action L1"), "the curves show the action L1");
    // Each checkpoint holds the component files of its step.
    let ck = out.join("checkpoints/step-00000001");
    assert_files(
        &ck,
        &[
            "action_head--1_checkpoint.pt",
            "proprio_projector--1_checkpoint.pt",
            "adapter/adapter_model.safetensors",
        ],
    );
    // The final directory: the OFT layout.
    let dir = report.model_dir.clone().unwrap();
    assert_files(
        &dir,
        &[
            "model.safetensors",
            "config.json",
            "tokenizer.json",
            "preprocessor_config.json",
            "dataset_statistics.json",
            "action_head--2_checkpoint.pt",
            "proprio_projector--2_checkpoint.pt",
        ],
    );
    let head_keys = pt_keys(&dir.join("action_head--2_checkpoint.pt"));
    assert_eq!(head_keys.len(), 16);
    assert!(
        head_keys.iter().all(|k| k.starts_with("module.model.")),
        "{head_keys:?}"
    );
    assert_eq!(
        pt_keys(&dir.join("proprio_projector--2_checkpoint.pt")),
        [
            "module.fc1.bias",
            "module.fc1.weight",
            "module.fc2.bias",
            "module.fc2.weight"
        ]
    );
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["oft_constants"]["NUM_ACTIONS_CHUNK"], 8);
    assert_eq!(config["oft_constants"]["ACTION_DIM"], 7);
    assert_eq!(config["oft_constants"]["PROPRIO_DIM"], 8);
    assert_eq!(
        config["oft_constants"]["ACTION_PROPRIO_NORMALIZATION_TYPE"],
        "bounds_q99"
    );
    assert_eq!(config["oft_eval_cfg"]["num_images_in_input"], 2);
    assert_eq!(config["oft_eval_cfg"]["use_proprio"], true);
    assert_eq!(config["oft_eval_cfg"]["center_crop"], false);
    let stats: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("dataset_statistics.json")).unwrap(),
    )
    .unwrap();
    let st = &stats["libero_spatial_no_noops"];
    assert_eq!(st["action"]["q99"].as_array().unwrap().len(), 7);
    assert_eq!(st["proprio"]["q99"].as_array().unwrap().len(), 8);
    // The engine loads it and answers a chunk of 8 actions.
    let policy = openvla::Policy::load(&dir, &Default::default()).unwrap();
    assert_eq!(policy.head().family(), "oft-l1");
    assert_eq!(policy.chunk_size(), 8);
    assert_eq!(policy.num_images(), 2);
    assert_eq!(policy.proprio_dim(), Some(8));
    let img = |v: u8| openvla_image::RgbImage::from_raw(224, 224, vec![v; 224 * 224 * 3]).unwrap();
    let obs = openvla::policy::Observation {
        images: vec![("primary".into(), img(90)), ("wrist".into(), img(160))],
        instruction: "pick up the black bowl".into(),
        proprio: Some(vec![0.0; 8]),
    };
    let p = &policy.predict(&[obs], None).unwrap()[0];
    assert_eq!(p.actions.len(), 8);
    assert!(p.actions.iter().all(|a| a.len() == 7));
    // Resuming a finished run does not train again and keeps the export.
    let mut again = args.clone();
    again.resume = true;
    assert_eq!(
        openvla_train::cli::run_finetune(&again)
            .unwrap()
            .outcome
            .step,
        2
    );
}

#[test]
fn the_exported_directory_predicts_the_in_training_chunk() {
    use openvla::head::ActionHead;
    use openvla::model::ParallelInput;
    use openvla_train::export::{export_oft_dir, ExportDtype, ExportOptions, OftExport};
    let batch = libero_batch(2, 8);
    let model = load(TrainMode::Lora);
    let ad = lora_adapter(&model, 4, 9);
    let (head, proj) = fixture_components();
    let mut obj = L1Objective::new(model, |_| false, Some(ad), head, Some(proj), 2).unwrap();
    // Two steps, so that LoRA B (zero at init) is not zero any more.
    let params = obj.params();
    let mut opt = AdamW::new(AdamWConfig {
        lr: 1e-2,
        ..AdamWConfig::default()
    });
    let mut rng = TrainRng::new(3);
    for _ in 0..2 {
        let (_, grads) = obj.forward_backward(&batch, &mut rng, 1).unwrap();
        let g: BTreeMap<String, Tensor> = params
            .iter()
            .filter_map(|(n, v)| grads.get(v).map(|g| (n.clone(), g.clone())))
            .collect();
        opt.step(&params, &g).unwrap();
    }
    let want = obj.predict(&batch).unwrap();
    let (_, stats) = libero();
    let mut file = BTreeMap::new();
    file.insert("libero_spatial_no_noops".to_string(), stats);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("model");
    export_oft_dir(
        &ExportOptions {
            base: oft_model(),
            out: dir.clone(),
            dtype: ExportDtype::Float32,
            max_shard_bytes: 1 << 30,
            dataset_statistics: Some(serde_json::to_value(&file).unwrap()),
        },
        &obj.backbone.base_params,
        obj.backbone.adapter.as_ref(),
        &OftExport {
            chunk: 8,
            num_images: 2,
            normalization: openvla::oft::constants::NormalizationType::BoundsQ99,
            center_crop: false,
            lora_rank: Some(4),
            inference_compute: None,
            step: 2,
            head: &obj.head,
            proprio: obj.proprio.as_ref(),
        },
    )
    .unwrap();
    let policy = openvla::Policy::load(&dir, &Default::default()).unwrap();
    let oft = policy.oft().unwrap();
    let ActionHead::ParallelL1(mlp) = policy.head() else {
        panic!("not an L1 head: {}", policy.head().family())
    };
    let mut max_diff = 0f32;
    for row in 0..2 {
        // The same inputs as the training batch: each image's pixel values, the normalized
        // proprio through the exported projector, the prompt up to 29871.
        let pv = batch.pixel_values.get(row).unwrap();
        let images: Vec<Tensor> = (0..2)
            .map(|i| pv.narrow(0, 6 * i, 6).unwrap().unsqueeze(0).unwrap())
            .collect();
        let proprio: Vec<f64> = batch
            .proprio
            .as_ref()
            .unwrap()
            .get(row)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .into_iter()
            .map(f64::from)
            .collect();
        let token = oft
            .proprio
            .as_ref()
            .unwrap()
            .forward(&proprio, &Device::Cpu)
            .unwrap();
        let first_action = batch.head_rows[row][0] + 1;
        let ids = &batch.text.input_ids_row(row)[..first_action];
        assert_eq!(*ids.last().unwrap(), 29871);
        let trace = policy
            .model()
            .parallel_forward(&ParallelInput {
                pixel_values: &images,
                proprio_token: Some(&token),
                input_ids: ids,
                placeholders: 56,
            })
            .unwrap();
        let x = trace.window.reshape((8, 7 * 32)).unwrap();
        let got = vec_f32(&mlp.forward_traced(&x).unwrap().output);
        let w = vec_f32(&want.get(row).unwrap());
        for (a, b) in got.iter().zip(&w) {
            max_diff = max_diff.max((a - b).abs());
        }
    }
    eprintln!("exported vs in-training normalized chunk: max |diff| {max_diff:e}");
    assert!(max_diff <= 1e-4, "max |diff| {max_diff}");
}

#[test]
fn oft_flags_and_data_errors_are_clear() {
    use openvla_train::cli::{prepare_finetune, HeadArg};
    let tmp = tempfile::tempdir().unwrap();
    let err =
        |args: &openvla_train::cli::FinetuneArgs| prepare_finetune(args).unwrap_err().to_string();
    // --head l1 without --chunk.
    let mut a = oft_args(&tmp.path().join("a"));
    a.chunk = None;
    assert!(err(&a).contains("--head l1 needs --chunk"), "{}", err(&a));
    // OFT flags without --head l1.
    let mut a = oft_args(&tmp.path().join("b"));
    a.head = HeadArg::Bins256;
    assert!(err(&a).contains("add --head l1"), "{}", err(&a));
    // A chunk that contradicts the model's head (trained with chunks of 8).
    let mut a = oft_args(&tmp.path().join("c"));
    a.chunk = Some(4);
    let e = err(&a);
    assert!(
        e.contains("NUM_ACTIONS_CHUNK is 8") && e.contains("--chunk 4"),
        "{e}"
    );
    // The wrong number of images for the model (it reads 2).
    let mut a = oft_args(&tmp.path().join("d"));
    a.images = "primary".into();
    let e = err(&a);
    assert!(
        e.contains("num_images_in_input is 2") && e.contains("1 image"),
        "{e}"
    );
    let mut a = oft_args(&tmp.path().join("e"));
    a.images = "wrist".into();
    assert!(err(&a).contains("primary,wrist"), "{}", err(&a));
    // No --proprio for a model with a proprio projector.
    let mut a = oft_args(&tmp.path().join("f"));
    a.proprio = false;
    assert!(err(&a).contains("no --proprio"), "{}", err(&a));
    // Data without state or wrist camera (fractal), from a plain OpenVLA model.
    let mut a = oft_args(&tmp.path().join("g"));
    a.model = root().join("testdata/openvla-tiny/model");
    a.data = root().join("testdata/data/rlds/fractal20220817_data");
    a.dataset = None;
    a.images = "primary".into();
    let e = err(&a);
    assert!(e.contains("--proprio") && e.contains("state_key"), "{e}");
    a.proprio = false;
    a.images = "primary,wrist".into();
    let e = err(&a);
    assert!(e.contains("wrist_image_key"), "{e}");
}

#[test]
fn a_head_that_contradicts_the_data_is_an_error() {
    use openvla_train::cli::OftRun;
    let (_, mut stats) = libero();
    let run = OftRun {
        chunk: 8,
        wrist: true,
        proprio: true,
        normalization: openvla_train::cli::NormalizationArg::BoundsQ99,
    };
    let config = openvla::ModelConfig::from_file(&oft_model().join("config.json")).unwrap();
    // 5-dimensional actions against the fixture's 7-dimensional head.
    for v in [&mut stats.action.q01, &mut stats.action.q99] {
        v.truncate(5);
    }
    let e = openvla_train::oft::start_components(&oft_model(), &config, &run, &stats, 0)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("7-dimensional actions") && e.contains("5-dimensional"),
        "{e}"
    );
    // A 6-dimensional state against the 8-dimensional projector.
    let (_, mut stats) = libero();
    let p = stats.proprio.as_mut().unwrap();
    p.q01.truncate(6);
    let e = openvla_train::oft::start_components(&oft_model(), &config, &run, &stats, 0)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("8-dimensional state") && e.contains("6-dimensional"),
        "{e}"
    );
}

#[test]
fn images_and_proprio_that_do_not_fit_the_model_are_errors() {
    let batch = libero_batch(2, 8);
    let mut obj = objective(TrainMode::Lora, None);
    // One image's channels too many for the fused backbone (6 per image).
    let mut bad = batch.clone();
    bad.pixel_values = batch.pixel_values.narrow(1, 0, 9).unwrap();
    let e = obj
        .forward(&bad, &mut TrainRng::new(0))
        .unwrap_err()
        .to_string();
    assert!(e.contains("9 channels") && e.contains("6 per image"), "{e}");
    // A batch without proprio for a model with a projector.
    let mut bad = batch.clone();
    bad.proprio = None;
    let e = obj
        .forward(&bad, &mut TrainRng::new(0))
        .unwrap_err()
        .to_string();
    assert!(e.contains("takes proprio"), "{e}");
}
