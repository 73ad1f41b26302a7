//! The training loop on a tiny stand-in objective (softmax regression through the real loss):
//! exact resume after an interruption and after SIGKILL, keep-last-N, NaN stop, metrics log
//! and plot. The same harness will drive the real model.

use candle_core::{DType, Device, Tensor, Var};
use openvla_train::batch::TextBatch;
use openvla_train::checkpoint::list_checkpoints;
use openvla_train::log::read_metrics;
use openvla_train::loss::causal_lm_loss;
use openvla_train::rng::TrainRng;
use openvla_train::schedule::{LrSchedule, LrScheduleKind};
use openvla_train::trainer::{
    metrics_path, plot_path, train, DataSource, Objective, StepOutput, TrainerConfig,
};
use openvla_train::{AdamWConfig, Result, TrainError};
use std::path::Path;

const DIM: usize = 8;
const VOCAB: usize = 16;

/// Synthetic data: batch `i` is a pure function of (seed, i).
struct Synthetic {
    seed: u64,
    pos: u64,
}

struct Batch {
    x: Tensor,
    text: TextBatch,
}

impl DataSource for Synthetic {
    type Batch = Batch;

    fn next_batch(&mut self) -> Result<Batch> {
        let mut r = TrainRng::new(self.seed ^ self.pos.wrapping_mul(0x9E37_79B9));
        self.pos += 1;
        let (b, s) = (4, 3);
        let x: Vec<f32> = (0..b * s * DIM).map(|_| r.normal() as f32).collect();
        let labels: Vec<i64> = (0..b * s)
            .map(|i| {
                if i % s == 0 {
                    -100
                } else {
                    // target depends on the previous position's features
                    let prev = i - 1;
                    let v = x[prev * DIM..prev * DIM + 4].iter().sum::<f32>();
                    ((v * 3.0).abs() as i64) % VOCAB as i64
                }
            })
            .collect();
        Ok(Batch {
            x: Tensor::from_vec(x, (b, s, DIM), &Device::Cpu)?,
            text: TextBatch {
                batch: b,
                seq_len: s,
                input_ids: vec![1; b * s],
                labels,
                attention_mask: vec![true; b * s],
            },
        })
    }

    fn position(&self) -> serde_json::Value {
        serde_json::json!({ "batches": self.pos })
    }

    fn seek(&mut self, p: &serde_json::Value) -> Result<()> {
        self.pos = p["batches"]
            .as_u64()
            .ok_or_else(|| TrainError::Invalid("bad position".into()))?;
        Ok(())
    }
}

/// A source that cannot seek: a finished run resumed only to export must not read data.
struct NoSeek(Synthetic);

impl DataSource for NoSeek {
    type Batch = Batch;

    fn next_batch(&mut self) -> Result<Batch> {
        self.0.next_batch()
    }

    fn position(&self) -> serde_json::Value {
        self.0.position()
    }

    fn seek(&mut self, _: &serde_json::Value) -> Result<()> {
        Err(TrainError::Invalid("seek called".into()))
    }
}

/// Logits = x W + b, with a dropout-like random scale drawn from the run RNG (to prove the RNG
/// state is restored), and an optional NaN at a given step.
struct Softmax {
    w: Var,
    b: Var,
    calls: u64,
    nan_at: Option<u64>,
}

impl Softmax {
    fn new() -> Self {
        let mut r = TrainRng::new(99);
        let w: Vec<f32> = (0..DIM * VOCAB)
            .map(|_| (r.normal() * 0.1) as f32)
            .collect();
        Self {
            w: Var::from_vec(w, (DIM, VOCAB), &Device::Cpu).unwrap(),
            b: Var::zeros(VOCAB, DType::F32, &Device::Cpu).unwrap(),
            calls: 0,
            nan_at: None,
        }
    }
}

impl Objective for Softmax {
    type Batch = Batch;

    fn params(&self) -> Vec<(String, Var)> {
        vec![("b".into(), self.b.clone()), ("w".into(), self.w.clone())]
    }

