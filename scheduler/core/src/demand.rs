//! What a pod asks for. Parsing from Kubernetes objects lives in `tessera-api`.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::cluster::{MILLI_PER_GPU, PodKey};
use crate::error::Error;
use crate::mig::{Geometry, MigProduct, Profile};

/// The most whole GPUs one pod may ask for (one node's worth on the largest boards, twice over).
pub const MAX_WHOLE_GPUS: u32 = 16;

/// The GPU part of a demand.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum GpuDemand {
    /// CPU/memory only.
    None,
    /// `count` whole GPUs on one node (count > 1: best NVLink set, non-MIG).
    Whole { count: u32 },
    /// Exactly this MIG profile, by NVIDIA name (`3g.40gb`). The name picks the products.
    Mig { profile: String },
    /// Sized by the model: device memory and optionally compute slices (sevenths of a GPU).
    /// tessera gives the smallest fitting MIG profile, or a whole GPU when none fits.
    Model { memory_mib: u64, compute_slices: Option<u8> },
    /// A time-sliced share of one GPU in milli-GPU (1..=999).
    Share { milli: u32 },
}

impl GpuDemand {
    /// Milli-GPU this demand asks for when it is not MIG-sized (for accounting and FGD).
    pub fn nominal_milli(&self) -> u32 {
        match *self {
            GpuDemand::None | GpuDemand::Mig { .. } | GpuDemand::Model { .. } => 0,
            GpuDemand::Whole { count } => count * MILLI_PER_GPU,
            GpuDemand::Share { milli } => milli,
        }
    }
}

impl fmt::Display for GpuDemand {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GpuDemand::None => f.write_str("no GPU"),
            GpuDemand::Whole { count: 1 } => f.write_str("1 whole GPU"),
            GpuDemand::Whole { count } => write!(f, "{count} whole GPUs"),
            GpuDemand::Mig { profile } => write!(f, "MIG {profile}"),
            GpuDemand::Model { memory_mib, compute_slices: Some(c) } => {
                write!(f, "{memory_mib} MiB GPU memory and {c}/7 compute")
            }
            GpuDemand::Model { memory_mib, compute_slices: None } => write!(f, "{memory_mib} MiB GPU memory"),
            GpuDemand::Share { milli } => write!(f, "{milli} milli-GPU share"),
        }
    }
}

/// Gang membership carried by a demand.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct GangRef {
    /// `namespace/name` of the gang (PodGroup or annotation).
    pub name: String,
    /// Members needed before any binds (`minMember`).
    pub min_member: u32,
    /// Reservation lifetime once planned.
    pub timeout_ms: u64,
}

/// Everything one pod asks for.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Demand {
    pub pod: PodKey,
    pub cpu_milli: u64,
    pub memory_mib: u64,
    pub gpu: GpuDemand,
    /// Allowed GPU models (e.g. `H100-80GB`, `V100M32`); empty = any.
    pub gpu_models: Vec<String>,
    /// Node labels that must match exactly (a small `nodeSelector`).
    pub node_selector: Vec<(String, String)>,
    pub priority: i32,
    pub gang: Option<GangRef>,
    /// kube-scheduler's node filters the pod carries (tolerations, required affinity, NVIDIA
    /// extended resources).
    #[serde(default, skip_serializing_if = "crate::rules::NodeRules::is_empty")]
    pub rules: crate::rules::NodeRules,
    /// Asked through `tessera.dev/gpu`, which tessera's node agent serves: only nodes whose
    /// agent reported its GPUs ([`crate::Node::device_plugin`]) can host it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub device_plugin: bool,
}

impl Demand {
    pub fn new(pod: impl Into<PodKey>, gpu: GpuDemand) -> Self {
        Self {
            pod: pod.into(),
            cpu_milli: 0,
            memory_mib: 0,
            gpu,
            gpu_models: Vec::new(),
            node_selector: Vec::new(),
            priority: 0,
            gang: None,
            rules: crate::rules::NodeRules::default(),
            device_plugin: false,
        }
    }

    pub fn with_cpu(mut self, cpu_milli: u64, memory_mib: u64) -> Self {
        self.cpu_milli = cpu_milli;
        self.memory_mib = memory_mib;
        self
    }

    pub fn with_models(mut self, models: &[&str]) -> Self {
        self.gpu_models = models.iter().map(|m| (*m).to_owned()).collect();
        self
    }

    pub fn with_priority(mut self, priority: i32) -> Self {
        self.priority = priority;
        self
    }

