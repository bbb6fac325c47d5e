//! Fake GPUs with exact MIG behaviour (from `tessera-core`'s geometry) and scriptable faults.
//!
//! ```text
//! FakeGpus::parse("h100x8:mig")?          // eight H100-80GB in MIG mode, no instances
//! FakeGpus::new(MigProduct::A100_80GB, 2, false).with_mig(0, &["3g.40gb", "3g.40gb"])?
//! ```
//! Faults: [`FakeGpus::fail_next`] (the next matching op fails), [`FakeGpus::crash_after`]
//! (every op after the next `n` fails, like a crash mid-plan), [`FakeGpus::remove_gpu`] (the GPU
//! falls off the bus), [`FakeGpus::set_slow`] (each op sleeps), and [`FakeGpus::set_busy`] (a
//! compute process runs on a device, so NVML refuses to destroy it).

use std::collections::BTreeSet;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use tessera_api::gpunode::LinkKind;
use tessera_core::mig::{MigLayout, MigProduct};
use tessera_core::{GpuMode, MigOp};

use super::{GpuBackend, GpuError, GpuInfo, Link, MigDevice, Sample};

#[derive(Clone, Debug)]
struct FakeGpu {
    info: GpuInfo,
    /// Present while in MIG mode.
    layout: Option<MigLayout>,
    /// UUID per instance start.
    uuids: Vec<(u8, String)>,
    present: bool,
}

#[derive(Debug, Default)]
struct State {
    gpus: Vec<FakeGpu>,
    next_mig: u64,
    busy: BTreeSet<String>,
    /// Ops that reached the fake (successful or not), in order.
    log: Vec<(MigOp, bool)>,
    fail_next: Vec<FailRule>,
    /// Ops still allowed before every op fails.
    crash_after: Option<usize>,
    slow: Duration,
    seed: u32,
    /// A MIG mode change stays pending until the GPU is reset, as on GPUs whose driver needs it.
    reset_required: bool,
    /// GPUs reset, in order.
    resets: Vec<u32>,
}

#[derive(Clone, Debug)]
struct FailRule {
    matcher: OpMatch,
    times: u32,
}

/// Which ops an injected failure applies to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OpMatch {
    Any,
    Exactly(MigOp),
    Gpu(u32),
    AnyCreate,
    AnyDestroy,
    AnySetMode,
}

impl OpMatch {
    fn matches(&self, op: &MigOp) -> bool {
        match self {
            OpMatch::Any => true,
            OpMatch::Exactly(o) => o == op,
            OpMatch::Gpu(g) => super::op_gpu(op) == *g,
            OpMatch::AnyCreate => matches!(op, MigOp::Create { .. }),
            OpMatch::AnyDestroy => matches!(op, MigOp::Destroy { .. }),
            OpMatch::AnySetMode => matches!(op, MigOp::SetMode { .. }),
        }
    }
}

/// A node's worth of fake GPUs.
#[derive(Debug, Default)]
pub struct FakeGpus {
    state: Mutex<State>,
}

/// Why a `--fake-gpus` value was refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid fake GPU spec {spec:?}: {why} (expected e.g. h100x8:mig,a100-40gbx2,l4x1)")]
pub struct ParseError {
    spec: String,
    why: String,
}

/// Products accepted by `--fake-gpus`: alias, MIG product (if any), driver name, memory.
const PRODUCTS: &[(&str, Option<MigProduct>, &str, u64)] = &[
    ("a100-40gb", Some(MigProduct::A100_40GB), "NVIDIA A100-SXM4-40GB", 40_960),
    ("a100", Some(MigProduct::A100_80GB), "NVIDIA A100-SXM4-80GB", 81_920),
    ("a100-80gb", Some(MigProduct::A100_80GB), "NVIDIA A100-SXM4-80GB", 81_920),
    ("h100", Some(MigProduct::H100_80GB), "NVIDIA H100 80GB HBM3", 81_920),
    ("h100-80gb", Some(MigProduct::H100_80GB), "NVIDIA H100 80GB HBM3", 81_920),
    ("h100-94gb", Some(MigProduct::H100_94GB), "NVIDIA H100 NVL", 96_256),
    ("h200", Some(MigProduct::H200_141GB), "NVIDIA H200", 144_384),
    ("b200", Some(MigProduct::B200_180GB), "NVIDIA B200", 184_320),
    ("a30", Some(MigProduct::A30_24GB), "NVIDIA A30", 24_576),
    ("l4", None, "NVIDIA L4", 23_034),
    ("t4", None, "Tesla T4", 15_360),
];

