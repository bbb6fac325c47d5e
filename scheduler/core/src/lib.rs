//! Deterministic GPU placement. No I/O, no clocks.
//!
//! Map of the key types:
//! - [`mig`]: NVIDIA MIG geometry per product ([`mig::Geometry`], [`mig::Profile`]) and the
//!   per-GPU [`mig::MigLayout`] that accepts an instance only where NVIDIA would.

pub mod mig;
