//! The policy a scenario runs under: a core policy by name, or `static` (first-fit on the fixed
//! layout, wrapped so that it never asks for MIG changes).

use anyhow::{Context as _, Result};
use tessera_core::cluster::Snapshot;
use tessera_core::demand::Demand;
use tessera_core::placement::Candidate;
use tessera_core::policy::{Context, Policy, Score};

/// The name of the static baseline among the policies.
pub(super) const STATIC: &str = "static";

/// The policy named `name`; `static` is first-fit behind [`NoReconfig`].
pub(super) fn by_name(name: &str) -> Result<Box<dyn Policy>> {
    let is_static = name == STATIC;
    let base = tessera_core::policy::by_name(if is_static { "first-fit" } else { name })
        .with_context(|| format!("unknown policy {name:?}"))?;
    Ok(if is_static { Box::new(NoReconfig(base)) } else { base })
}

/// Forbids reconfiguration: candidates with MIG steps lose to any candidate without.
#[derive(Debug)]
struct NoReconfig(Box<dyn Policy>);

const FORBIDDEN: f64 = 1e15;

impl Policy for NoReconfig {
    fn name(&self) -> &'static str {
        STATIC
    }
    fn score(&self, snap: &Snapshot, d: &Demand, c: &Candidate, ctx: &Context<'_>) -> Score {
        let s = self.0.score(snap, d, c, ctx);
        if c.ops.is_empty() { s } else { Score::new(s.node - FORBIDDEN, s.device) }
    }
}
