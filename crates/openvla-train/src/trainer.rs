//! The training loop, independent of the model: gradient accumulation, AdamW, NaN/inf stop,
//! JSONL metrics, SVG curves, atomic checkpoints with keep-last-N, and exact resume.
//!
//! A run is deterministic given its seed: the [`Objective`] draws randomness only from the
//! [`TrainRng`] it is handed and the [`DataSource`] is positioned by its saved position, so a
//! run killed at any point and resumed from its last checkpoint produces the same losses,
//! bit for bit, as an uninterrupted one.

use crate::checkpoint::{
    clean_partial, latest_checkpoint, load_checkpoint, prune_checkpoints, save_checkpoint,
    CheckpointState,
};
use crate::error::{Result, TrainError};
use crate::log::{read_metrics, MetricsLog, MetricsRecord};
use crate::optim::{AdamW, AdamWConfig};
use crate::plot::write_svg;
use crate::progress::TrainProgress;
use crate::recompute::Grads;
use crate::rng::TrainRng;
use crate::schedule::LrSchedule;
use candle_core::{DType, Tensor, Var};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// What one forward pass of the objective returns.
#[derive(Debug, Clone)]
pub struct StepOutput {
    /// Scalar loss, differentiable with respect to the objective's parameters.
    pub loss: Tensor,
    /// Action-token accuracy, if the objective computes it.
    pub action_accuracy: Option<f64>,
    /// L1 error of the (current) action, if computed: of the decoded tokens for the 256-bin
    /// objective, of chunk row 0 for the L1 objective (the reference's
    /// `curr_action_l1_loss`).
    pub action_l1_loss: Option<f64>,
    /// L1 error of the chunk's later actions (rows `1..K`, the reference's
    /// `next_actions_l1_loss`), for objectives that predict chunks of more than one action.
    pub next_actions_l1_loss: Option<f64>,
    /// L1 error of the auxiliary environment-state prediction
    /// (`--aux-environment-state`), unweighted, if the objective has one.
    pub aux_l1_loss: Option<f64>,
}

/// A trainable objective: named float32 parameters and a loss over a batch.
pub trait Objective {
    /// The batch type.
    type Batch;

    /// The trainable parameters by (stable, unique) name.
    fn params(&self) -> Vec<(String, Var)>;

    /// Computes the loss of one micro-batch. All randomness (dropout, ...) must come from
    /// `rng`.
    fn forward(&mut self, batch: &Self::Batch, rng: &mut TrainRng) -> Result<StepOutput>;

    /// The loss of one micro-batch and the gradients of `loss / accumulation` (the number of
    /// micro-batches per step) with respect to [`Objective::params`]. The default is [`Objective::forward`] and one `backward`; an
    /// objective may drive its own backward (gradient checkpointing) instead.
    fn forward_backward(
        &mut self,
        batch: &Self::Batch,
        rng: &mut TrainRng,
        accumulation: u64,
    ) -> Result<(StepOutput, Grads)> {
        plain_forward_backward(self, batch, rng, accumulation)
    }

    /// Writes extra artifacts into the checkpoint directory of optimizer step `step` before it
    /// is published (e.g. the PEFT adapter). The default writes nothing.
    fn export(&self, _dir: &Path, _step: u64) -> Result<()> {
        Ok(())
    }
}

/// A resumable source of batches.
pub trait DataSource {
    /// The batch type.
    type Batch;

    /// The next batch.
    fn next_batch(&mut self) -> Result<Self::Batch>;

    /// The current position, saved in checkpoints (any JSON the source understands).
    fn position(&self) -> serde_json::Value;

    /// Moves to a position returned by [`DataSource::position`].
    fn seek(&mut self, position: &serde_json::Value) -> Result<()>;
}

/// Settings of a run.
#[derive(Debug, Clone)]
pub struct TrainerConfig {
    /// Run directory (metrics.jsonl, curves.svg, checkpoints/).
    pub run_dir: PathBuf,
    /// Total optimizer steps.
    pub max_steps: u64,
    /// Micro-batches per optimizer step (the loss is divided by it, as `finetune.py` does).
    pub grad_accumulation: u64,
    /// Save a checkpoint every this many steps (and at the end).
    pub save_interval: u64,
    /// Keep only the newest N checkpoints (0 keeps all).
    pub keep_last: usize,
    /// Optimizer settings (`adamw.lr` is the base learning rate of `schedule`).
    pub adamw: AdamWConfig,
    /// How the learning rate changes over the run.
    pub schedule: LrSchedule,
    /// Seed of the run's RNG.
    pub seed: u64,
    /// Show a progress bar.
    pub progress: bool,
    /// Values that must match to resume (model, mode, rank, batch size, ...).
    pub fingerprint: serde_json::Value,
    /// Stop after this many steps of *this process* (for tests that simulate interruptions).
    pub stop_after: Option<u64>,
}

