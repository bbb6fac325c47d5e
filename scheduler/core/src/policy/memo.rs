//! Memoised placement across decisions.
//!
//! Between two decisions only the nodes a decision touched change, and every node carries a
//! version that changes with its state. A [`Memo`] keeps each node's verdict per demand shape
//! and reuses it while the node's version is unchanged, so a decision costs work only for the
//! nodes that changed since the same shape was last asked. Decisions are identical to
//! [`super::place`]'s.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};

use super::{Context, Policy, Score, best_candidate, hash_str, mix, summarize_rejections};
use crate::cluster::{NodeName, Snapshot};
use crate::demand::Demand;
use crate::placement::{Candidate, Placement, Rejection, node_candidates, quick_reject};

/// Cached per-node verdicts. Use one per policy, workload and seed; it notices when those
/// change and starts over.
#[derive(Debug, Default)]
pub struct Memo {
    /// Demand shape → one dense table over node indices.
    tables: HashMap<u64, Table, std::hash::BuildHasherDefault<MixHasher>>,
    context: Option<(&'static str, u64, u64, u64, usize)>,
    /// The version source of the snapshots the cells describe: versions from another source
    /// are not comparable, so a snapshot from one starts the memo over.
    versions: Option<crate::cluster::Versions>,
    /// Cells over all tables, for the size bound.
    cells: usize,
    pub hits: u64,
    pub misses: u64,
    scratch: Scratch,
}

/// Buffers reused across node evaluations.
#[derive(Debug, Default)]
struct Scratch {
    cands: Vec<Candidate>,
    scores: Vec<Score>,
    /// Equal nodes evaluated in this pass; emptied at the start of every pass.
    twins: super::twins::Twins,
}

/// One demand shape's verdicts, indexed like [`Snapshot::nodes`]. A cell is valid while its
/// `version` equals the node's: versions are unique per node state within one source (the memo
/// starts over when the snapshot's source changes), so a cell also stays
/// correct when nodes are added or removed and indices shift (the version no longer matches).
/// Dense columns keep the scan over thousands of nodes to a few cache-friendly loads per node.
#[derive(Debug, Default)]
struct Table {
    version: Vec<u64>,
    /// Node score when the node fits, `NEG_INFINITY` when it cannot host the shape.
    score: Vec<f64>,
    /// Seeded tie-break rank of the node's name (as [`super::choose`]), set when it fits.
    tie: Vec<u64>,
    verdict: Vec<Entry>,
}

#[derive(Debug, Default)]
enum Entry {
    Fits(Candidate, Score),
    /// The node's candidates, for a policy whose scores depend on the pod ([`Policy::memoizable`]
    /// false): they are scored afresh for every pod, but not rebuilt.
    Open(Vec<Candidate>),
    /// Refused by the cheap pre-check ([`quick_reject`]); the reason is built only when a
    /// caller needs it (reasons cost string formatting).
    #[default]
    Unknown,
    Refused(Rejection),
}

/// Versions start at 1, so 0 marks a cell that was never filled.
const EMPTY: u64 = 0;

/// Beyond this many cells the memo starts over (cells of departed shapes are never asked again).
const MAX_CELLS: usize = 8_000_000;

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

/// Everything a verdict depends on besides the node: the demand without its pod identity, as
/// a hash. Callers that shard memos use it to send equal shapes to the same memo.
pub fn demand_shape(d: &Demand) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (d.cpu_milli, d.memory_mib, &d.gpu, &d.gpu_models, &d.node_selector, d.priority, &d.rules, d.device_plugin)
        .hash(&mut h);
    h.finish()
}

impl Memo {
    pub fn new() -> Self {
        Self::default()
    }

    fn ready(&mut self, snap: &Snapshot, policy: &dyn Policy, ctx: &Context<'_>) {
        let key = (policy.name(), ctx.seed, fingerprint(ctx), snap.max_node_cpu_milli(), snap.max_node_gpus());
        let foreign = self.versions.as_ref().is_some_and(|v| !v.same(snap.versions()));
        if foreign || self.versions.is_none() {
            self.versions = Some(snap.versions().clone());
        }
        if self.cells > MAX_CELLS || foreign {
            self.tables.clear();
            self.cells = 0;
        } else if self.context.is_some() && self.context != Some(key) {
            // Scores depend on the policy, the workload, the seed and the largest node; whether
            // a node can host a shape, and why not, depends only on the node and the shape. A new
            // context forgets the cells of nodes that fit and keeps the refusals.
            for t in self.tables.values_mut() {
                for (v, e) in t.version.iter_mut().zip(&t.verdict) {
                    if matches!(e, Entry::Fits(..) | Entry::Open(_)) {
                        *v = EMPTY;
                    }
                }
            }
        }
        self.context = Some(key);
    }