impl FakeGpus {
    /// `count` GPUs of one product, all in MIG mode (with no instances) or all whole.
    pub fn new(product: MigProduct, count: u32, mig: bool) -> Self {
        let (_, _, name, mem) = PRODUCTS.iter().find(|p| p.1 == Some(product)).copied().unwrap_or((
            "",
            Some(product),
            "NVIDIA GPU",
            product.geometry().memory_mib,
        ));
        let fake = Self::default();
        fake.add(Some(product), name, mem, count, mig);
        fake
    }

    /// Parses `h100x8:mig,l4x2`: groups of `<product>x<count>[:mig]`, indices in order.
    pub fn parse(spec: &str) -> Result<Self, ParseError> {
        let err = |why: &str| ParseError { spec: spec.to_owned(), why: why.to_owned() };
        let fake = Self::default();
        for group in spec.split(',').map(str::trim).filter(|g| !g.is_empty()) {
            let (shape, mig) = match group.split_once(':') {
                Some((s, "mig")) => (s, true),
                Some((s, "full")) => (s, false),
                Some(_) => return Err(err("mode must be :mig or :full")),
                None => (group, false),
            };
            let (alias, count) = shape.rsplit_once('x').ok_or_else(|| err("missing x<count>"))?;
            let count: u32 = count.parse().map_err(|_| err("count is not a number"))?;
            if count == 0 || count > 16 {
                return Err(err("count must be 1..=16"));
            }
            let (_, product, name, mem) = PRODUCTS
                .iter()
                .find(|p| p.0.eq_ignore_ascii_case(alias))
                .copied()
                .ok_or_else(|| err("unknown product"))?;
            if mig && product.is_none() {
                return Err(err("product is not MIG-capable"));
            }
            fake.add(product, name, mem, count, mig);
        }
        if fake.lock().gpus.is_empty() {
            return Err(err("no GPUs"));
        }
        Ok(fake)
    }

    fn add(&self, product: Option<MigProduct>, name: &str, memory_mib: u64, count: u32, mig: bool) {
        let mut s = self.lock();
        for _ in 0..count {
            let index = s.gpus.len() as u32;
            let seed = s.seed;
            s.gpus.push(FakeGpu {
                info: GpuInfo {
                    index,
                    uuid: format!("GPU-{seed:08x}-0000-4000-8000-{index:012x}"),
                    name: name.to_owned(),
                    product,
                    memory_mib,
                    mode: if mig { GpuMode::Mig } else { GpuMode::Full },
                    pending_mode: None,
                    numa_node: Some(index / 4),
                    pci_bus_id: format!("00000000:{:02X}:00.0", 0x18 + index * 0x10),
                    healthy: true,
                },
                layout: match (mig, product) {
                    (true, Some(p)) => Some(MigLayout::empty(p)),
                    _ => None,
                },
                uuids: Vec::new(),
                present: true,
            });
        }
    }

    /// Sets the UUID seed (tests that need two distinct nodes); call before adding instances.
    pub fn with_seed(self, seed: u32) -> Self {
        {
            let mut s = self.lock();
            s.seed = seed;
            for g in &mut s.gpus {
                g.info.uuid = format!("GPU-{seed:08x}-0000-4000-8000-{:012x}", g.info.index);
            }
        }
        self
    }

    /// MIG mode changes wait for a GPU reset ([`GpuBackend::reset`]), as NVML reports them
    /// pending on GPUs that need one.
    pub fn with_reset_required(self) -> Self {
        self.lock().reset_required = true;
        self
    }

    /// The GPUs reset so far, in order.
    pub fn resets(&self) -> Vec<u32> {
        self.lock().resets.clone()
    }