    fn forward(&mut self, batch: &Batch, rng: &mut TrainRng) -> Result<StepOutput> {
        self.calls += 1;
        let noise = 1.0 + 0.01 * rng.normal();
        let logits = batch
            .x
            .broadcast_matmul(self.w.as_tensor())?
            .broadcast_add(self.b.as_tensor())?;
        let mut logits = (logits * noise)?;
        if self.nan_at == Some(self.calls) {
            logits = (logits * f64::NAN)?;
        }
        let labels = batch.text.multimodal_labels(0);
        let loss = causal_lm_loss(&logits, &labels, 0)?;
        Ok(StepOutput {
            loss: loss.loss,
            action_accuracy: Some(0.5),
            action_l1_loss: Some(0.1),
            next_actions_l1_loss: None,
            aux_l1_loss: None,
        })
    }

    fn export(&self, dir: &Path, _step: u64) -> Result<()> {
        std::fs::write(dir.join("exported.txt"), "ok").map_err(|e| TrainError::io(dir, e))
    }
}

fn config(dir: &Path, max_steps: u64) -> TrainerConfig {
    TrainerConfig {
        run_dir: dir.to_path_buf(),
        max_steps,
        grad_accumulation: 2,
        save_interval: 3,
        keep_last: 2,
        adamw: AdamWConfig {
            lr: 0.05,
            ..AdamWConfig::default()
        },
        // Warmup and cosine, so that resuming is checked to continue the schedule.
        schedule: LrSchedule {
            kind: LrScheduleKind::Cosine,
            warmup_steps: 2,
            total_steps: max_steps,
        },
        seed: 5,
        progress: false,
        fingerprint: serde_json::json!({"objective": "softmax", "dim": DIM}),
        stop_after: None,
    }
}

fn losses(dir: &Path) -> Vec<(u64, u64)> {
    read_metrics(&metrics_path(dir))
        .unwrap()
        .iter()
        .map(|r| (r.step, r.loss.to_bits()))
        .collect()
}

fn run(dir: &Path, max_steps: u64, stop_after: Option<u64>, resume: bool) -> Result<()> {
    let mut obj = Softmax::new();
    let mut data = Synthetic { seed: 1, pos: 0 };
    let mut cfg = config(dir, max_steps);
    cfg.stop_after = stop_after;
    train(&mut obj, &mut data, &cfg, resume).map(|_| ())
}

#[test]
fn interrupted_and_resumed_run_reproduces_the_loss_curve() {
    let a = tempfile::tempdir().unwrap();
    run(a.path(), 20, None, false).unwrap();
    let full = losses(a.path());
    assert_eq!(full.len(), 20);
    let first = f64::from_bits(full[0].1);
    let last = f64::from_bits(full[19].1);
    assert!(last < first, "loss should fall: {first} -> {last}");
    // The logged learning rate follows warmup (0, half, full) and then the cosine to ~0.
    let lrs: Vec<f64> = read_metrics(&metrics_path(a.path()))
        .unwrap()
        .iter()
        .map(|r| r.lr)
        .collect();
    assert_eq!(&lrs[..3], &[0.0, 0.025, 0.05]);
    let mid = 0.05 * 0.5 * (1.0 + (std::f64::consts::PI * 9.0 / 18.0).cos());
    assert!((lrs[11] - mid).abs() < 1e-12, "{}", lrs[11]);
    assert!(lrs[19] < 0.001 && lrs.windows(2).skip(2).all(|w| w[1] <= w[0]));

    // Stop after 7 steps (the last checkpoint is step 6), resume to the end.
    let b = tempfile::tempdir().unwrap();
    run(b.path(), 20, Some(7), false).unwrap();
    assert_eq!(losses(b.path()).len(), 7);
    // Starting again without --resume is refused.
    let e = run(b.path(), 20, None, false).unwrap_err().to_string();
    assert!(e.contains("--resume"), "{e}");
    run(b.path(), 20, None, true).unwrap();
    assert_eq!(losses(b.path()), full, "bit-identical loss curve");

    // keep-last 2: only steps 18 and 20 remain, with the exported artifact.
    let ck: Vec<u64> = list_checkpoints(b.path())
        .unwrap()
        .iter()
        .map(|c| c.0)
        .collect();
    assert_eq!(ck, vec![18, 20]);
    assert!(list_checkpoints(b.path()).unwrap()[1]
        .1
        .join("exported.txt")
        .is_file());
    // The plot is written next to the checkpoints.
    let svg = std::fs::read_to_string(plot_path(b.path())).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("training loss") && svg.contains("accuracy"));
}

