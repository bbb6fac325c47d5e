//! The real backend, over `nvml-wrapper` 0.13.
//!
//! The safe crate lacks GPU-instance and compute-instance create/destroy/list, and its
//! `possible_placements` always returns an empty list (it never sets the Vec's length), so
//! those calls go through `nvml-wrapper-sys` symbols reached via `Nvml::lib()`. That FFI is the
//! only `unsafe` in the workspace; each block says what it relies on. Symbols are taken with
//! `nvml_sym(lib.field.as_ref())`, never the sys convenience methods, which panic when a symbol
//! is missing from an older driver.
//!
//! Only read-only calls are exercised by the `#[ignore = "needs an NVIDIA GPU"]` tests.
#![allow(unsafe_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::os::raw::c_uint;

use nvml_wrapper::Nvml;
use nvml_wrapper::enum_wrappers::device::{TemperatureSensor, TopologyLevel};
use nvml_wrapper::error::{NvmlError, nvml_sym, nvml_try};
use nvml_wrapper_sys::bindings::{
    NVML_COMPUTE_INSTANCE_ENGINE_PROFILE_SHARED, nvmlComputeInstance_t, nvmlComputeInstanceProfileInfo_t, nvmlDevice_t,
    nvmlGpuInstance_t, nvmlGpuInstanceInfo_t, nvmlGpuInstancePlacement_t,
};
use tessera_api::gpunode::LinkKind;
use tessera_core::mig::{Instance, MigError, MigProduct, ProfileClass};
use tessera_core::{GpuMode, MigOp};

use super::{GpuBackend, GpuError, GpuInfo, Link, MigDevice, Sample};

/// NVML's limit on NVLink links per GPU (`NVML_NVLINK_MAX_LINKS`).
const NVLINK_MAX_LINKS: u32 = 18;
/// Compute-instance profile indices (`NVML_COMPUTE_INSTANCE_PROFILE_COUNT`).
const CI_PROFILE_COUNT: u32 = 10;

/// The GPUs of this host through NVML.
#[derive(Debug)]
pub struct NvmlBackend {
    nvml: Nvml,
}

fn nv(call: &'static str) -> impl Fn(NvmlError) -> GpuError {
    move |e| GpuError::Nvml { call, message: e.to_string() }
}

/// Like [`nv`], but NVML's "in use" becomes [`GpuError::InUse`] on `gpu` (destroy, mode change).
fn nv_on(gpu: u32, call: &'static str) -> impl Fn(NvmlError) -> GpuError {
    move |e| match e {
        NvmlError::InUse => GpuError::InUse { gpu, what: format!("{call}: a process still uses it") },
        other => GpuError::Nvml { call, message: other.to_string() },
    }
}

/// Which MIG product a driver name and memory size denote.
pub fn product_from_name(name: &str, memory_mib: u64) -> Option<MigProduct> {
    let n = name.to_ascii_uppercase();
    if n.contains("A100") {
        Some(if memory_mib > 60_000 { MigProduct::A100_80GB } else { MigProduct::A100_40GB })
    } else if n.contains("A30") {
        Some(MigProduct::A30_24GB)
    } else if n.contains("H200") || n.contains("GH200") && memory_mib > 120_000 {
        Some(MigProduct::H200_141GB)
    } else if n.contains("H100") || n.contains("H800") {
        Some(match memory_mib {
            0..=90_000 => MigProduct::H100_80GB,
            90_001..=97_000 => MigProduct::H100_94GB,
            _ => MigProduct::H100_96GB,
        })
    } else if n.contains("B200") {
        Some(MigProduct::B200_180GB)
    } else {
        None
    }
}

/// The compute-instance profile index that spans a whole GPU instance of `compute_slices`.
fn ci_profile_index(compute_slices: u8) -> Option<u32> {
    match compute_slices {
        1 => Some(0),
        2 => Some(1),
        3 => Some(2),
        4 => Some(3),
        7 => Some(4),
        8 => Some(5),
        6 => Some(6),
        _ => None,
    }
}

impl NvmlBackend {
    /// Loads `libnvidia-ml.so.1` (or `lib_path`) and initialises NVML.
    pub fn init(lib_path: Option<&OsStr>) -> Result<Self, GpuError> {
        let mut builder = Nvml::builder();
        if let Some(p) = lib_path {
            builder.lib_path(p);
        }
        let nvml = builder.init().map_err(|e| GpuError::NoNvml(e.to_string()))?;
        Ok(Self { nvml })
    }