    /// Creates instances by profile name on `gpu`, each at its lowest free start.
    pub fn with_mig(self, gpu: u32, profiles: &[&str]) -> Result<Self, GpuError> {
        for name in profiles {
            let (class, start) = {
                let s = self.lock();
                let g = s.gpus.iter().find(|g| g.info.index == gpu).ok_or(GpuError::NoSuchGpu(gpu))?;
                let layout = g
                    .layout
                    .as_ref()
                    .ok_or_else(|| GpuError::Unsupported { gpu, what: "MIG instances outside MIG mode".into() })?;
                let profile = layout
                    .geometry()
                    .profile_by_name(name)
                    .ok_or_else(|| GpuError::Unsupported { gpu, what: format!("profile {name}") })?;
                let start = *layout.placements(profile.class).first().ok_or_else(|| GpuError::Refused {
                    gpu,
                    reason: tessera_core::mig::MigError::InstanceLimit { max: layout.geometry().max_instances },
                })?;
                (profile.class, start)
            };
            self.apply(&MigOp::Create { gpu, class, start })?;
        }
        self.lock().log.clear();
        Ok(self)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock only happens in a failing test; keep going with the data.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The next `times` ops matching `matcher` fail (and change nothing).
    pub fn fail_next(&self, matcher: OpMatch, times: u32) {
        self.lock().fail_next.push(FailRule { matcher, times });
    }

    /// After `n` more ops succeed, every op fails until [`FakeGpus::recover`].
    pub fn crash_after(&self, n: usize) {
        self.lock().crash_after = Some(n);
    }

    /// Clears every scripted failure.
    pub fn recover(&self) {
        let mut s = self.lock();
        s.crash_after = None;
        s.fail_next.clear();
    }

    /// The GPU falls off the bus: it is no longer listed and every call on it fails.
    pub fn remove_gpu(&self, gpu: u32) {
        if let Some(g) = self.lock().gpus.iter_mut().find(|g| g.info.index == gpu) {
            g.present = false;
        }
    }

    /// The GPU comes back with the state it had.
    pub fn restore_gpu(&self, gpu: u32) {
        if let Some(g) = self.lock().gpus.iter_mut().find(|g| g.info.index == gpu) {
            g.present = true;
        }
    }

    /// Marks a GPU unhealthy (or healthy again).
    pub fn set_healthy(&self, gpu: u32, healthy: bool) {
        if let Some(g) = self.lock().gpus.iter_mut().find(|g| g.info.index == gpu) {
            g.info.healthy = healthy;
        }
    }

    /// Every op sleeps this long first.
    pub fn set_slow(&self, delay: Duration) {
        self.lock().slow = delay;
    }

    /// A compute process runs (or stops running) on the GPU or MIG device with this UUID.
    pub fn set_busy(&self, uuid: &str, busy: bool) {
        let mut s = self.lock();
        if busy {
            s.busy.insert(uuid.to_owned());
        } else {
            s.busy.remove(uuid);
        }
    }

    /// Ops that reached the fake since construction, with whether each succeeded.
    pub fn log(&self) -> Vec<(MigOp, bool)> {
        self.lock().log.clone()
    }

    /// UUIDs of the MIG devices that exist now, on present and vanished GPUs alike.
    pub fn all_mig_uuids(&self) -> Vec<String> {
        self.lock().gpus.iter().flat_map(|g| g.uuids.iter().map(|(_, u)| u.clone())).collect()
    }
}

fn apply_locked(s: &mut State, op: &MigOp) -> Result<(), GpuError> {
    if let Some(rule) = s.fail_next.iter_mut().find(|r| r.times > 0 && r.matcher.matches(op)) {
        rule.times -= 1;
        return Err(GpuError::Injected(format!("{op:?}")));
    }
    match s.crash_after {
        Some(0) => return Err(GpuError::Injected(format!("crashed before {op:?}"))),
        Some(n) => s.crash_after = Some(n - 1),
        None => {}
    }
    let gpu = super::op_gpu(op);
    let busy = s.busy.clone();
    let next = s.next_mig;
    let seed = s.seed;
    let reset_required = s.reset_required;
    let g = s.gpus.iter_mut().find(|g| g.info.index == gpu && g.present).ok_or(GpuError::NoSuchGpu(gpu))?;
    match *op {
        MigOp::SetMode { mode, .. } => {
            let product = g.info.product.ok_or_else(|| GpuError::Unsupported { gpu, what: "MIG mode".into() })?;
            if busy.contains(&g.info.uuid) {
                return Err(GpuError::InUse { gpu, what: "the GPU".into() });
            }
            let target = if mode == GpuMode::Mig { GpuMode::Mig } else { GpuMode::Full };
            if reset_required && target != g.info.mode {
                if target == GpuMode::Full && g.layout.as_ref().is_some_and(|l| !l.is_empty()) {
                    return Err(GpuError::InUse { gpu, what: "MIG instances still exist".into() });
                }
                // Takes effect at the next reset.
                g.info.pending_mode = Some(target);
                return Ok(());
            }
            match mode {
                GpuMode::Mig if g.layout.is_none() => g.layout = Some(MigLayout::empty(product)),
                GpuMode::Mig => {}
                _ => {
                    if g.layout.as_ref().is_some_and(|l| !l.is_empty()) {
                        return Err(GpuError::InUse { gpu, what: "MIG instances still exist".into() });
                    }
                    g.layout = None;
                }
            }
            g.info.mode = if mode == GpuMode::Mig { GpuMode::Mig } else { GpuMode::Full };
        }
        MigOp::Create { class, start, .. } => {
            let layout = g.layout.as_mut().ok_or_else(|| GpuError::Unsupported { gpu, what: "MIG off".into() })?;
            layout.create(class, start).map_err(|reason| GpuError::Refused { gpu, reason })?;
            g.uuids.push((start, format!("MIG-{seed:08x}-{gpu:04x}-4000-8000-{next:012x}")));
            s.next_mig += 1;
        }
        MigOp::Destroy { class, start, .. } => {
            let layout = g.layout.as_mut().ok_or_else(|| GpuError::Unsupported { gpu, what: "MIG off".into() })?;
            let live = layout.instances().iter().any(|i| i.class == class && i.start == start);
            if let Some((_, uuid)) = g.uuids.iter().rev().find(|(s, _)| *s == start)
                && live
                && busy.contains(uuid)
            {
                return Err(GpuError::InUse { gpu, what: format!("MIG device {uuid}") });
            }
            layout.destroy(class, start).map_err(|reason| GpuError::Refused { gpu, reason })?;
            g.uuids.retain(|(s, _)| *s != start);
        }
    }
    Ok(())
}

impl GpuBackend for FakeGpus {
    fn name(&self) -> &'static str {
        "fake"
    }