    pub fn in_gang(mut self, name: &str, min_member: u32, timeout_ms: u64) -> Self {
        self.gang = Some(GangRef { name: name.to_owned(), min_member, timeout_ms });
        self
    }

    /// Rejects demands no cluster could ever meet because they are malformed.
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |m: String| Err(Error::InvalidDemand(format!("pod {}: {m}", self.pod)));
        match &self.gpu {
            GpuDemand::Whole { count } if *count == 0 || *count > MAX_WHOLE_GPUS => {
                return bad(format!("whole GPU count {count} is outside 1..={MAX_WHOLE_GPUS}"));
            }
            GpuDemand::Share { milli } if *milli == 0 || *milli >= MILLI_PER_GPU => {
                return bad(format!("GPU share {milli} is outside 1..=999 milli-GPU"));
            }
            GpuDemand::Model { memory_mib: 0, .. } => {
                return bad("model GPU memory must be positive".into());
            }
            GpuDemand::Model { compute_slices: Some(c), .. } if *c == 0 || *c > 7 => {
                return bad(format!("compute slices {c} is outside 1..=7"));
            }
            GpuDemand::Mig { profile }
                if MigProduct::ALL.iter().all(|p| p.geometry().profile_by_name(profile).is_none()) =>
            {
                return bad(format!("no GPU product has MIG profile {profile:?}"));
            }
            _ => {}
        }
        if let Some(g) = &self.gang
            && g.min_member == 0
        {
            return bad(format!("gang {} has minMember 0", g.name));
        }
        Ok(())
    }

    /// Whether a GPU model is allowed by the demand's model list.
    pub fn allows_model(&self, model: &str) -> bool {
        self.gpu_models.is_empty() || self.gpu_models.iter().any(|m| m.eq_ignore_ascii_case(model))
    }
}

/// The smallest profile on `geom` that meets a model-sized demand, ignoring media variants.
/// `None` when even the largest sub-GPU profile is too small (the demand takes whole GPUs).
pub fn smallest_fitting_profile(
    geom: &Geometry,
    memory_mib: u64,
    compute_slices: Option<u8>,
) -> Option<&'static Profile> {
    let largest = geom.largest_sub_gpu();
    geom.profiles
        .iter()
        .filter(|p| !p.class.has_media() && p.memory_slices <= largest.memory_slices)
        .filter(|p| p.memory_mib >= memory_mib && compute_slices.is_none_or(|c| p.compute_slices >= c))
        // Smallest by memory slices first (what packing spends), then compute.
        .min_by_key(|p| (p.memory_slices, p.compute_slices))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mig::ProfileClass;

    #[test]
    fn model_sized_demand_gets_the_smallest_fitting_profile() {
        let h100 = MigProduct::H100_80GB.geometry();
        let p = |m, c| smallest_fitting_profile(h100, m, c).map(|p| p.name);
        assert_eq!(p(4 * 1024, None), Some("1g.10gb"));
        assert_eq!(p(18 * 1024, None), Some("1g.20gb"));
        assert_eq!(p(18 * 1024, Some(2)), Some("2g.20gb"));
        assert_eq!(p(30 * 1024, None), Some("3g.40gb"));
        assert_eq!(p(30 * 1024, Some(4)), Some("4g.40gb"));
        // Larger than 4g: a whole GPU.
        assert_eq!(p(60 * 1024, None), None);
        let a30 = MigProduct::A30_24GB.geometry();
        assert_eq!(smallest_fitting_profile(a30, 10 * 1024, None).map(|p| p.class), Some(ProfileClass::G2));
        assert_eq!(smallest_fitting_profile(a30, 20 * 1024, None), None);
    }

    #[test]
    fn malformed_demands_are_rejected_with_the_value() {
        let e = Demand::new("ns/p", GpuDemand::Share { milli: 1500 }).validate();
        assert!(e.is_err_and(|e| e.to_string().contains("1500")));
        assert!(Demand::new("ns/p", GpuDemand::Whole { count: 0 }).validate().is_err());
        assert!(Demand::new("ns/p", GpuDemand::Mig { profile: "5g.50gb".into() }).validate().is_err());
        assert!(Demand::new("ns/p", GpuDemand::Mig { profile: "3g.40gb".into() }).validate().is_ok());
        assert!(Demand::new("ns/p", GpuDemand::Model { memory_mib: 1, compute_slices: Some(9) }).validate().is_err());
    }
}