    fn device(&self, gpu: u32) -> Result<nvml_wrapper::Device<'_>, GpuError> {
        self.nvml.device_by_index(gpu).map_err(|e| match e {
            NvmlError::InvalidArg | NvmlError::NotFound | NvmlError::GpuLost => GpuError::NoSuchGpu(gpu),
            other => nv("nvmlDeviceGetHandleByIndex")(other),
        })
    }

    fn product(&self, gpu: u32) -> Result<Option<MigProduct>, GpuError> {
        let d = self.device(gpu)?;
        let name = d.name().map_err(nv("nvmlDeviceGetName"))?;
        let mem = d.memory_info().map_err(nv("nvmlDeviceGetMemoryInfo"))?.total / (1024 * 1024);
        Ok(product_from_name(&name, mem))
    }

    /// GI profile id (what create/list take) for each class the product has.
    fn profile_ids(&self, gpu: u32, product: MigProduct) -> Result<BTreeMap<ProfileClass, (u32, u32)>, GpuError> {
        let d = self.device(gpu)?;
        let mut ids = BTreeMap::new();
        for p in product.geometry().profiles {
            if let Ok(info) = d.profile_info(p.class.nvml_profile_index()) {
                ids.insert(p.class, (info.id, info.instance_count));
            }
        }
        Ok(ids)
    }

    /// NVML's possible placements of a GI profile, via the `_v2` symbol (the safe wrapper
    /// returns an empty list in 0.13.0). Read-only.
    pub fn possible_placements(&self, gpu: u32, class: ProfileClass) -> Result<Vec<(u32, u32)>, GpuError> {
        let d = self.device(gpu)?;
        let profile_id =
            d.profile_info(class.nvml_profile_index()).map_err(nv("nvmlDeviceGetGpuInstanceProfileInfo"))?.id;
        let call = "nvmlDeviceGetGpuInstancePossiblePlacements_v2";
        let sym = nvml_sym(self.nvml.lib().nvmlDeviceGetGpuInstancePossiblePlacements_v2.as_ref()).map_err(nv(call))?;
        // SAFETY: the handle comes from a live `Device` of `self.nvml`; NVML writes at most
        // `count` placements into a buffer of that capacity and sets `count` to the number written.
        unsafe {
            let handle = d.handle();
            let mut count: c_uint = 0;
            let _ = sym(handle, profile_id, std::ptr::null_mut(), &mut count);
            let mut buf = vec![nvmlGpuInstancePlacement_t { start: 0, size: 0 }; count.max(8) as usize];
            let mut count = buf.len() as c_uint;
            nvml_try(sym(handle, profile_id, buf.as_mut_ptr(), &mut count)).map_err(nv(call))?;
            buf.truncate(count as usize);
            Ok(buf.into_iter().map(|p| (p.start, p.size)).collect())
        }
    }

    /// Every GPU instance of one profile on a device.
    ///
    /// # Safety
    /// `handle` must be a live device handle of `self.nvml`.
    unsafe fn gpu_instances(
        &self,
        handle: nvmlDevice_t,
        profile_id: u32,
        max: u32,
    ) -> Result<Vec<(nvmlGpuInstance_t, u32)>, GpuError> {
        let lib = self.nvml.lib();
        let list = nvml_sym(lib.nvmlDeviceGetGpuInstances.as_ref()).map_err(nv("nvmlDeviceGetGpuInstances"))?;
        let info = nvml_sym(lib.nvmlGpuInstanceGetInfo.as_ref()).map_err(nv("nvmlGpuInstanceGetInfo"))?;
        let mut buf: Vec<nvmlGpuInstance_t> = vec![std::ptr::null_mut(); max.max(8) as usize];
        let mut count = buf.len() as c_uint;
        // SAFETY: NVML fills at most `count` handles into `buf` and sets `count`.
        unsafe {
            nvml_try(list(handle, profile_id, buf.as_mut_ptr(), &mut count)).map_err(nv("nvmlDeviceGetGpuInstances"))?
        };
        buf.truncate(count as usize);
        let mut out = Vec::with_capacity(buf.len());
        for gi in buf {
            // SAFETY: `gi` was just returned by NVML; the info struct is plain data.
            let start = unsafe {
                let mut i: nvmlGpuInstanceInfo_t = std::mem::zeroed();
                nvml_try(info(gi, &mut i)).map_err(nv("nvmlGpuInstanceGetInfo"))?;
                i.placement.start
            };
            out.push((gi, start));
        }
        Ok(out)
    }

    fn create(&self, gpu: u32, class: ProfileClass, start: u8) -> Result<(), GpuError> {
        let product = self.product(gpu)?.ok_or_else(|| GpuError::Unsupported { gpu, what: "MIG".into() })?;
        let profile = product.geometry().profile(class).ok_or_else(|| GpuError::Refused {
            gpu,
            reason: MigError::UnknownProfile { product, profile: format!("{class:?}") },
        })?;
        let allowed = self.possible_placements(gpu, class)?;
        if !allowed.iter().any(|&(s, _)| s == u32::from(start)) {
            return Err(GpuError::Refused {
                gpu,
                reason: MigError::BadStart { profile: profile.name, start, allowed: profile.starts },
            });
        }
        let d = self.device(gpu)?;
        let gi_info = d.profile_info(class.nvml_profile_index()).map_err(nv("nvmlDeviceGetGpuInstanceProfileInfo"))?;
        let ci_index = ci_profile_index(profile.compute_slices)
            .ok_or_else(|| GpuError::Unsupported { gpu, what: format!("compute instance for {}", profile.name) })?;
        let lib = self.nvml.lib();
        let create_gi = nvml_sym(lib.nvmlDeviceCreateGpuInstanceWithPlacement.as_ref())
            .map_err(nv("nvmlDeviceCreateGpuInstanceWithPlacement"))?;
        let ci_info = nvml_sym(lib.nvmlGpuInstanceGetComputeInstanceProfileInfo.as_ref())
            .map_err(nv("nvmlGpuInstanceGetComputeInstanceProfileInfo"))?;
        let create_ci = nvml_sym(lib.nvmlGpuInstanceCreateComputeInstance.as_ref())
            .map_err(nv("nvmlGpuInstanceCreateComputeInstance"))?;
        let destroy_gi = nvml_sym(lib.nvmlGpuInstanceDestroy.as_ref()).map_err(nv("nvmlGpuInstanceDestroy"))?;
        // SAFETY: the device handle is live for `d`'s lifetime; the placement and info structs are
        // plain C data we own; on a failed CI creation the GI we just created is destroyed again.
        unsafe {
            let placement = nvmlGpuInstancePlacement_t { start: u32::from(start), size: gi_info.slice_count };
            let mut gi: nvmlGpuInstance_t = std::ptr::null_mut();
            nvml_try(create_gi(d.handle(), gi_info.id, &placement, &mut gi))
                .map_err(nv("nvmlDeviceCreateGpuInstanceWithPlacement"))?;
            let mut ci_prof: nvmlComputeInstanceProfileInfo_t = std::mem::zeroed();
            let mut ci: nvmlComputeInstance_t = std::ptr::null_mut();
            let r = nvml_try(ci_info(gi, ci_index, NVML_COMPUTE_INSTANCE_ENGINE_PROFILE_SHARED, &mut ci_prof))
                .and_then(|()| nvml_try(create_ci(gi, ci_prof.id, &mut ci)));
            if let Err(e) = r {
                let _ = destroy_gi(gi);
                return Err(nv("nvmlGpuInstanceCreateComputeInstance")(e));
            }
        }
        Ok(())
    }

    fn destroy(&self, gpu: u32, class: ProfileClass, start: u8) -> Result<(), GpuError> {
        let product = self.product(gpu)?.ok_or_else(|| GpuError::Unsupported { gpu, what: "MIG".into() })?;
        let ids = self.profile_ids(gpu, product)?;
        let &(profile_id, max) =
            ids.get(&class).ok_or_else(|| GpuError::Unsupported { gpu, what: format!("{class:?}") })?;
        let d = self.device(gpu)?;
        let lib = self.nvml.lib();
        let list_ci = nvml_sym(lib.nvmlGpuInstanceGetComputeInstances.as_ref())
            .map_err(nv("nvmlGpuInstanceGetComputeInstances"))?;
        let ci_info = nvml_sym(lib.nvmlGpuInstanceGetComputeInstanceProfileInfo.as_ref())
            .map_err(nv("nvmlGpuInstanceGetComputeInstanceProfileInfo"))?;
        let destroy_ci = nvml_sym(lib.nvmlComputeInstanceDestroy.as_ref()).map_err(nv("nvmlComputeInstanceDestroy"))?;
        let destroy_gi = nvml_sym(lib.nvmlGpuInstanceDestroy.as_ref()).map_err(nv("nvmlGpuInstanceDestroy"))?;
        // SAFETY: handles come from NVML list calls on a live device; buffers are sized to the
        // counts passed in, and NVML writes at most that many entries.
        unsafe {
            let gis = self.gpu_instances(d.handle(), profile_id, max)?;
            let Some(&(gi, _)) = gis.iter().find(|(_, s)| *s == u32::from(start)) else {
                let name = product.geometry().profile(class).map_or("unknown profile", |p| p.name);
                return Err(GpuError::Refused { gpu, reason: MigError::NoSuchInstance { profile: name, start } });
            };
            for ci_index in 0..CI_PROFILE_COUNT {
                let mut prof: nvmlComputeInstanceProfileInfo_t = std::mem::zeroed();
                if nvml_try(ci_info(gi, ci_index, NVML_COMPUTE_INSTANCE_ENGINE_PROFILE_SHARED, &mut prof)).is_err() {
                    continue;
                }
                let mut buf: Vec<nvmlComputeInstance_t> = vec![std::ptr::null_mut(); 8];
                let mut count = buf.len() as c_uint;
                if nvml_try(list_ci(gi, prof.id, buf.as_mut_ptr(), &mut count)).is_err() {
                    continue;
                }
                for &ci in buf.iter().take(count as usize) {
                    nvml_try(destroy_ci(ci)).map_err(nv_on(gpu, "nvmlComputeInstanceDestroy"))?;
                }
            }
            nvml_try(destroy_gi(gi)).map_err(nv_on(gpu, "nvmlGpuInstanceDestroy"))?;
        }
        Ok(())
    }
}

