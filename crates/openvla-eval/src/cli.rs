//! The `openvla eval ...` and `openvla sim ...` subcommands.

use anyhow::Result;

/// `openvla eval <benchmark>`.
#[derive(clap::Subcommand, Debug, Clone)]
pub enum EvalCommand {
    /// Closed-loop evaluation in Meta-World (MuJoCo) through the policy's HTTP server: per-task,
    /// per-difficulty and mean success with 95% Wilson intervals, videos (docs/evaluation.md).
    Metaworld(crate::metaworld::EvalArgs),
}

/// `openvla sim <command>`.
#[derive(clap::Subcommand, Debug, Clone)]
pub enum SimCommand {
    /// Simulator utilities.
    #[command(subcommand)]
    Demos(DemosCommand),
}

/// `openvla sim demos <benchmark>`.
#[derive(clap::Subcommand, Debug, Clone)]
pub enum DemosCommand {
    /// Scripted-expert demonstrations in Meta-World, written as a LeRobot v3 dataset with the
    /// evaluation's camera, image size, state and instructions.
    Metaworld(crate::demos::DemosArgs),
}

/// Runs `openvla eval ...`; prints where the results went and the summary table.
pub fn run_eval(cmd: &EvalCommand) -> Result<()> {
    match cmd {
        EvalCommand::Metaworld(a) => {
            let o = crate::metaworld::run(a)?;
            if let Ok(md) = std::fs::read_to_string(o.out.join("results.md")) {
                println!("{md}");
            }
            eprintln!("results: {}", o.out.join("results.json").display());
            if !o.complete {
                anyhow::bail!("the run was interrupted; partial results written");
            }
            Ok(())
        }
    }
}

/// Runs `openvla sim ...`.
pub fn run_sim(cmd: &SimCommand) -> Result<()> {
    match cmd {
        SimCommand::Demos(DemosCommand::Metaworld(a)) => crate::demos::run(a).map(|_| ()),
    }
}