/// How a run ended.
#[derive(Debug, Clone)]
pub struct RunOutcome {
    /// Optimizer steps completed in total.
    pub step: u64,
    /// Step the run resumed from (0 for a fresh run).
    pub resumed_from: u64,
    /// The newest checkpoint.
    pub last_checkpoint: Option<PathBuf>,
    /// Loss of the last step.
    pub last_loss: Option<f64>,
}

/// The metrics file of a run.
pub fn metrics_path(run_dir: &Path) -> PathBuf {
    run_dir.join("metrics.jsonl")
}

/// The curves plot of a run.
pub fn plot_path(run_dir: &Path) -> PathBuf {
    run_dir.join("curves.svg")
}

fn add_grads(acc: &mut BTreeMap<String, Tensor>, name: &str, g: &Tensor) -> Result<()> {
    let g = g.to_dtype(DType::F32)?;
    let next = match acc.remove(name) {
        Some(a) => (a + g)?,
        None => g,
    };
    acc.insert(name.to_string(), next);
    Ok(())
}

/// Names of parameters whose gradient is missing or all zero (for the "every trainable
/// parameter receives a gradient" check).
pub fn zero_gradient_params(
    params: &[(String, Var)],
    grads: &candle_core::backprop::GradStore,
) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for (n, v) in params {
        match grads.get(v) {
            None => out.push(n.clone()),
            Some(g) => {
                let m = g
                    .abs()?
                    .max_all()?
                    .to_dtype(DType::F32)?
                    .to_scalar::<f32>()?;
                if m == 0.0 {
                    out.push(n.clone());
                }
            }
        }
    }
    Ok(out)
}

/// [`Objective::forward`] then one `backward` of `loss / accumulation` (the loss itself is
/// returned).
pub fn plain_forward_backward<O: Objective + ?Sized>(
    obj: &mut O,
    batch: &O::Batch,
    rng: &mut TrainRng,
    accumulation: u64,
) -> Result<(StepOutput, Grads)> {
    let out = obj.forward(batch, rng)?;
    let scaled = if accumulation > 1 {
        (&out.loss / accumulation as f64)?
    } else {
        out.loss.clone()
    };
    let store = scaled.backward()?;
    let vars: Vec<Var> = obj.params().into_iter().map(|(_, v)| v).collect();
    let mut grads = Grads::new();
    grads.absorb(&store, &vars)?;
    Ok((
        StepOutput {
            loss: out.loss.detach(),
            ..out
        },
        grads,
    ))
}

/// The mean of the values a step's micro-batches report (`None` when none reports one).
#[derive(Debug, Default)]
struct Mean {
    sum: f64,
    n: u64,
}

impl Mean {
    fn add(&mut self, v: Option<f64>) {
        if let Some(v) = v {
            self.sum += v;
            self.n += 1;
        }
    }

    fn get(&self) -> Option<f64> {
        (self.n > 0).then(|| self.sum / self.n as f64)
    }
}