    /// `shape`'s table, sized for the snapshot's nodes, and the scratch buffers.
    fn table(&mut self, sh: u64, n: usize) -> (&mut Table, &mut Scratch) {
        let table = self.tables.entry(sh).or_default();
        if table.version.len() < n {
            self.cells += n - table.version.len();
            table.version.resize(n, EMPTY);
            table.score.resize(n, f64::NEG_INFINITY);
            table.tie.resize(n, 0);
            table.verdict.resize_with(n, Entry::default);
        }
        // A pass's twins hold verdicts for this snapshot, demand and context only.
        self.scratch.twins = Default::default();
        (table, &mut self.scratch)
    }
}

/// What one decision's refreshes need besides the table.
struct Ask<'a, 'w> {
    snap: &'a Snapshot,
    demand: &'a Demand,
    policy: &'a dyn Policy,
    ctx: &'a Context<'w>,
}

impl Table {
    /// Brings node `ni`'s cell up to date; with `reasons`, a refusal also carries its reason.
    /// Returns whether the cell was still valid (a memo hit).
    fn refresh(&mut self, ask: &Ask<'_, '_>, ni: usize, reasons: bool, scratch: &mut Scratch) -> bool {
        let node = &ask.snap.nodes()[ni];
        let hit = self.version[ni] == node.version();
        if hit && (!reasons || !matches!(self.verdict[ni], Entry::Unknown)) {
            return true;
        }
        self.version[ni] = node.version();
        self.score[ni] = f64::NEG_INFINITY;
        if !reasons && quick_reject(node, ask.demand) {
            self.verdict[ni] = Entry::Unknown;
            return hit;
        }
        if !ask.policy.memoizable() {
            scratch.cands.clear();
            self.verdict[ni] = match node_candidates(ask.snap, ni, ask.demand, &mut scratch.cands) {
                Ok(()) => {
                    self.score[ni] = 0.0;
                    Entry::Open(std::mem::take(&mut scratch.cands))
                }
                Err(r) => Entry::Refused(r),
            };
        } else {
            let v = scratch.twins.verdict(
                ask.snap,
                ni,
                ask.demand,
                ask.policy,
                ask.ctx,
                &mut scratch.cands,
                &mut scratch.scores,
            );
            self.verdict[ni] = match v {
                Ok((c, s)) => {
                    self.score[ni] = s.node;
                    Entry::Fits(c, s)
                }
                Err(r) => Entry::Refused(r),
            };
        }
        if matches!(self.verdict[ni], Entry::Fits(..) | Entry::Open(_)) {
            self.tie[ni] = hash_str(mix(ask.ctx.seed), &node.name.0);
        }
        hit
    }
}

/// [`super::place`] with a memo: identical decisions. Policies that depend on the pod's
/// identity ([`Policy::memoizable`] false) reuse each node's candidates and score them afresh.
pub fn place_memo(
    snap: &Snapshot,
    demand: &Demand,
    policy: &dyn Policy,
    ctx: &Context<'_>,
    memo: &mut Memo,
) -> Result<Placement, Rejection> {
    demand.validate().map_err(|e| Rejection::unresolvable(e.to_string()))?;
    memo.ready(snap, policy, ctx);
    let sh = demand_shape(demand);
    let n = snap.nodes().len();
    let ask = Ask { snap, demand, policy, ctx };
    let rescore = !policy.memoizable();
    let (table, scratch) = memo.table(sh, n);
    // Refresh stale cells and keep the best node, ties to the seeded node order (as `choose`);
    // `pick` is the chosen candidate's position when candidates are scored per pod.
    let (mut hits, mut best) = (0u64, None::<(usize, f64, usize)>);
    for ni in 0..n {
        hits += u64::from(table.refresh(&ask, ni, false, scratch));
        let (s, pick) = if rescore {
            let Entry::Open(cands) = &table.verdict[ni] else { continue };
            scratch.scores.clear();
            policy.score_node(snap, demand, cands, ctx, &mut scratch.scores);
            let (i, sc) = best_candidate(&scratch.scores);
            (sc.node, i)
        } else {
            (table.score[ni], 0)
        };
        if s == f64::NEG_INFINITY {
            continue;
        }
        if best.is_none_or(|(b, bs, _)| s > bs || s == bs && table.tie[ni] > table.tie[b]) {
            best = Some((ni, s, pick));
        }
    }
    let chosen = best.and_then(|(ni, s, pick)| match &table.verdict[ni] {
        Entry::Fits(c, _) => Some((ni, c, s)),
        Entry::Open(cands) => cands.get(pick).map(|c| (ni, c, s)),
        _ => None,
    });
    let result = match chosen {
        Some((ni, c, score)) => {
            Ok(Placement { node: snap.nodes()[ni].name.clone(), grants: c.grants.to_vec(), ops: c.ops.clone(), score })
        }
        None => {
            // Nothing fits: explain over the whole cluster, as `place` does. Reasons are cached
            // too, so a shape that keeps failing only re-explains the nodes that changed.
            for ni in 0..n {
                table.refresh(&ask, ni, true, scratch);
            }
            let refused =
                table.verdict[..n].iter().filter_map(|e| if let Entry::Refused(r) = e { Some(r) } else { None });
            Err(summarize_rejections(demand, n, refused))
        }
    };
    memo.hits += hits;
    memo.misses += n as u64 - hits;
    result
}