    fn devices(&self) -> Result<Vec<GpuInfo>, GpuError> {
        Ok(self.lock().gpus.iter().filter(|g| g.present).map(|g| g.info.clone()).collect())
    }

    fn mig_devices(&self, gpu: u32) -> Result<Vec<MigDevice>, GpuError> {
        let s = self.lock();
        let g = s.gpus.iter().find(|g| g.info.index == gpu && g.present).ok_or(GpuError::NoSuchGpu(gpu))?;
        let Some(layout) = &g.layout else { return Ok(Vec::new()) };
        Ok(layout
            .instances()
            .iter()
            .map(|i| MigDevice {
                instance: *i,
                uuid: g.uuids.iter().find(|(s, _)| *s == i.start).map(|(_, u)| u.clone()).unwrap_or_default(),
            })
            .collect())
    }

    fn links(&self) -> Result<Vec<Link>, GpuError> {
        // Every pair of GPUs on one NVLink/NVSwitch domain, as on an HGX board.
        let s = self.lock();
        let idx: Vec<u32> = s.gpus.iter().filter(|g| g.present).map(|g| g.info.index).collect();
        let mut links = Vec::new();
        for (i, &a) in idx.iter().enumerate() {
            for &b in &idx[i + 1..] {
                links.push(Link { a, b, kind: LinkKind::Nvlink, lanes: Some(18) });
            }
        }
        Ok(links)
    }

    fn sample(&self, gpu: u32) -> Result<Sample, GpuError> {
        let s = self.lock();
        let g = s.gpus.iter().find(|g| g.info.index == gpu && g.present).ok_or(GpuError::NoSuchGpu(gpu))?;
        let busy_mig: Vec<(String, u64)> =
            g.uuids.iter().map(|(_, u)| (u.clone(), if s.busy.contains(u) { 1024 } else { 0 })).collect();
        let busy = s.busy.contains(&g.info.uuid) || busy_mig.iter().any(|(_, m)| *m > 0);
        Ok(Sample {
            utilization_pct: Some(if busy { 50 } else { 0 }),
            memory_used_mib: Some(busy_mig.iter().map(|(_, m)| m).sum::<u64>() + if busy { 1024 } else { 0 }),
            memory_total_mib: Some(g.info.memory_mib),
            temperature_c: Some(35),
            power_mw: Some(if busy { 300_000 } else { 70_000 }),
            mig_memory_used_mib: busy_mig,
        })
    }

    fn busy(&self) -> Result<BTreeSet<String>, GpuError> {
        Ok(self.lock().busy.clone())
    }

    fn apply(&self, op: &MigOp) -> Result<(), GpuError> {
        let slow = self.lock().slow;
        if !slow.is_zero() {
            std::thread::sleep(slow);
        }
        let mut s = self.lock();
        let result = apply_locked(&mut s, op);
        s.log.push((*op, result.is_ok()));
        result
    }

