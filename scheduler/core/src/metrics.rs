//! Packing metrics: allocation ratio, FGD's fragmentation measure (extended to MIG), stranded
//! capacity, largest placeable profile per GPU, MIG reconfigurations.
//!
//! Fragmentation follows the FGD paper: for a node `n` and an expected demand class `m`, the
//! fragment `F_n(m)` is the free GPU capacity that `m` cannot use; the node's fragmentation is
//! `Σ_m p_m · F_n(m)` over the workload's popularity `p`. tessera extends "can use" to MIG: a
//! MIG GPU's free compute is usable by a MIG class when the class has a free instance or a
//! legal new placement there.

use serde::{Deserialize, Serialize};

use crate::cluster::{Gpu, GpuMode, MILLI_PER_GPU, Node, Snapshot};
use crate::demand::{GpuDemand, smallest_fitting_profile};
use crate::mig::{Instance, MigProduct, Profile, ProfileClass};
use crate::policy::{Workload, WorkloadClass};

/// A light, copyable view of one GPU's free state, so a candidate's effect can be evaluated
/// without cloning the node.
#[derive(Clone, Copy, Debug)]
pub struct GpuView<'a> {
    pub product: Option<MigProduct>,
    pub mode: GpuMode,
    pub healthy: bool,
    pub memory_mib: u64,
    /// Full/Shared: free milli-GPU.
    pub free_milli: u32,
    /// Mig: occupied memory slices, allocated instance starts, instances.
    pub mig_mask: u8,
    pub busy: u8,
    pub instances: &'a [Instance],
    /// An instance a candidate would create (not yet in `instances`).
    pub extra: Option<Instance>,
    /// Starts of `instances` a candidate would destroy (repartitioning free instances).
    pub gone: u8,
    /// [`GpuView::free`], computed when the view is made or changed: scoring asks for it
    /// many times per candidate.
    free_now: u32,
}

impl<'a> GpuView<'a> {
    pub fn of(g: &'a Gpu) -> Self {
        let layout = g.mig_layout();
        Self {
            product: g.mig_product(),
            mode: g.mode(),
            healthy: g.healthy,
            memory_mib: g.memory_mib,
            free_milli: if g.mode() == GpuMode::Mig { 0 } else { MILLI_PER_GPU - g.used_milli() },
            mig_mask: layout.map_or(0, |l| l.used_mask()),
            busy: g.mig_busy,
            instances: layout.map_or(&[], |l| l.instances()),
            extra: None,
            gone: 0,
            free_now: 0,
        }
        .refreshed()
    }

    /// The view with its cached free capacity recomputed (after its fields changed).
    fn refreshed(mut self) -> Self {
        self.free_now = self.compute_free();
        self
    }

    fn instance_iter(&self) -> impl Iterator<Item = Instance> + '_ {
        self.instances.iter().copied().filter(|i| self.gone & (1 << i.start) == 0).chain(self.extra)
    }

    /// Free capacity in milli-GPU: shares as is; MIG by compute slices not held by pods.
    pub fn free(&self) -> u32 {
        self.free_now
    }

    fn compute_free(&self) -> u32 {
        if !self.healthy {
            return 0;
        }
        match (self.mode, self.product) {
            (GpuMode::Mig, Some(p)) => {
                let geom = p.geometry();
                let held: u32 = self
                    .instance_iter()
                    .filter(|i| self.busy & (1 << i.start) != 0)
                    .filter_map(|i| geom.profile(i.class))
                    .map(|p| u32::from(p.compute_slices))
                    .sum();
                (u32::from(geom.compute_slices).saturating_sub(held)) * MILLI_PER_GPU / u32::from(geom.compute_slices)
            }
            _ => self.free_milli,
        }
    }

    /// No pod on it: it can be taken whole (a MIG GPU's free instances are destroyed first, as
    /// placement does) or repartitioned.
    pub fn idle(&self) -> bool {
        match self.mode {
            GpuMode::Mig => self.busy == 0,
            _ => self.free_milli == MILLI_PER_GPU,
        }
    }

    /// Whether a MIG profile could be served now: a free instance of its class, or a legal
    /// new placement (memory-slice overlap and the instance limit).
    pub fn mig_usable(&self, p: &Profile) -> bool {
        match self.mode {
            GpuMode::Mig => {
                if self.instance_iter().any(|i| i.class == p.class && self.busy & (1 << i.start) == 0) {
                    return true;
                }
                let count = self.instance_iter().count();
                let max = self.product.map_or(7, |pr| pr.geometry().max_instances as usize);
                count < max && p.starts.iter().any(|&s| p.mask_at(s) & self.mig_mask == 0)
            }
            _ => self.idle(),
        }
    }

    /// Largest profile that could still be created (ignoring media variants).
    pub fn largest_placeable(&self) -> Option<&'static Profile> {
        let geom = self.product?.geometry();
        if self.mode != GpuMode::Mig {
            return if self.idle() { geom.profiles.last() } else { None };
        }
        geom.profiles.iter().rev().filter(|p| !p.class.has_media()).find(|p| {
            p.starts.iter().any(|&s| p.mask_at(s) & self.mig_mask == 0)
                && self.instance_iter().count() < geom.max_instances as usize
        })
    }
}

