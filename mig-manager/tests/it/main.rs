//! Runs the `tessera-mig-manager` binary against fake GPUs, as an operator would locally.
#![allow(clippy::disallowed_methods)] // tests wait on real processes with deadlines

mod cli;
mod handoff;
