//! # openvla-eval
//!
//! Closed-loop evaluation of OpenVLA policies in Meta-World, through the same HTTP server robots
//! use (`openvla serve`'s code, in process on loopback, or any server at `--url`), and
//! scripted-expert demonstrations as LeRobot v3 datasets. The simulator side is the Python
//! package `openvla_sim` (python/sim), run in worker processes from the project venv that
//! tools/setup.sh creates. See docs/evaluation.md.
//!
//! - [`tasks`]: Meta-World task names, LeRobot's instructions and difficulty groups.
//! - [`worker`]: one simulator worker process (JSON lines over its stdin/stdout).
//! - [`pool`]: N workers over a queue of episodes; restart and one retry on a dead worker.
//! - [`policy`]: the policy endpoint (in-process model server, `--url`, scripted experts,
//!   random) and what its `/metadata` says it takes.
//! - [`metaworld`]: `openvla eval metaworld`.
//! - [`results`], [`stats`]: scores, Wilson intervals, results.json and the Markdown table.
//! - [`demos`]: `openvla sim demos metaworld`.
//! - [`cli`]: the subcommands.

#![warn(missing_docs)]

pub mod cli;
pub mod demos;
pub mod metaworld;
pub mod policy;
pub mod pool;
pub mod render;
pub mod results;
pub mod stats;
pub mod tasks;
pub mod worker;
