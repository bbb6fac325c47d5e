//! Runs the `tessera-mig-manager` binary against fake GPUs, as an operator would locally.

mod cli;
mod handoff;