#[test]
fn nan_loss_stops_and_keeps_the_last_good_checkpoint() {
    let d = tempfile::tempdir().unwrap();
    let mut obj = Softmax::new();
    obj.nan_at = Some(2 * 7 + 1); // first micro-batch of step 8
    let mut data = Synthetic { seed: 1, pos: 0 };
    let err = train(&mut obj, &mut data, &config(d.path(), 20), false).unwrap_err();
    match &err {
        TrainError::NonFiniteLoss {
            step, last_good, ..
        } => {
            assert_eq!(*step, 8);
            assert!(last_good.as_ref().unwrap().ends_with("step-00000006"));
        }
        e => panic!("unexpected {e}"),
    }
    assert!(err.to_string().contains("step-00000006"));
    let ck: Vec<u64> = list_checkpoints(d.path())
        .unwrap()
        .iter()
        .map(|c| c.0)
        .collect();
    assert_eq!(ck, vec![3, 6]);
    // The run resumes from the good checkpoint.
    run(d.path(), 20, None, true).unwrap();
    assert_eq!(losses(d.path()).len(), 20);
}

#[test]
fn a_finished_run_resumes_without_reading_data() {
    let d = tempfile::tempdir().unwrap();
    run(d.path(), 4, None, false).unwrap();
    let before = losses(d.path());
    let mut obj = Softmax::new();
    let mut data = NoSeek(Synthetic { seed: 1, pos: 0 });
    let out = train(&mut obj, &mut data, &config(d.path(), 4), true).unwrap();
    assert_eq!((out.resumed_from, out.step), (4, 4));
    assert_eq!(losses(d.path()), before);
    // A run that still has steps to take does seek.
    let e = train(&mut obj, &mut data, &config(d.path(), 6), true)
        .unwrap_err()
        .to_string();
    assert!(e.contains("seek called"), "{e}");
}

#[test]
fn resume_with_other_settings_is_refused() {
    let d = tempfile::tempdir().unwrap();
    run(d.path(), 4, None, false).unwrap();
    let mut obj = Softmax::new();
    let mut data = Synthetic { seed: 1, pos: 0 };
    let mut cfg = config(d.path(), 8);
    cfg.fingerprint = serde_json::json!({"objective": "softmax", "dim": 99});
    let e = train(&mut obj, &mut data, &cfg, true)
        .unwrap_err()
        .to_string();
    assert!(e.contains("different settings"), "{e}");
}

/// Child half of the SIGKILL test: trains slowly until killed.
#[test]
#[ignore]
fn sigkill_child() {
    let Ok(dir) = std::env::var("OPENVLA_TRAIN_SIGKILL_DIR") else {
        return;
    };
    struct Slow(Softmax);
    impl Objective for Slow {
        type Batch = Batch;
        fn params(&self) -> Vec<(String, Var)> {
            self.0.params()
        }
        fn forward(&mut self, b: &Batch, r: &mut TrainRng) -> Result<StepOutput> {
            std::thread::sleep(std::time::Duration::from_millis(40));
            self.0.forward(b, r)
        }
    }
    let mut obj = Slow(Softmax::new());
    let mut data = Synthetic { seed: 1, pos: 0 };
    // The same --max-steps as the resumed run: the cosine schedule spans it. The parent kills
    // this process after about 7 of the 24 steps (80 ms each).
    train(&mut obj, &mut data, &config(Path::new(&dir), 24), false).unwrap();
}

#[test]
fn sigkilled_run_resumes_to_the_same_loss_curve() {
    let reference = tempfile::tempdir().unwrap();
    run(reference.path(), 24, None, false).unwrap();
    let full = losses(reference.path());

    let d = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--ignored", "--exact", "sigkill_child", "--nocapture"])
        .env("OPENVLA_TRAIN_SIGKILL_DIR", d.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let t0 = std::time::Instant::now();
    loop {
        let n = list_checkpoints(d.path()).map(|c| c.len()).unwrap_or(0);
        let steps = read_metrics(&metrics_path(d.path()))
            .map(|m| m.len())
            .unwrap_or(0);
        if n >= 2 && !steps.is_multiple_of(3) {
            break;
        }
        assert!(t0.elapsed().as_secs() < 60, "child made no progress");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let before = losses(d.path()).len();
    assert!(before >= 6);
    run(d.path(), 24, None, true).unwrap();
    assert_eq!(losses(d.path()), full, "killed after {before} steps");
}