/// Finds node names in a snapshot, expecting each name to follow the previous one in node
/// order: kube-scheduler lists the nodes it offers in its own node order (all of them, or a
/// window of them that wraps around once), so one name comparison usually replaces a search of
/// the name index.
#[derive(Debug, Default)]
pub struct NameCursor {
    next: usize,
}

impl NameCursor {
    /// The index of `name` in `snap`'s nodes.
    pub fn find(&mut self, snap: &Snapshot, name: &crate::cluster::NodeName) -> Option<usize> {
        let nodes = snap.nodes();
        let ni = match nodes.get(self.next) {
            Some(n) if n.name == *name => self.next,
            _ if self.next == nodes.len() && nodes.first().is_some_and(|n| n.name == *name) => 0,
            _ => snap.node_index(name)?,
        };
        self.next = ni + 1;
        Some(ni)
    }
}

/// [`super::evaluate`] with a memo: per-node verdicts for every node (or the named ones), as
/// the extender's filter needs them, reusing verdicts of nodes whose state has not changed.
pub fn evaluate_memo(
    snap: &Snapshot,
    demand: &Demand,
    policy: &dyn Policy,
    ctx: &Context<'_>,
    only: Option<&[NodeName]>,
    memo: &mut Memo,
) -> Result<Vec<super::NodeVerdict>, crate::Error> {
    if !policy.memoizable() {
        return super::evaluate(snap, demand, policy, ctx, only);
    }
    demand.validate()?;
    let ask = Ask { snap, demand, policy, ctx };
    Ok(match only {
        None => memo_pass(&ask, memo, (0..snap.nodes().len()).map(|i| (Some(i), snap.nodes()[i].name.clone()))),
        Some(names) => {
            let mut at = NameCursor::default();
            memo_pass(&ask, memo, names.iter().map(move |n| (at.find(snap, n), n.clone())))
        }
    })
}

/// [`evaluate_memo`] over offered names the caller owns: each verdict takes its name from
/// `names` instead of a copy (the extender's filter, thousands of names per request). On an
/// invalid demand the names come back with the error.
pub fn evaluate_memo_offered(
    snap: &Snapshot,
    demand: &Demand,
    policy: &dyn Policy,
    ctx: &Context<'_>,
    names: Vec<NodeName>,
    memo: &mut Memo,
) -> Result<Vec<super::NodeVerdict>, Box<(crate::Error, Vec<NodeName>)>> {
    if let Err(e) = demand.validate() {
        return Err(Box::new((e, names)));
    }
    if !policy.memoizable() {
        return super::evaluate(snap, demand, policy, ctx, Some(&names)).map_err(|e| Box::new((e, names)));
    }
    let ask = Ask { snap, demand, policy, ctx };
    let mut at = NameCursor::default();
    Ok(memo_pass(&ask, memo, names.into_iter().map(move |n| (at.find(snap, &n), n))))
}

/// One memoised pass over the offered nodes: each item is the node's index (`None`: not in
/// the snapshot) and the name its verdict carries.
fn memo_pass(
    ask: &Ask<'_, '_>,
    memo: &mut Memo,
    offered: impl ExactSizeIterator<Item = (Option<usize>, NodeName)>,
) -> Vec<super::NodeVerdict> {
    let snap = ask.snap;
    memo.ready(snap, ask.policy, ask.ctx);
    let sh = demand_shape(ask.demand);
    let (table, scratch) = memo.table(sh, snap.nodes().len());
    let (mut hits, mut misses) = (0u64, 0u64);
    let mut out = Vec::with_capacity(offered.len());
    for (found, name) in offered {
        let Some(ni) = found else {
            let why = Rejection::unresolvable("unknown to tessera").at_node(name.clone());
            out.push(super::NodeVerdict { node: name, outcome: Err(why) });
            continue;
        };
        if table.refresh(ask, ni, true, scratch) {
            hits += 1;
        } else {
            misses += 1;
        }
        let outcome = match &table.verdict[ni] {
            Entry::Fits(c, s) => {
                let mut c = c.clone();
                c.node = ni;
                Ok((c, *s))
            }
            Entry::Refused(r) => Err(r.clone()),
            // `refresh` with reasons never leaves a cell unknown, and this policy is memoizable.
            Entry::Unknown | Entry::Open(_) => {
                Err(Rejection::unschedulable("not evaluated").at_node(snap.nodes()[ni].name.clone()))
            }
        };
        out.push(super::NodeVerdict { node: name, outcome });
    }
    memo.hits += hits;
    memo.misses += misses;
    out
}
