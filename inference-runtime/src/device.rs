//! Which device this process got, and how much memory it really has.
//!
//! On Kubernetes the device plugin hands the pod `NVIDIA_VISIBLE_DEVICES`/`CUDA_VISIBLE_DEVICES`
//! with one GPU or MIG UUID; CUDA then enumerates exactly that device as ordinal 0. Memory is read
//! from the device itself (a MIG slice reports its slice size), never inferred from the GPU model.

use candle_core::Device;
use serde::Serialize;

/// What `/v2` metadata reports about the device.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct DeviceInfo {
    /// `cpu` or `cuda`.
    pub kind: &'static str,
    /// The visible-devices value the process was started with (a GPU or MIG UUID list), if any.
    pub visible_devices: Option<String>,
    pub memory_total_bytes: u64,
    pub memory_free_bytes: u64,
}

/// The visible-devices value, `CUDA_VISIBLE_DEVICES` first. Empty, `void` and `none` mean
/// "no GPU", as in the NVIDIA container runtime.
pub fn visible_devices(get: impl Fn(&str) -> Option<String>) -> Option<String> {
    ["CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES"]
        .into_iter()
        .filter_map(get)
        .map(|v| v.trim().to_string())
        .find(|v| !v.is_empty())
        .filter(|v| !matches!(v.as_str(), "void" | "none" | "-1"))
}

/// Opens the device: CUDA ordinal 0 when a device is visible and the `cuda` feature is built,
/// otherwise the CPU.
pub fn open() -> (Device, DeviceInfo) {
    let visible = visible_devices(|k| std::env::var(k).ok());
    #[cfg(feature = "cuda")]
    if visible.is_some() {
        match Device::new_cuda(0) {
            Ok(dev) => {
                let (free, total) = match &dev {
                    Device::Cuda(c) => c.cuda_stream().context().mem_get_info().unwrap_or((0, 0)),
                    _ => (0, 0),
                };
                let info = DeviceInfo {
                    kind: "cuda",
                    visible_devices: visible,
                    memory_total_bytes: total as u64,
                    memory_free_bytes: free as u64,
                };
                return (dev, info);
            }
            Err(error) => tracing::warn!(%error, "CUDA device visible but not usable; using CPU"),
        }
    }
    #[cfg(not(feature = "cuda"))]
    if visible.is_some() {
        tracing::warn!("a GPU is visible but this build has no `cuda` feature; using CPU");
    }
    let (total, free) = host_memory();
    let info = DeviceInfo { kind: "cpu", visible_devices: visible, memory_total_bytes: total, memory_free_bytes: free };
    (Device::Cpu, info)
}

/// (MemTotal, MemAvailable) in bytes from `/proc/meminfo`, both bounded by the cgroup (v2)
/// memory limit when there is one; zeros where unreadable.
fn host_memory() -> (u64, u64) {
    let (total, available) = std::fs::read_to_string("/proc/meminfo").map(|s| parse_meminfo(&s)).unwrap_or((0, 0));
    match std::fs::read_to_string("/sys/fs/cgroup/memory.max").ok().and_then(|s| s.trim().parse::<u64>().ok()) {
        Some(limit) if limit > 0 => {
            let used = std::fs::read_to_string("/sys/fs/cgroup/memory.current")
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .unwrap_or(0);
            (total.min(limit), available.min(limit.saturating_sub(used)))
        }
        _ => (total, available),
    }
}

/// Share of the device kept out of the budget: allocator fragmentation, cuBLAS workspaces, the
/// tokenizers and HTTP buffers.
pub const HEADROOM: f64 = 0.05;

/// Device memory a CUDA process spends before any model: the context, kernels, cuBLAS handles.
/// The free memory a running process reads already excludes it; a pod's request must include it.
pub const CUDA_CONTEXT_BYTES: u64 = 512 << 20;

/// The memory the models may use: `explicit` when given (never more than the device has free),
/// else the free memory less [`HEADROOM`] of the total; unlimited when the device's memory is
/// unknown and nothing was given.
pub fn memory_budget(info: &DeviceInfo, explicit: Option<u64>) -> u64 {
    match explicit {
        Some(b) if info.memory_free_bytes > 0 => b.min(info.memory_free_bytes),
        Some(b) => b,
        None if info.memory_free_bytes == 0 => u64::MAX,
        None => info.memory_free_bytes.saturating_sub((info.memory_total_bytes as f64 * HEADROOM) as u64),
    }
}

/// The `tessera.dev/gpu-memory` a pod serving models that need `models_bytes` in total should
/// ask for: the models, the CUDA context, and the headroom, so that [`memory_budget`] on a
/// device of that size covers the models.
pub fn pod_gpu_memory(models_bytes: u64) -> u64 {
    ((models_bytes + CUDA_CONTEXT_BYTES) as f64 / (1.0 - HEADROOM)).ceil() as u64
}

fn parse_meminfo(s: &str) -> (u64, u64) {
    let field = |name: &str| {
        s.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kib| kib * 1024)
            .unwrap_or(0)
    };
    (field("MemTotal:"), field("MemAvailable:"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuda_visible_devices_wins_and_void_means_none() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
        };
        assert_eq!(
            visible_devices(env(&[("CUDA_VISIBLE_DEVICES", "MIG-1234"), ("NVIDIA_VISIBLE_DEVICES", "GPU-9")])),
            Some("MIG-1234".into())
        );
        assert_eq!(visible_devices(env(&[("NVIDIA_VISIBLE_DEVICES", "GPU-9")])), Some("GPU-9".into()));
        assert_eq!(visible_devices(env(&[("NVIDIA_VISIBLE_DEVICES", "void")])), None);
        assert_eq!(visible_devices(env(&[("CUDA_VISIBLE_DEVICES", "")])), None);
        assert_eq!(visible_devices(env(&[])), None);
    }

    #[test]
    fn budget_is_the_free_memory_less_headroom_or_what_was_asked() {
        let gib = 1u64 << 30;
        let slice = DeviceInfo {
            kind: "cuda",
            visible_devices: None,
            memory_total_bytes: 10 * gib,
            memory_free_bytes: 9 * gib,
        };
        assert_eq!(memory_budget(&slice, None), 9 * gib - gib / 2);
        assert_eq!(memory_budget(&slice, Some(4 * gib)), 4 * gib);
        assert_eq!(memory_budget(&slice, Some(20 * gib)), 9 * gib, "never more than is free");
        let unknown = DeviceInfo { kind: "cpu", visible_devices: None, memory_total_bytes: 0, memory_free_bytes: 0 };
        assert_eq!(memory_budget(&unknown, Some(gib)), gib);
        assert_eq!(memory_budget(&unknown, None), u64::MAX, "unknown and unset: no limit");
        // What a pod asks for is enough for the budget on a device of that size to hold the models.
        let models = 3 * gib;
        let ask = pod_gpu_memory(models);
        let device = DeviceInfo {
            kind: "cuda",
            visible_devices: None,
            memory_total_bytes: ask,
            memory_free_bytes: ask - CUDA_CONTEXT_BYTES,
        };
        assert!(memory_budget(&device, None) >= models - 1);
    }

    #[test]
    fn meminfo_is_parsed_in_bytes() {
        let s = "MemTotal:       24000000 kB\nMemFree:  100 kB\nMemAvailable:   20000000 kB\n";
        assert_eq!(parse_meminfo(s), (24_000_000 * 1024, 20_000_000 * 1024));
        assert_eq!(parse_meminfo("garbage"), (0, 0));
    }
}
