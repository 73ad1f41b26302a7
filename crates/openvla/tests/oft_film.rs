//! OpenVLA-OFT FiLM: golden tests against the reference (testdata/openvla-oft-film-tiny, made by
//! tools/reference/oft_film_ref.py with the reference's own eval functions), the bf16 and int8
//! paths, and the error paths of FiLM checkpoint directories.
//!
//! | stage | tolerance |
//! |---|---|
//! | pixel_values (s0, both images) | max abs diff <= 1e-6 |
//! | ids (prompt + 29871 + placeholders + `</s>`) | identical |
//! | average language embedding | <= 1e-6 x max abs |
//! | projected patches (after FiLM in every block of both towers) | <= 1e-4 x max abs |
//! | hidden states at the head's window | <= 1e-4 x max abs |
//! | normalized chunk | <= 1e-5 abs |
//! | un-normalized chunk | <= 1e-5 abs |

mod common;

use candle_core::{DType, Tensor};
use common::{assert_abs, assert_rel, f64s, max_abs_diff, npy, oft_observation};
use openvla::oft::constants::OftOptions;
use openvla::policy::ParallelPolicyTrace;
use openvla::quant::Quantization;
use openvla::quantize::quantize_model_dir;
use openvla::{LoadOptions, Policy, Precision};
use serde_json::Value;
use std::path::{Path, PathBuf};

const STEP_FILE: &str = "vision_backbone--150000_checkpoint.pt";

fn testdata(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../testdata")
        .join(name)
}

fn base() -> PathBuf {
    testdata("openvla-oft-tiny")
}

fn film() -> PathBuf {
    testdata("openvla-oft-film-tiny")
}

fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for entry in std::fs::read_dir(src).unwrap() {
        let p = entry.unwrap().path();
        let to = dst.join(p.file_name().unwrap());
        if p.is_dir() {
            copy_dir(&p, &to);
        } else {
            std::fs::copy(&p, &to).unwrap();
        }
    }
}

/// The FiLM checkpoint directory: the tiny OFT model's files, then the FiLM fixture's
/// `config.json`, `vision_backbone--150000_checkpoint.pt` and `lora_adapter/`.
fn assemble() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&base().join("model"), dir.path());
    copy_dir(&film().join("model"), dir.path());
    dir
}

fn load_with(dir: &Path, precision: Precision, quantize: Option<Quantization>) -> Policy {
    try_load(dir, precision, quantize, OftOptions::default()).unwrap()
}

fn try_load(
    dir: &Path,
    precision: Precision,
    quantize: Option<Quantization>,
    oft: OftOptions,
) -> openvla::Result<Policy> {
    Policy::load(
        dir,
        &LoadOptions {
            precision,
            quantize,
            oft,
            ..Default::default()
        },
    )
}

fn samples() -> Vec<Value> {
    let text = std::fs::read_to_string(film().join("samples.json")).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    v["samples"].as_array().unwrap().clone()
}

fn run(policy: &Policy, s: &Value) -> ParallelPolicyTrace {
    policy
        .trace_parallel(&oft_observation(&base(), s), s["unnorm_key"].as_str())
        .unwrap()
}