impl GpuBackend for NvmlBackend {
    fn name(&self) -> &'static str {
        "nvml"
    }

    fn devices(&self) -> Result<Vec<GpuInfo>, GpuError> {
        let count = self.nvml.device_count().map_err(nv("nvmlDeviceGetCount"))?;
        let mut out = Vec::with_capacity(count as usize);
        for index in 0..count {
            let d = match self.device(index) {
                Ok(d) => d,
                Err(GpuError::NoSuchGpu(_)) => continue,
                Err(e) => return Err(e),
            };
            // A GPU that cannot even name itself is skipped (and so reported missing).
            let (uuid, name) = match (d.uuid(), d.name()) {
                (Ok(u), Ok(n)) => (u, n),
                (Err(e), _) | (_, Err(e)) => {
                    tracing::warn!(gpu = index, error = %e, "GPU does not answer; skipping it");
                    continue;
                }
            };
            let mem = d.memory_info();
            let memory_mib = mem.as_ref().map_or(0, |m| m.total / (1024 * 1024));
            let product = product_from_name(&name, memory_mib);
            let (mode, pending_mode) = match d.mig_mode() {
                Ok(m) => {
                    let as_mode = |v: u32| if v == 1 { GpuMode::Mig } else { GpuMode::Full };
                    let cur = as_mode(m.current);
                    let pend = as_mode(m.pending);
                    (cur, (pend != cur).then_some(pend))
                }
                Err(_) => (GpuMode::Full, None),
            };
            out.push(GpuInfo {
                index,
                uuid,
                name,
                product: product.filter(|_| d.mig_mode().is_ok()),
                memory_mib,
                mode,
                pending_mode,
                numa_node: d.numa_node_id().ok(),
                pci_bus_id: d.pci_info().map(|p| p.bus_id).unwrap_or_default(),
                healthy: mem.is_ok(),
            });
        }
        Ok(out)
    }

    fn mig_devices(&self, gpu: u32) -> Result<Vec<MigDevice>, GpuError> {
        let Some(product) = self.product(gpu)? else { return Ok(Vec::new()) };
        let ids = self.profile_ids(gpu, product)?;
        let class_of: BTreeMap<u32, ProfileClass> = ids.iter().map(|(c, (id, _))| (*id, *c)).collect();
        let d = self.device(gpu)?;
        let max = d.mig_device_count().map_err(nv("nvmlDeviceGetMaxMigDeviceCount"))?;
        let lib = self.nvml.lib();
        let gi_id = nvml_sym(lib.nvmlDeviceGetGpuInstanceId.as_ref()).map_err(nv("nvmlDeviceGetGpuInstanceId"))?;
        let gi_by_id =
            nvml_sym(lib.nvmlDeviceGetGpuInstanceById.as_ref()).map_err(nv("nvmlDeviceGetGpuInstanceById"))?;
        let gi_info = nvml_sym(lib.nvmlGpuInstanceGetInfo.as_ref()).map_err(nv("nvmlGpuInstanceGetInfo"))?;
        let mut out = Vec::new();
        for j in 0..max {
            let m = match d.mig_device_by_index(j) {
                Ok(m) => m,
                Err(NvmlError::NotFound | NvmlError::InvalidArg) => continue,
                Err(e) => return Err(nv("nvmlDeviceGetMigDeviceHandleByIndex")(e)),
            };
            let uuid = m.uuid().map_err(nv("nvmlDeviceGetUUID"))?;
            // SAFETY: both handles are live `Device`s of `self.nvml`; the GI handle and info
            // struct are returned by NVML for this device.
            let (profile_id, start) = unsafe {
                let mut id: c_uint = 0;
                nvml_try(gi_id(m.handle(), &mut id)).map_err(nv("nvmlDeviceGetGpuInstanceId"))?;
                let mut gi: nvmlGpuInstance_t = std::ptr::null_mut();
                nvml_try(gi_by_id(d.handle(), id, &mut gi)).map_err(nv("nvmlDeviceGetGpuInstanceById"))?;
                let mut info: nvmlGpuInstanceInfo_t = std::mem::zeroed();
                nvml_try(gi_info(gi, &mut info)).map_err(nv("nvmlGpuInstanceGetInfo"))?;
                (info.profileId, info.placement.start)
            };
            let Some(&class) = class_of.get(&profile_id) else { continue };
            out.push(MigDevice { instance: Instance { class, start: start as u8 }, uuid });
        }
        out.sort_by_key(|m| m.instance.start);
        Ok(out)
    }

    fn links(&self) -> Result<Vec<Link>, GpuError> {
        let count = self.nvml.device_count().map_err(nv("nvmlDeviceGetCount"))?;
        let mut bus: BTreeMap<String, u32> = BTreeMap::new();
        for i in 0..count {
            if let Ok(p) = self.device(i).and_then(|d| d.pci_info().map_err(nv("nvmlDeviceGetPciInfo"))) {
                bus.insert(p.bus_id.to_ascii_uppercase(), i);
            }
        }
        // NVLink lanes per GPU pair; lanes to something that is not a GPU (NVSwitch) per GPU.
        let mut lanes: BTreeMap<(u32, u32), u32> = BTreeMap::new();
        let mut switch_lanes: BTreeMap<u32, u32> = BTreeMap::new();
        for i in 0..count {
            let Ok(d) = self.device(i) else { continue };
            for l in 0..NVLINK_MAX_LINKS {
                let link = d.link_wrapper_for(l);
                match link.is_active() {
                    Ok(true) => {}
                    Ok(false) => continue,
                    Err(_) => break,
                }
                let Ok(remote) = link.remote_pci_info() else { continue };
                match bus.get(&remote.bus_id.to_ascii_uppercase()) {
                    Some(&j) if j > i => *lanes.entry((i, j)).or_default() += 1,
                    Some(_) => {}
                    None => *switch_lanes.entry(i).or_default() += 1,
                }
            }
        }
        let mut out = Vec::new();
        for i in 0..count {
            for j in i + 1..count {
                let direct = lanes.get(&(i, j)).copied();
                let via_switch = match (switch_lanes.get(&i), switch_lanes.get(&j)) {
                    (Some(a), Some(b)) => Some(*a.min(b)),
                    _ => None,
                };
                if let Some(n) = direct.or(via_switch) {
                    out.push(Link { a: i, b: j, kind: LinkKind::Nvlink, lanes: Some(n) });
                    continue;
                }
                let (Ok(a), Ok(b)) = (self.device(i), self.device(j)) else { continue };
                let kind = match a.topology_common_ancestor(b) {
                    Ok(TopologyLevel::Internal | TopologyLevel::Single | TopologyLevel::Multiple) => {
                        LinkKind::PcieSwitch
                    }
                    Ok(TopologyLevel::HostBridge | TopologyLevel::Node) => LinkKind::SameNuma,
                    Ok(TopologyLevel::System) => LinkKind::CrossSocket,
                    Err(_) => continue,
                };
                out.push(Link { a: i, b: j, kind, lanes: None });
            }
        }
        Ok(out)
    }

    fn sample(&self, gpu: u32) -> Result<Sample, GpuError> {
        let d = self.device(gpu)?;
        let mem = d.memory_info().ok();
        let mut mig_memory_used_mib = Vec::new();
        if let Ok(max) = d.mig_device_count() {
            for j in 0..max {
                if let Ok(m) = d.mig_device_by_index(j)
                    && let (Ok(uuid), Ok(info)) = (m.uuid(), m.memory_info())
                {
                    mig_memory_used_mib.push((uuid, info.used / (1024 * 1024)));
                }
            }
        }
        Ok(Sample {
            utilization_pct: d.utilization_rates().ok().map(|u| u.gpu),
            memory_used_mib: mem.as_ref().map(|m| m.used / (1024 * 1024)),
            memory_total_mib: mem.as_ref().map(|m| m.total / (1024 * 1024)),
            temperature_c: d.temperature(TemperatureSensor::Gpu).ok(),
            power_mw: d.power_usage().ok(),
            mig_memory_used_mib,
        })
    }

    fn busy(&self) -> Result<BTreeSet<String>, GpuError> {
        let count = self.nvml.device_count().map_err(nv("nvmlDeviceGetCount"))?;
        let mut out = BTreeSet::new();
        for i in 0..count {
            let Ok(d) = self.device(i) else { continue };
            if d.running_compute_processes().is_ok_and(|p| !p.is_empty())
                && let Ok(u) = d.uuid()
            {
                out.insert(u);
            }
            let Ok(max) = d.mig_device_count() else { continue };
            for j in 0..max {
                if let Ok(m) = d.mig_device_by_index(j)
                    && m.running_compute_processes().is_ok_and(|p| !p.is_empty())
                    && let Ok(u) = m.uuid()
                {
                    out.insert(u);
                }
            }
        }
        Ok(out)
    }

    fn apply(&self, op: &MigOp) -> Result<(), GpuError> {
        match *op {
            MigOp::SetMode { gpu, mode } => {
                let d = self.device(gpu)?;
                d.set_mig_mode(mode == GpuMode::Mig).map_err(nv_on(gpu, "nvmlDeviceSetMigMode"))?;
                Ok(())
            }
            MigOp::Create { gpu, class, start } => self.create(gpu, class, start),
            MigOp::Destroy { gpu, class, start } => self.destroy(gpu, class, start),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn driver_names_map_to_mig_products() {
        assert_eq!(product_from_name("NVIDIA A100-SXM4-40GB", 40_960), Some(MigProduct::A100_40GB));
        assert_eq!(product_from_name("NVIDIA A100 80GB PCIe", 81_920), Some(MigProduct::A100_80GB));
        assert_eq!(product_from_name("NVIDIA H100 80GB HBM3", 81_559), Some(MigProduct::H100_80GB));
        assert_eq!(product_from_name("NVIDIA H100 NVL", 95_830), Some(MigProduct::H100_94GB));
        assert_eq!(product_from_name("NVIDIA H200", 143_771), Some(MigProduct::H200_141GB));
        assert_eq!(product_from_name("NVIDIA L4", 23_034), None);
        assert_eq!(product_from_name("Tesla T4", 15_360), None);
    }

    #[test]
    fn init_without_the_library_is_a_clear_no_nvml_error() {
        let e = NvmlBackend::init(Some(OsStr::new("/nonexistent/libnvidia-ml.so.1"))).unwrap_err();
        assert_eq!(e.kind(), "no_nvml");
    }

    // Read-only: lists devices, MIG devices, links, samples and placements. Never changes
    // modes or layouts.
    #[test]
    #[ignore = "needs an NVIDIA GPU"]
    fn nvml_discovery_reads_the_real_gpus() {
        let b = NvmlBackend::init(None).unwrap();
        let devs = b.devices().unwrap();
        assert!(!devs.is_empty());
        for d in &devs {
            println!("{d:?}");
            println!("  sample {:?}", b.sample(d.index).unwrap());
            println!("  mig {:?}", b.mig_devices(d.index).unwrap());
            if let Some(p) = d.product {
                for prof in p.geometry().profiles {
                    let nvml = b.possible_placements(d.index, prof.class);
                    println!("  placements {} nvml={nvml:?} core={:?}", prof.name, prof.starts);
                    if d.mode == GpuMode::Mig
                        && b.mig_devices(d.index).unwrap().is_empty()
                        && let Ok(nvml) = nvml
                    {
                        let starts: Vec<u8> = nvml.iter().map(|&(s, _)| s as u8).collect();
                        assert_eq!(starts, prof.starts, "{}", prof.name);
                    }
                }
            }
        }
        println!("links {:?}", b.links().unwrap());
        println!("busy {:?}", b.busy().unwrap());
    }
}