/// Runs (or, with `resume`, continues) training until `max_steps`.
pub fn train<O, D>(
    obj: &mut O,
    data: &mut D,
    cfg: &TrainerConfig,
    resume: bool,
) -> Result<RunOutcome>
where
    O: Objective,
    D: DataSource<Batch = O::Batch>,
{
    if cfg.grad_accumulation == 0 || cfg.save_interval == 0 {
        return Err(TrainError::Invalid(
            "grad_accumulation and save_interval must be at least 1".into(),
        ));
    }
    cfg.schedule.validate()?;
    std::fs::create_dir_all(&cfg.run_dir).map_err(|e| TrainError::io(&cfg.run_dir, e))?;
    clean_partial(&cfg.run_dir)?;
    let params = obj.params();
    let mut opt = AdamW::new(cfg.adamw);
    let mut rng = TrainRng::new(cfg.seed);
    let mut step = 0u64;
    let mut last_checkpoint = None;
    let latest = latest_checkpoint(&cfg.run_dir)?;
    if let Some((_, dir)) = &latest {
        if !resume {
            return Err(TrainError::Invalid(format!(
                "{} already holds checkpoints; pass --resume to continue that run or choose \
                 another output directory",
                cfg.run_dir.display()
            )));
        }
        let st = load_checkpoint(dir, &params, &mut opt, &cfg.fingerprint)?;
        // A finished run (resumed only to export again) reads no more data: skip the seek,
        // which replays the stream up to the checkpoint's position.
        if st.step < cfg.max_steps {
            data.seek(&st.data_position)?;
        }
        rng = st.rng;
        step = st.step;
        last_checkpoint = Some(dir.clone());
    }
    let resumed_from = step;
    let mpath = metrics_path(&cfg.run_dir);
    let mut records = if latest.is_some() && mpath.is_file() {
        read_metrics(&mpath)?
            .into_iter()
            .filter(|r| r.step <= step)
            .collect()
    } else {
        vec![]
    };
    let mut log = MetricsLog::open(&mpath, latest.as_ref().map(|_| step))?;
    let progress = TrainProgress::new(step, cfg.max_steps, cfg.progress);
    let title = format!("{}", cfg.run_dir.display());
    let t0 = Instant::now();
    let mut steps_here = 0u64;
    let mut last_loss = None;
    while step < cfg.max_steps {
        if cfg.stop_after.is_some_and(|n| steps_here >= n) {
            break;
        }
        let mut acc: BTreeMap<String, Tensor> = BTreeMap::new();
        let mut loss_sum = 0f64;
        let (mut accuracy, mut l1, mut next_l1, mut aux_l1) = (
            Mean::default(),
            Mean::default(),
            Mean::default(),
            Mean::default(),
        );
        let (mut data_wait, mut fwd_bwd) = (0f64, 0f64);
        for _ in 0..cfg.grad_accumulation {
            let t_data = Instant::now();
            let batch = data.next_batch()?;
            let t_fb = Instant::now();
            data_wait += (t_fb - t_data).as_secs_f64();
            let (out, grads) = obj.forward_backward(&batch, &mut rng, cfg.grad_accumulation)?;
            fwd_bwd += t_fb.elapsed().as_secs_f64();
            let l = out.loss.to_dtype(DType::F32)?.to_scalar::<f32>()?;
            if !l.is_finite() {
                progress.finish();
                return Err(TrainError::NonFiniteLoss {
                    step: step + 1,
                    loss: l,
                    last_good: last_checkpoint.clone(),
                });
            }
            loss_sum += l as f64;
            accuracy.add(out.action_accuracy);
            l1.add(out.action_l1_loss);
            next_l1.add(out.next_actions_l1_loss);
            aux_l1.add(out.aux_l1_loss);
            for (name, var) in &params {
                if let Some(g) = grads.get(var) {
                    add_grads(&mut acc, name, g)?;
                }
            }
        }
        let lr = cfg.schedule.lr(cfg.adamw.lr, step);
        opt.config.lr = lr;
        let t_opt = Instant::now();
        opt.step(&params, &acc)?;
        let optimizer_s = t_opt.elapsed().as_secs_f64();
        step += 1;
        steps_here += 1;
        let elapsed = t0.elapsed().as_secs_f64();
        let sps = steps_here as f64 / elapsed.max(1e-9);
        let k = cfg.grad_accumulation as f64;
        let rec = MetricsRecord {
            step,
            loss: loss_sum / k,
            action_accuracy: accuracy.get(),
            action_l1_loss: l1.get(),
            next_actions_l1_loss: next_l1.get(),
            aux_l1_loss: aux_l1.get(),
            lr,
            steps_per_s: sps,
            elapsed_s: elapsed,
            data_wait_s: Some(data_wait),
            forward_backward_s: Some(fwd_bwd),
            optimizer_s: Some(optimizer_s),
        };
        log.append(&rec)?;
        progress.update(step, rec.loss, rec.action_accuracy, sps);
        last_loss = Some(rec.loss);
        records.push(rec);
        if step.is_multiple_of(cfg.save_interval) || step == cfg.max_steps {
            let state = CheckpointState {
                step,
                rng: rng.clone(),
                data_position: data.position(),
                optimizer_steps: opt.state.iter().map(|(k, s)| (k.clone(), s.step)).collect(),
                fingerprint: cfg.fingerprint.clone(),
                loss: last_loss,
            };
            let dir =
                save_checkpoint(&cfg.run_dir, &params, &opt, &state, |d| obj.export(d, step))?;
            prune_checkpoints(&cfg.run_dir, cfg.keep_last)?;
            write_svg(&plot_path(&cfg.run_dir), &records, &title)?;
            last_checkpoint = Some(dir);
        }
    }
    progress.finish();
    write_svg(&plot_path(&cfg.run_dir), &records, &title)?;
    Ok(RunOutcome {
        step,
        resumed_from,
        last_checkpoint,
        last_loss,
    })
}