/// Whether free capacity on this GPU is usable by one more pod of class `m`.
pub fn gpu_usable_by(v: &GpuView<'_>, m: &GpuDemand) -> bool {
    if !v.healthy {
        return false;
    }
    match m {
        GpuDemand::None => false,
        GpuDemand::Share { milli } => v.mode == GpuMode::Shared && v.free_milli >= *milli,
        GpuDemand::Whole { .. } => v.idle(),
        GpuDemand::Mig { .. } | GpuDemand::Model { .. } => gpu_unusable(v, m) < v.free(),
    }
}

/// The MIG profile a class would take on this GPU, if it takes a MIG instance at all.
fn mig_profile_for(v: &GpuView<'_>, m: &GpuDemand) -> Option<&'static Profile> {
    let geom = v.product?.geometry();
    match m {
        GpuDemand::Mig { profile } => geom.profile_by_name(profile),
        GpuDemand::Model { memory_mib, compute_slices } => smallest_fitting_profile(geom, *memory_mib, *compute_slices),
        _ => None,
    }
}

/// How many more instances of `p` fit on a layout with occupied `mask` and `existing`
/// instances (`of_class` of them of `p`'s class): greedy lowest start, which is optimal for
/// equal-length intervals.
fn max_new_instances(p: &Profile, mut mask: u8, existing: usize, of_class: usize, max_instances: usize) -> usize {
    let mut room = max_instances.saturating_sub(existing).min((p.max_count as usize).saturating_sub(of_class));
    let mut n = 0;
    for &s in p.starts {
        if room == 0 {
            break;
        }
        let m = p.mask_at(s);
        if m & mask == 0 {
            mask |= m;
            n += 1;
            room -= 1;
        }
    }
    n
}

/// Free capacity (milli-GPU) on this GPU that class `m` cannot use: for shares and whole GPUs
/// as FGD defines it (all or nothing per GPU); for MIG classes, the free compute left over
/// after filling the GPU with as many instances of the class as still fit.
pub fn gpu_unusable(v: &GpuView<'_>, m: &GpuDemand) -> u32 {
    let free = v.free();
    if free == 0 {
        return 0;
    }
    let usable = match m {
        GpuDemand::None => false,
        GpuDemand::Share { milli } => v.mode == GpuMode::Shared && v.free_milli >= *milli,
        GpuDemand::Whole { .. } => v.idle(),
        GpuDemand::Mig { .. } | GpuDemand::Model { .. } => {
            let Some(p) = mig_profile_for(v, m) else {
                // No sub-GPU profile: a model that needs a whole GPU uses an idle one.
                return match m {
                    GpuDemand::Model { memory_mib, .. } if *memory_mib <= v.memory_mib && v.idle() => 0,
                    _ => free,
                };
            };
            let geom = v.product.map(|p| p.geometry());
            let compute = geom.map_or(7, |g| u32::from(g.compute_slices));
            let max_inst = geom.map_or(7, |g| g.max_instances as usize);
            let count = match v.mode {
                GpuMode::Mig => {
                    let insts: smallvec::SmallVec<[Instance; 8]> = v.instance_iter().collect();
                    let free_of_class =
                        insts.iter().filter(|i| i.class == p.class && v.busy & (1 << i.start) == 0).count();
                    let of_class = insts.iter().filter(|i| i.class == p.class).count();
                    free_of_class + max_new_instances(p, v.mig_mask, insts.len(), of_class, max_inst)
                }
                _ if v.idle() => max_new_instances(p, 0, 0, 0, max_inst),
                _ => 0,
            };
            // A model also runs in a larger free instance as is (placement offers it), so that
            // capacity is usable by the model class, not fragment.
            let larger: u32 = match (m, v.mode, geom) {
                (GpuDemand::Model { memory_mib, compute_slices }, GpuMode::Mig, Some(g)) => v
                    .instance_iter()
                    .filter(|i| i.class != p.class && v.busy & (1 << i.start) == 0)
                    .filter_map(|i| g.profile(i.class))
                    .filter(|ip| ip.memory_mib >= *memory_mib && compute_slices.is_none_or(|c| ip.compute_slices >= c))
                    .map(|ip| u32::from(ip.compute_slices))
                    .sum(),
                _ => 0,
            };
            let slices = count as u32 * u32::from(p.compute_slices) + larger;
            let usable = (slices * MILLI_PER_GPU / compute).min(free);
            return free - usable;
        }
    };
    if usable { 0 } else { free }
}

/// `F_n(M) = Σ_m p_m F_n(m)`; `model` is the node's GPU model.
pub fn node_fragmentation(views: &[GpuView<'_>], free_cpu_milli: u64, model: &str, workload: &Workload) -> f64 {
    FragBase::new(views, workload).fragmentation(free_cpu_milli, model, workload)
}

/// The per-class sums `F_n(M)` is made of, for one node: a candidate changes only the GPUs it
/// touches, so its fragmentation follows from these by re-evaluating just those GPUs
/// ([`FragBase::fragmentation_after`]) instead of the whole node. Sums are kept per distinct
/// GPU demand of the workload (classes that differ only in cpu share them).
#[derive(Clone, Debug, PartialEq)]
pub struct FragBase {
    /// Free milli-GPU on the node.
    total: u32,
    /// GPUs that are idle with capacity (whole-GPU classes need `count` of them).
    idle: u32,
    /// Per distinct GPU demand: free milli-GPU it cannot use, summed over the node's GPUs.
    unusable: smallvec::SmallVec<[u32; 32]>,
    /// The same, GPU by GPU (GPU-major): what a change to one GPU takes away.
    per_gpu: Vec<u32>,
}

impl FragBase {
    pub fn new(views: &[GpuView<'_>], workload: &Workload) -> Self {
        let kinds = &workload.kinds().gpu;
        let total = views.iter().map(|v| v.free()).sum();
        let idle = views.iter().filter(|v| v.idle() && v.free() > 0).count() as u32;
        let mut unusable: smallvec::SmallVec<[u32; 32]> = smallvec::smallvec![0; kinds.len()];
        let mut per_gpu = Vec::with_capacity(views.len() * kinds.len());
        for v in views {
            for (u, m) in unusable.iter_mut().zip(kinds) {
                let x = gpu_unusable(v, m);
                *u += x;
                per_gpu.push(x);
            }
        }
        Self { total, idle, unusable, per_gpu }
    }

    /// The base after GPUs at `touched` positions change from `before` to `after` views.
    pub fn with_change(
        &self,
        before: &[GpuView<'_>],
        after: &[GpuView<'_>],
        touched: &[usize],
        workload: &Workload,
    ) -> Self {
        let kinds = &workload.kinds().gpu;
        let mut next = self.clone();
        for &t in touched {
            let (b, a) = (&before[t], &after[t]);
            next.total = next.total + a.free() - b.free();
            next.idle = next.idle + u32::from(a.idle() && a.free() > 0) - u32::from(b.idle() && b.free() > 0);
            for (k, m) in kinds.iter().enumerate() {
                let x = gpu_unusable(a, m);
                next.unusable[k] = next.unusable[k] + x - next.per_gpu[t * kinds.len() + k];
                next.per_gpu[t * kinds.len() + k] = x;
            }
        }
        next
    }

    /// `F_n(M)` after the GPUs at `touched` positions change to `after` (the node's views
    /// after a candidate), without building the new base: the scoring hot path.
    pub fn fragmentation_after(
        &self,
        before: &[GpuView<'_>],
        after: &[GpuView<'_>],
        touched: &[usize],
        free_cpu_milli: u64,
        model: &str,
        workload: &Workload,
    ) -> f64 {
        let kinds = &workload.kinds().gpu;
        let (mut total, mut idle) = (self.total, self.idle);
        let mut unusable = self.unusable.clone();
        for &t in touched {
            let (b, a) = (&before[t], &after[t]);
            total = total + a.free() - b.free();
            idle = idle + u32::from(a.idle() && a.free() > 0) - u32::from(b.idle() && b.free() > 0);
            for (k, m) in kinds.iter().enumerate() {
                unusable[k] = unusable[k] + gpu_unusable(a, m) - self.per_gpu[t * kinds.len() + k];
            }
        }
        frag_of(total, idle, &unusable, free_cpu_milli, model, workload)
    }

    /// `F_n(M)` given the node's free cpu and GPU model.
    pub fn fragmentation(&self, free_cpu_milli: u64, model: &str, workload: &Workload) -> f64 {
        frag_of(self.total, self.idle, &self.unusable, free_cpu_milli, model, workload)
    }
}

fn frag_of(total: u32, idle: u32, unusable: &[u32], free_cpu_milli: u64, model: &str, workload: &Workload) -> f64 {
    if total == 0 {
        return 0.0;
    }
    let of_class = &workload.kinds().of_class;
    let total_f = f64::from(total);
    workload
        .classes
        .iter()
        .zip(of_class)
        .map(|(m, &k)| {
            // A class that cannot run on this node at all strands every free GPU here (FGD's
            // Q-I, "no access" for a GPU model it may not use), and so does a class that asks
            // for no GPU.
            let model_ok = m.gpu_models.is_empty() || m.gpu_models.iter().any(|x| x.eq_ignore_ascii_case(model));
            // A whole-GPU class with too few idle GPUs strands everything too.
            let cannot_run = m.cpu_milli > free_cpu_milli
                || m.gpu == GpuDemand::None
                || !model_ok
                || matches!(m.gpu, GpuDemand::Whole { count } if idle < count);
            let f = if cannot_run { total_f } else { f64::from(unusable[k]) };
            m.weight * f
        })
        .sum()
}

/// The GPU model a node's fragmentation is judged by (its first GPU's).
pub fn node_model(node: &Node) -> &str {
    node.gpus.first().map_or("", |g| g.model.as_str())
}

/// Views of every GPU on a node.
pub fn views(node: &Node) -> Views<'_> {
    node.gpus.iter().map(GpuView::of).collect()
}

/// A node's GPU views; inline up to 8 GPUs (one HGX board), so scoring does not allocate.
pub type Views<'a> = smallvec::SmallVec<[GpuView<'a>; 8]>;

/// Packing state of a set of nodes (a pool, or the whole cluster).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Packing {
    pub nodes: u32,
    pub gpus: u32,
    /// Allocated milli-GPU over total milli-GPU (MIG instances count by compute slices).
    pub allocation_ratio: f64,
    pub allocated_milli: u64,
    pub total_milli: u64,
    /// FGD fragmentation of the free capacity for the workload, in milli-GPU.
    pub fragmentation_milli: f64,
    /// Free MIG compute slices that no known demand class can use right now.
    pub stranded_slices: u32,
    /// MIG create/destroy operations applied so far.
    pub reconfigs: u64,
    /// GPUs whose free slices can still hold each profile size (`7g`, `4g`, ... `none`).
    pub largest_placeable: std::collections::BTreeMap<String, u32>,
}

/// Computes packing metrics over the nodes `filter` keeps.
pub fn packing(snap: &Snapshot, workload: &Workload, filter: impl Fn(&Node) -> bool) -> Packing {
    let mut p = Packing { reconfigs: snap.reconfigs(), ..Default::default() };
    let mig_classes: Vec<&WorkloadClass> =
        workload.classes.iter().filter(|c| matches!(c.gpu, GpuDemand::Mig { .. } | GpuDemand::Model { .. })).collect();
    for node in snap.nodes().iter().filter(|n| filter(n)) {
        p.nodes += 1;
        let vs = views(node);
        for (g, v) in node.gpus.iter().zip(&vs) {
            p.gpus += 1;
            p.total_milli += u64::from(MILLI_PER_GPU);
            p.allocated_milli += u64::from(g.allocated_milli());
            if let Some(l) = g.mig_layout() {
                let free_slices = u32::from(l.geometry().compute_slices) - u32::from(l.used_compute());
                let usable = mig_classes.iter().any(|m| gpu_usable_by(v, &m.gpu));
                // With no MIG demand known, no free slice is stranded: nothing says which
                // profiles are wanted.
                if free_slices > 0 && !mig_classes.is_empty() && !usable {
                    p.stranded_slices += free_slices;
                }
            }
            let key = match v.largest_placeable() {
                Some(pr) => short_class(pr.class).to_owned(),
                None if g.mig_capable() => "none".to_owned(),
                None => continue,
            };
            *p.largest_placeable.entry(key).or_default() += 1;
        }
        p.fragmentation_milli += node_fragmentation(&vs, node.free_cpu_milli(), node_model(node), workload);
    }
    if p.total_milli > 0 {
        p.allocation_ratio = p.allocated_milli as f64 / p.total_milli as f64;
    }
    p
}

fn short_class(c: ProfileClass) -> &'static str {
    match c {
        ProfileClass::G1 | ProfileClass::G1Me => "1g",
        ProfileClass::G1X2 => "1g.2x",
        ProfileClass::G2 | ProfileClass::G2Me => "2g",
        ProfileClass::G3 => "3g",
        ProfileClass::G4 => "4g",
        ProfileClass::G7 => "7g",
    }
}

/// The node's GPU views after a candidate's MIG steps and grants.
pub fn views_after<'a>(node: &'a Node, cand: &crate::placement::Candidate) -> Views<'a> {
    let mut vs = views(node);
    apply_candidate(&mut vs, node, cand);
    vs
}

/// Positions (in `node.gpus`) of the GPUs a candidate grants or reconfigures.
pub(crate) fn touched(node: &Node, c: &crate::placement::Candidate) -> smallvec::SmallVec<[usize; 8]> {
    let mut out: smallvec::SmallVec<[usize; 8]> = smallvec::SmallVec::new();
    let ids = c.grants.iter().map(|g| g.gpu()).chain(c.ops.iter().map(|op| match *op {
        crate::cluster::MigOp::SetMode { gpu, .. }
        | crate::cluster::MigOp::Create { gpu, .. }
        | crate::cluster::MigOp::Destroy { gpu, .. } => gpu,
    }));
    for id in ids {
        if let Some(p) = node.gpus.iter().position(|g| g.index == id)
            && !out.contains(&p)
        {
            out.push(p);
        }
    }
    out
}

/// Applies a candidate to views of `node`'s GPUs (same order as `node.gpus`).
pub fn apply_candidate(vs: &mut [GpuView<'_>], node: &Node, cand: &crate::placement::Candidate) {
    use crate::cluster::{Grant, MigOp};
    let pos = |gpu: u32| node.gpus.iter().position(|g| g.index == gpu);
    let changed = touched(node, cand);
    for op in &cand.ops {
        match *op {
            MigOp::SetMode { gpu, mode } => {
                if let Some(v) = pos(gpu).map(|i| &mut vs[i]) {
                    v.mode = mode;
                    v.instances = &[];
                    v.extra = None;
                    v.gone = 0;
                    v.mig_mask = 0;
                    v.busy = 0;
                    v.free_milli = if mode == GpuMode::Mig { 0 } else { MILLI_PER_GPU };
                }
            }
            MigOp::Create { gpu, class, start } => {
                if let Some(v) = pos(gpu).map(|i| &mut vs[i]) {
                    let mask = v.product.and_then(|p| p.geometry().profile(class)).map_or(0, |p| p.mask_at(start));
                    v.mig_mask |= mask;
                    v.extra = Some(Instance { class, start });
                }
            }
            MigOp::Destroy { gpu, class, start } => {
                if let Some(v) = pos(gpu).map(|i| &mut vs[i]) {
                    let mask = v.product.and_then(|p| p.geometry().profile(class)).map_or(0, |p| p.mask_at(start));
                    v.mig_mask &= !mask;
                    v.gone |= 1 << start;
                }
            }
        }
    }
    for g in &cand.grants {
        let Some(v) = pos(g.gpu()).map(|i| &mut vs[i]) else { continue };
        match *g {
            Grant::Whole { .. } => v.free_milli = 0,
            Grant::Share { milli, .. } => v.free_milli = v.free_milli.saturating_sub(milli),
            Grant::Mig { start, .. } => v.busy |= 1 << start,
        }
    }
    for i in changed {
        if let Some(v) = vs.get_mut(i) {
            *v = v.refreshed();
        }
    }
}