#[test]
fn film_matches_the_reference_stage_by_stage() {
    let dir = assemble();
    let policy = load_with(dir.path(), Precision::F32, None);
    let oft = policy.oft().unwrap();
    assert_eq!(
        oft.film.as_deref().and_then(|p| p.file_name()),
        Some(std::ffi::OsStr::new(STEP_FILE))
    );
    assert!(policy.model().vision.is_film());
    let all = samples();
    assert_eq!(all.len(), 3);
    for s in &all {
        let p = s["prefix"].as_str().unwrap().to_string();
        let tag = |stage: &str| format!("film {p}{stage}");
        let t = run(&policy, s);
        if p == "s0_" {
            for (i, pv) in t.pixel_values.iter().enumerate() {
                let file = format!("{p}img{i}_pixel_values.npy");
                let d = max_abs_diff(&f64s(pv), &f64s(&npy(&base(), &file)), &file);
                assert!(d <= 1e-6, "stage {}: {d:.3e}", tag("pixel_values"));
            }
        }
        let full: Vec<u32> = f64s(&npy(&film(), &format!("{p}input_ids_full.npy")))
            .into_iter()
            .map(|v| v as u32)
            .collect();
        assert_eq!(full[..t.input_ids.len()], t.input_ids[..], "{}", tag("ids"));
        assert_eq!(full.len(), t.input_ids.len() + 56 + 1, "{}", tag("ids"));
        let lang = t
            .forward
            .language_mean
            .as_ref()
            .expect("FiLM language mean");
        assert_rel(
            lang,
            &npy(&film(), &format!("{p}language_mean.npy")),
            1e-6,
            &tag("language_mean"),
        );
        assert_rel(
            &t.forward.projected,
            &npy(&film(), &format!("{p}projected_features.npy")),
            1e-4,
            &tag("projected_features"),
        );
        assert_rel(
            &t.forward.window,
            &npy(&film(), &format!("{p}actions_hidden_states.npy")),
            1e-4,
            &tag("actions_hidden_states"),
        );
        let norm: Vec<f64> = t.prediction.normalized_actions.concat();
        let golden_norm = f64s(&npy(&film(), &format!("{p}normalized_actions.npy")));
        assert_abs(&norm, &golden_norm, 1e-5, &tag("normalized_actions"));
        let actions: Vec<f64> = t.prediction.actions.concat();
        let golden = f64s(&npy(&film(), &format!("{p}actions.npy")));
        assert_abs(&actions, &golden, 1e-5, &tag("actions"));
        // FiLM matters: the same observation through the un-FiLMed model (the base fixture's
        // golden) gives a clearly different chunk.
        let plain = f64s(&npy(&base(), &format!("{p}normalized_actions.npy")));
        let d = max_abs_diff(&norm, &plain, "film vs plain");
        assert!(
            d > 0.05,
            "{}: FiLM changed the chunk by only {d:.3e}",
            tag("effect")
        );
    }
}

#[test]
fn film_batched_equals_single_and_instructions_condition_the_towers() {
    let dir = assemble();
    let policy = load_with(dir.path(), Precision::F32, None);
    let all = samples();
    let s0 = &all[0];
    let single = run(&policy, s0);
    // Same images and proprio, another instruction: the towers' output changes (FiLM), which
    // a model without FiLM could not do.
    let mut other = oft_observation(&base(), s0);
    other.instruction = "put the bowl on the stove".into();
    let requests: Vec<openvla::Request> = [oft_observation(&base(), s0), other]
        .into_iter()
        .map(|observation| openvla::Request {
            observation,
            unnorm_key: s0["unnorm_key"].as_str().map(str::to_string),
        })
        .collect();
    let out = policy.trace_parallel_batch(&requests).unwrap();
    let first = out[0].as_ref().unwrap();
    let second = out[1].as_ref().unwrap();
    assert_eq!(
        first.prediction, single.prediction,
        "a batched FiLM answer must equal the single one"
    );
    let d = max_abs_diff(
        &f64s(&first.forward.projected),
        &f64s(&second.forward.projected),
        "projected",
    );
    assert!(
        d > 1e-2,
        "the instruction changed the vision features by only {d:.3e}"
    );
}