    fn reset(&self, gpu: u32) -> Result<(), GpuError> {
        let mut s = self.lock();
        let busy = s.busy.clone();
        let g = s.gpus.iter_mut().find(|g| g.info.index == gpu && g.present).ok_or(GpuError::NoSuchGpu(gpu))?;
        if busy.contains(&g.info.uuid) || g.uuids.iter().any(|(_, u)| busy.contains(u)) {
            return Err(GpuError::InUse { gpu, what: "a process runs on the GPU".into() });
        }
        if let Some(mode) = g.info.pending_mode.take() {
            g.info.mode = mode;
            g.layout = match (mode, g.info.product) {
                (GpuMode::Mig, Some(p)) => Some(MigLayout::empty(p)),
                _ => None,
            };
            g.uuids.clear();
        }
        s.resets.push(gpu);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use tessera_core::mig::ProfileClass;

    use super::*;
    use crate::gpu::observe;

    #[test]
    fn parse_builds_eight_h100_in_mig_mode() {
        let f = FakeGpus::parse("h100x8:mig").unwrap();
        let devs = f.devices().unwrap();
        assert_eq!(devs.len(), 8);
        assert!(devs.iter().all(|d| d.mode == GpuMode::Mig && d.product == Some(MigProduct::H100_80GB)));
        assert_eq!(devs[7].index, 7);
        assert!(f.mig_devices(3).unwrap().is_empty());
    }

    #[test]
    fn parse_accepts_mixed_groups_and_rejects_nonsense() {
        let f = FakeGpus::parse("a100-40gbx2:mig, l4x1").unwrap();
        let devs = f.devices().unwrap();
        assert_eq!(devs[2].product, None);
        assert_eq!(devs[2].mode, GpuMode::Full);
        for bad in ["", "h100", "h100x0", "zz9x2", "l4x1:mig", "h100x2:half"] {
            assert!(FakeGpus::parse(bad).is_err(), "{bad} should be refused");
        }
    }

    #[test]
    fn fake_refuses_what_nvidia_refuses() {
        let f = FakeGpus::new(MigProduct::A100_80GB, 1, true).with_mig(0, &["3g.40gb", "3g.40gb"]).unwrap();
        let err = f.apply(&MigOp::Create { gpu: 0, class: ProfileClass::G1, start: 0 }).unwrap_err();
        assert_eq!(err.kind(), "refused");
        let err = f.apply(&MigOp::SetMode { gpu: 0, mode: GpuMode::Full }).unwrap_err();
        assert_eq!(err.kind(), "in_use");
        let obs = observe(&f).unwrap();
        assert_eq!(obs.gpus[0].mig.len(), 2);
        assert!(obs.gpus[0].mig.iter().all(|m| m.uuid.starts_with("MIG-") && m.uuid.len() <= 63));
    }

    #[test]
    fn busy_instance_cannot_be_destroyed() {
        let f = FakeGpus::new(MigProduct::H100_80GB, 1, true).with_mig(0, &["1g.10gb"]).unwrap();
        let uuid = f.mig_devices(0).unwrap()[0].uuid.clone();
        f.set_busy(&uuid, true);
        let op = MigOp::Destroy { gpu: 0, class: ProfileClass::G1, start: 0 };
        assert_eq!(f.apply(&op).unwrap_err().kind(), "in_use");
        f.set_busy(&uuid, false);
        f.apply(&op).unwrap();
        assert!(f.mig_devices(0).unwrap().is_empty());
    }

    #[test]
    fn scripted_faults_fire_then_stop() {
        let f = FakeGpus::new(MigProduct::H100_80GB, 2, true);
        f.fail_next(OpMatch::AnyCreate, 1);
        let op = MigOp::Create { gpu: 0, class: ProfileClass::G1, start: 0 };
        assert_eq!(f.apply(&op).unwrap_err().kind(), "injected");
        f.apply(&op).unwrap();
        f.crash_after(1);
        f.apply(&MigOp::Create { gpu: 0, class: ProfileClass::G1, start: 1 }).unwrap();
        assert!(f.apply(&MigOp::Create { gpu: 0, class: ProfileClass::G1, start: 2 }).is_err());
        f.recover();
        f.remove_gpu(1);
        assert_eq!(f.devices().unwrap().len(), 1);
        assert_eq!(
            f.apply(&MigOp::Create { gpu: 1, class: ProfileClass::G1, start: 0 }).unwrap_err().kind(),
            "no_such_gpu"
        );
        f.restore_gpu(1);
        assert_eq!(f.devices().unwrap().len(), 2);
    }
}
