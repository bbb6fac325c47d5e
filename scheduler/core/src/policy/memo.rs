//! Memoised placement across decisions.
//!
//! Between two decisions only the nodes a decision touched change, and every node carries a
//! version that changes with its state. A [`Memo`] keeps each node's verdict per demand shape
//! and reuses it while the node's version is unchanged, so a decision costs work only for the
//! nodes that changed since the same shape was last asked. Decisions are identical to
//! [`super::place`]'s.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};

use super::{Context, Policy, Score, evaluate_at, hash_str, mix, summarize};
use crate::cluster::Snapshot;
use crate::demand::Demand;
use crate::placement::{Candidate, Placement, Rejection, quick_reject};

/// Cached per-node verdicts. Use one per policy, workload and seed; it notices when those
/// change and starts over.
#[derive(Debug, Default)]
pub struct Memo {
    /// (node version, demand shape) → that node's verdict.
    entries: HashMap<(u64, u64), Verdict, std::hash::BuildHasherDefault<MixHasher>>,
    context: Option<(&'static str, u64, u64, u64, usize)>,
    pub hits: u64,
    pub misses: u64,
}

/// One node's verdict for one demand shape.
type Verdict = Result<(Candidate, Score), Rejection>;

/// Beyond this many entries the memo starts over (stale versions are never asked again).
const MAX_ENTRIES: usize = 2_000_000;

/// Keys are already well-mixed 64-bit values (versions and SipHash shapes): fold, don't rehash.
#[derive(Debug, Default)]
struct MixHasher(u64);

impl Hasher for MixHasher {
    fn finish(&self) -> u64 {
        mix(self.0)
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_u64(&mut self, x: u64) {
        self.0 = self.0.rotate_left(29) ^ x;
    }
}

fn fingerprint(ctx: &Context<'_>) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for c in &ctx.workload.classes {
        c.cpu_milli.hash(&mut h);
        c.gpu.hash(&mut h);
        c.gpu_models.hash(&mut h);
        c.weight.to_bits().hash(&mut h);
    }
    h.finish()
}

/// Everything a verdict depends on besides the node: the demand without its pod identity.
fn shape(d: &Demand) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (d.cpu_milli, d.memory_mib, &d.gpu, &d.gpu_models, &d.node_selector, d.priority).hash(&mut h);
    h.finish()
}

impl Memo {
    pub fn new() -> Self {
        Self::default()
    }

    fn ready(&mut self, snap: &Snapshot, policy: &dyn Policy, ctx: &Context<'_>) {
        let key = (policy.name(), ctx.seed, fingerprint(ctx), snap.max_node_cpu_milli(), snap.max_node_gpus());
        if self.context != Some(key) || self.entries.len() > MAX_ENTRIES {
            self.entries.clear();
            self.context = Some(key);
        }
    }
}

/// [`super::place`] with a memo. Policies that depend on the pod's identity
/// ([`Policy::memoizable`] false) are evaluated afresh.
pub fn place_memo(
    snap: &Snapshot,
    demand: &Demand,
    policy: &dyn Policy,
    ctx: &Context<'_>,
    memo: &mut Memo,
) -> Result<Placement, Rejection> {
    if !policy.memoizable() {
        return super::place(snap, demand, policy, ctx);
    }
    demand.validate().map_err(|e| Rejection::Unresolvable(e.to_string()))?;
    memo.ready(snap, policy, ctx);
    let sh = shape(demand);
    // Pass 1: make sure every open node has a verdict for this shape.
    let mut open: Vec<usize> = Vec::new();
    for (ni, node) in snap.nodes().iter().enumerate() {
        if quick_reject(node, demand) {
            continue;
        }
        open.push(ni);
        let key = (node.version(), sh);
        if memo.entries.contains_key(&key) {
            memo.hits += 1;
        } else {
            memo.misses += 1;
            let v = evaluate_at(snap, demand, policy, ctx, std::iter::once(ni)).pop().map(|v| v.outcome);
            let v = v.unwrap_or_else(|| Err(Rejection::Unschedulable(format!("node {}: not evaluated", node.name))));
            memo.entries.insert(key, v);
        }
    }
    // Pass 2: the best node, ties to the seeded node order (as `choose`).
    let salt = mix(ctx.seed);
    let mut best: Option<(f64, usize, &Candidate)> = None;
    for &ni in &open {
        let node = &snap.nodes()[ni];
        let Some(Ok((c, s))) = memo.entries.get(&(node.version(), sh)) else { continue };
        let better = match best {
            None => true,
            Some((b, bi, _)) => {
                s.node > b || s.node == b && hash_str(salt, &node.name.0) > hash_str(salt, &snap.nodes()[bi].name.0)
            }
        };
        if better {
            best = Some((s.node, ni, c));
        }
    }
    match best {
        Some((score, ni, c)) => {
            Ok(Placement { node: snap.nodes()[ni].name.clone(), grants: c.grants.clone(), ops: c.ops.clone(), score })
        }
        None => {
            // Nothing fits: explain over the whole cluster, as `place` does.
            let all = evaluate_at(snap, demand, policy, ctx, 0..snap.nodes().len());
            Err(summarize(demand, &all))
        }
    }
}

/// [`super::evaluate`] with a memo: per-node verdicts for every node (or the named ones), as
/// the extender's filter needs them, reusing verdicts of nodes whose state has not changed.
pub fn evaluate_memo(
    snap: &Snapshot,
    demand: &Demand,
    policy: &dyn Policy,
    ctx: &Context<'_>,
    only: Option<&[crate::cluster::NodeName]>,
    memo: &mut Memo,
) -> Result<Vec<super::NodeVerdict>, crate::Error> {
    if !policy.memoizable() {
        return super::evaluate(snap, demand, policy, ctx, only);
    }
    demand.validate()?;
    memo.ready(snap, policy, ctx);
    let sh = shape(demand);
    let indices: Vec<Result<usize, &crate::cluster::NodeName>> = match only {
        None => (0..snap.nodes().len()).map(Ok).collect(),
        Some(names) => names.iter().map(|n| snap.node_index(n).ok_or(n)).collect(),
    };
    let mut out = Vec::with_capacity(indices.len());
    for i in indices {
        let ni = match i {
            Ok(ni) => ni,
            Err(name) => {
                out.push(super::NodeVerdict {
                    node: name.clone(),
                    outcome: Err(Rejection::Unresolvable(format!("node {name}: unknown to tessera"))),
                });
                continue;
            }
        };
        let node = &snap.nodes()[ni];
        let key = (node.version(), sh);
        let outcome = match memo.entries.get(&key) {
            Some(v) => {
                memo.hits += 1;
                v.clone()
            }
            None => {
                memo.misses += 1;
                let v = evaluate_at(snap, demand, policy, ctx, std::iter::once(ni)).pop().map(|v| v.outcome);
                let v =
                    v.unwrap_or_else(|| Err(Rejection::Unschedulable(format!("node {}: not evaluated", node.name))));
                memo.entries.insert(key, v.clone());
                v
            }
        };
        let outcome = outcome.map(|(mut c, s)| {
            c.node = ni;
            (c, s)
        });
        out.push(super::NodeVerdict { node: node.name.clone(), outcome });
    }
    Ok(out)
}