#[test]
fn film_bf16_and_int8_stay_close() {
    let dir = assemble();
    let s = &samples()[0];
    let golden = f64s(&npy(&film(), "s0_normalized_actions.npy"));
    for (name, precision, quant, tol) in [
        ("bf16", Precision::Bf16, None, 0.05),
        ("int8", Precision::Auto, Some(Quantization::Int8), 0.1),
    ] {
        let policy = load_with(dir.path(), precision, quant);
        assert!(policy.model().vision.is_film(), "{name}: FiLM lost");
        let t = run(&policy, s);
        let norm: Vec<f64> = t.prediction.normalized_actions.concat();
        let l1 = norm
            .iter()
            .zip(&golden)
            .map(|(a, b)| (a - b).abs())
            .sum::<f64>()
            / norm.len() as f64;
        let max = max_abs_diff(&norm, &golden, name);
        eprintln!("{name}: mean |chunk - f32 golden| {l1:.3e}, max {max:.3e}");
        assert!(
            l1 < tol,
            "{name}: mean abs error {l1:.3e} vs the f32 golden"
        );
        assert!(norm.iter().all(|v| v.is_finite()));
        if quant.is_some() {
            // `openvla quantize` of a FiLM directory copies the vision_backbone file; the
            // quantized directory loads and gives the same answer as quantizing while loading.
            let out = tempfile::tempdir().unwrap();
            let qdir = out.path().join("int8");
            quantize_model_dir(dir.path(), &qdir, Quantization::Int8, None).unwrap();
            assert!(qdir.join(STEP_FILE).is_file());
            let stored = load_with(&qdir, Precision::Auto, None);
            assert!(stored.model().vision.is_film());
            assert_eq!(run(&stored, s).prediction, t.prediction);
        }
    }
}

fn write_config(dir: &Path, edit: impl Fn(&mut Value)) {
    let path = dir.join("config.json");
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(&path, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

fn load_err(dir: &Path) -> String {
    match try_load(dir, Precision::F32, None, OftOptions::default()) {
        Ok(_) => panic!("{} loaded, expected an error", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn a_vision_backbone_file_without_film_layers_is_an_error() {
    let dir = assemble();
    std::fs::copy(
        film().join("errors/vision_backbone_without_film.pt"),
        dir.path().join(STEP_FILE),
    )
    .unwrap();
    let e = load_err(dir.path());
    assert!(e.contains("no FiLM layers") && e.contains(STEP_FILE), "{e}");
}

#[test]
fn two_vision_backbone_files_are_an_error_naming_both() {
    let dir = assemble();
    std::fs::copy(
        dir.path().join(STEP_FILE),
        dir.path().join("vision_backbone--200000_checkpoint.pt"),
    )
    .unwrap();
    let e = load_err(dir.path());
    assert!(
        e.contains(STEP_FILE) && e.contains("vision_backbone--200000_checkpoint.pt"),
        "{e}"
    );
}

#[test]
fn film_with_the_256_bin_head_is_an_error() {
    // Discrete-token OFT (no action head file, use_l1_regression = false) with FiLM: the
    // reference's get_vla_action never passes use_film without an action head.
    let dir = assemble();
    std::fs::remove_file(dir.path().join("action_head--150000_checkpoint.pt")).unwrap();
    write_config(dir.path(), |v| {
        v["oft_eval_cfg"]["use_l1_regression"] = false.into();
    });
    let e = load_err(dir.path());
    assert!(e.contains("FiLM") && e.contains("256-bin"), "{e}");
    // The autoregressive 256-bin path cannot run FiLM towers either: a clear error, not an
    // un-conditioned answer.
    let dir = assemble();
    let policy = load_with(dir.path(), Precision::F32, None);
    let pv = Tensor::zeros((1, 6, 224, 224), DType::F32, &candle_core::Device::Cpu).unwrap();
    let e = policy
        .model()
        .generate(&pv, &[1, 512, 29871], 7)
        .unwrap_err()
        .to_string();
    assert!(e.contains("FiLM"), "{e}");
}

#[test]
fn use_film_flags_that_contradict_the_files_are_errors() {
    let dir = assemble();
    write_config(dir.path(), |v| {
        v["oft_eval_cfg"]["use_film"] = false.into();
    });
    let e = load_err(dir.path());
    assert!(
        e.contains("use_film is false") && e.contains(STEP_FILE),
        "{e}"
    );

    let dir = assemble();
    std::fs::remove_file(dir.path().join(STEP_FILE)).unwrap();
    let e = load_err(dir.path());
    assert!(
        e.contains("use_film is true") && e.contains("vision_backbone"),
        "{e}"
    );

    let dir = assemble();
    write_config(dir.path(), |v| {
        v["oft_eval_cfg"]["lora_rank"] = 16.into();
    });
    let e = load_err(dir.path());
    assert!(e.contains("lora_rank") && e.contains("rank 32"), "{e}");
}
