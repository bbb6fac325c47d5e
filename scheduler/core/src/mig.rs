//! NVIDIA MIG geometry, exactly as the MIG User Guide and `nvidia-smi mig -lgipp` describe it.
//!
//! A MIG-capable GPU has 8 memory slices and 7 compute slices (A30: 4 and 4). A GPU instance
//! occupies a contiguous run of memory slices starting at one of its profile's allowed starts;
//! creation fails on overlap. So feasibility is interval overlap on the memory axis, checked
//! here with an 8-bit mask.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The shape of a GPU instance, independent of the product's memory size.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ProfileClass {
    /// 1 compute slice, 1 memory slice (GI profile 19).
    G1,
    /// 1g with the media engines (GI profile 20); at most one media instance per GPU.
    G1Me,
    /// 1 compute slice with double memory (GI profile 15), e.g. 1g.20gb on H100-80GB.
    G1X2,
    /// 2 compute, 2 memory slices (GI profile 14).
    G2,
    /// 2g with the media engines (A30 only).
    G2Me,
    /// 3 compute, 4 memory slices (GI profile 9).
    G3,
    /// 4 compute, 4 memory slices (GI profile 5).
    G4,
    /// 7 compute, 8 memory slices: the whole GPU as one instance (GI profile 0).
    /// (On the 4-slice A30 the whole-GPU instance is `4g.24gb`, class `G4`.)
    G7,
}

impl ProfileClass {
    /// The NVML profile index constant (`NVML_GPU_INSTANCE_PROFILE_*`) passed to
    /// `nvmlDeviceGetGpuInstanceProfileInfo`; its `id` is what create/placement calls take.
    pub fn nvml_profile_index(self) -> u32 {
        match self {
            Self::G1 => 0,
            Self::G2 => 1,
            Self::G3 => 2,
            Self::G4 => 3,
            Self::G7 => 4,
            Self::G1Me => 7,
            Self::G2Me => 8,
            Self::G1X2 => 9,
        }
    }

    /// Whether the instance holds the GPU's single set of media engines.
    pub fn has_media(self) -> bool {
        matches!(self, Self::G1Me | Self::G2Me)
    }
}

/// One MIG profile on one product.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Profile {
    pub class: ProfileClass,
    /// The NVIDIA name, e.g. `3g.40gb` or `1g.10gb+me`.
    pub name: &'static str,
    pub compute_slices: u8,
    pub memory_slices: u8,
    pub memory_mib: u64,
    pub max_count: u8,
    /// Allowed first memory slices (NVML placement `start`).
    pub starts: &'static [u8],
}

impl Profile {
    /// Memory-slice mask of this profile placed at `start`.
    pub fn mask_at(&self, start: u8) -> u8 {
        let run = ((1u16 << self.memory_slices) - 1) as u8;
        run << start
    }
}

/// The MIG-capable GPU products tessera knows. Names follow `GpuModel` strings.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum MigProduct {
    #[serde(rename = "A100-40GB")]
    A100_40GB,
    #[serde(rename = "A100-80GB")]
    A100_80GB,
    #[serde(rename = "H100-80GB")]
    H100_80GB,
    #[serde(rename = "H100-94GB")]
    H100_94GB,
    #[serde(rename = "H100-96GB")]
    H100_96GB,
    #[serde(rename = "H200-141GB")]
    H200_141GB,
    #[serde(rename = "B200-180GB")]
    B200_180GB,
    #[serde(rename = "A30-24GB")]
    A30_24GB,
}

impl MigProduct {
    pub const ALL: [MigProduct; 8] = [
        Self::A100_40GB,
        Self::A100_80GB,
        Self::H100_80GB,
        Self::H100_94GB,
        Self::H100_96GB,
        Self::H200_141GB,
        Self::B200_180GB,
        Self::A30_24GB,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::A100_40GB => "A100-40GB",
            Self::A100_80GB => "A100-80GB",
            Self::H100_80GB => "H100-80GB",
            Self::H100_94GB => "H100-94GB",
            Self::H100_96GB => "H100-96GB",
            Self::H200_141GB => "H200-141GB",
            Self::B200_180GB => "B200-180GB",
            Self::A30_24GB => "A30-24GB",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.name().eq_ignore_ascii_case(name))
    }

    pub fn geometry(self) -> &'static Geometry {
        match self {
            Self::A100_40GB => &A100_40GB,
            Self::A100_80GB => &A100_80GB,
            Self::H100_80GB => &H100_80GB,
            Self::H100_94GB => &H100_94GB,
            Self::H100_96GB => &H100_96GB,
            Self::H200_141GB => &H200_141GB,
            Self::B200_180GB => &B200_180GB,
            Self::A30_24GB => &A30_24GB,
        }
    }
}

impl fmt::Display for MigProduct {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Prefix of the resources NVIDIA's device plugin advertises per MIG profile (mixed strategy).
pub const NVIDIA_MIG_RESOURCE_PREFIX: &str = "nvidia.com/mig-";
/// The whole-GPU resource NVIDIA's device plugin advertises.
pub const NVIDIA_GPU_RESOURCE: &str = "nvidia.com/gpu";

/// The resource NVIDIA's device plugin advertises for a profile (mixed strategy): `mig-` and the
/// profile name with every `+` replaced by `.`, e.g. `1g.10gb+me` -> `nvidia.com/mig-1g.10gb.me`.
pub fn nvidia_resource_name(profile: &Profile) -> String {
    format!("{NVIDIA_MIG_RESOURCE_PREFIX}{}", profile.name.replace('+', "."))
}

/// `nvidia.com/gpu` and every MIG resource name of every product in [`MigProduct::ALL`], each once,
/// in table order (what kube-scheduler's `managedResources` must list).
pub fn all_nvidia_resource_names() -> Vec<String> {
    let mut names = vec![NVIDIA_GPU_RESOURCE.to_string()];
    for product in MigProduct::ALL {
        for profile in product.geometry().profiles {
            let name = nvidia_resource_name(profile);
            if !names.contains(&name) {
                names.push(name);
            }
        }
    }
    names
}

/// The profile named `name` (either form [`Geometry::profile_by_name`] takes) on the first
/// product in [`MigProduct::ALL`] that has it. A name fixes its compute slices on every product
/// that has it (the tests pin this), so those can be read from whichever product comes first.
pub fn profile_named(name: &str) -> Option<&'static Profile> {
    MigProduct::ALL.iter().find_map(|p| p.geometry().profile_by_name(name))
}

/// The placement table of one product.
#[derive(Debug, PartialEq, Eq)]
pub struct Geometry {
    pub product: MigProduct,
    pub memory_slices: u8,
    pub compute_slices: u8,
    pub max_instances: u8,
    pub memory_mib: u64,
    /// Ordered from smallest to largest (by compute, then memory).
    pub profiles: &'static [Profile],
}

impl Geometry {
    pub fn profile(&self, class: ProfileClass) -> Option<&'static Profile> {
        self.profiles.iter().find(|p| p.class == class)
    }

    /// The profile named `name` (`1g.10gb+me`), also in its resource form (`1g.10gb.me`, what
    /// `nvidia.com/mig-1g.10gb.me` carries).
    pub fn profile_by_name(&self, name: &str) -> Option<&'static Profile> {
        let same = |p: &Profile| {
            p.name.len() == name.len()
                && p.name.bytes().zip(name.bytes()).all(|(a, b)| {
                    let a = if a == b'+' { b'.' } else { a };
                    a.eq_ignore_ascii_case(&if b == b'+' { b'.' } else { b })
                })
        };
        self.profiles.iter().find(|p| same(p))
    }

    /// The largest profile smaller than the whole GPU (4g on 8-slice parts, 2g on A30).
    pub fn largest_sub_gpu(&self) -> &'static Profile {
        self.profiles.iter().rfind(|p| p.memory_slices < self.memory_slices).unwrap_or(&self.profiles[0])
    }

    /// Mask with every memory slice set.
    pub fn full_mask(&self) -> u8 {
        ((1u16 << self.memory_slices) - 1) as u8
    }
}

const STARTS_1: &[u8] = &[0, 1, 2, 3, 4, 5, 6];
const STARTS_1X2: &[u8] = &[0, 2, 4, 6];
const STARTS_2: &[u8] = &[0, 2, 4];
const STARTS_3: &[u8] = &[0, 4];
const STARTS_0: &[u8] = &[0];

const GIB: u64 = 1024;

/// Builds the 8-slice table for a product whose sizes are the nominal GB in the profile names.
macro_rules! eight_slice {
    ($ident:ident, $product:expr, $total_mib:expr,
     [$g1:literal, $g1me:literal, $g1x2:literal, $g2:literal, $g3:literal, $g4:literal, $g7:literal],
     [$m1:expr, $m1x2:expr, $m3:expr, $m7:expr]) => {
        static $ident: Geometry = Geometry {
            product: $product,
            memory_slices: 8,
            compute_slices: 7,
            max_instances: 7,
            memory_mib: $total_mib,
            profiles: &[
                Profile {
                    class: ProfileClass::G1,
                    name: $g1,
                    compute_slices: 1,
                    memory_slices: 1,
                    memory_mib: $m1,
                    max_count: 7,
                    starts: STARTS_1,
                },
                Profile {
                    class: ProfileClass::G1Me,
                    name: $g1me,
                    compute_slices: 1,
                    memory_slices: 1,
                    memory_mib: $m1,
                    max_count: 1,
                    starts: STARTS_1,
                },
                Profile {
                    class: ProfileClass::G1X2,
                    name: $g1x2,
                    compute_slices: 1,
                    memory_slices: 2,
                    memory_mib: $m1x2,
                    max_count: 4,
                    starts: STARTS_1X2,
                },
                Profile {
                    class: ProfileClass::G2,
                    name: $g2,
                    compute_slices: 2,
                    memory_slices: 2,
                    memory_mib: $m1x2,
                    max_count: 3,
                    starts: STARTS_2,
                },
                Profile {
                    class: ProfileClass::G3,
                    name: $g3,
                    compute_slices: 3,
                    memory_slices: 4,
                    memory_mib: $m3,
                    max_count: 2,
                    starts: STARTS_3,
                },
                Profile {
                    class: ProfileClass::G4,
                    name: $g4,
                    compute_slices: 4,
                    memory_slices: 4,
                    memory_mib: $m3,
                    max_count: 1,
                    starts: STARTS_0,
                },
                Profile {
                    class: ProfileClass::G7,
                    name: $g7,
                    compute_slices: 7,
                    memory_slices: 8,
                    memory_mib: $m7,
                    max_count: 1,
                    starts: STARTS_0,
                },
            ],
        };
    };
}

// Exact NVML sizes are published for the A100 parts; others use the nominal GB until measured.
eight_slice!(
    A100_40GB,
    MigProduct::A100_40GB,
    40_960,
    ["1g.5gb", "1g.5gb+me", "1g.10gb", "2g.10gb", "3g.20gb", "4g.20gb", "7g.40gb"],
    [4_864, 9_856, 19_968, 40_192]
);
eight_slice!(
    A100_80GB,
    MigProduct::A100_80GB,
    81_920,
    ["1g.10gb", "1g.10gb+me", "1g.20gb", "2g.20gb", "3g.40gb", "4g.40gb", "7g.80gb"],
    [9_856, 19_968, 40_192, 80_384]
);
eight_slice!(
    H100_80GB,
    MigProduct::H100_80GB,
    81_920,
    ["1g.10gb", "1g.10gb+me", "1g.20gb", "2g.20gb", "3g.40gb", "4g.40gb", "7g.80gb"],
    [10 * GIB, 20 * GIB, 40 * GIB, 80 * GIB]
);
eight_slice!(
    H100_94GB,
    MigProduct::H100_94GB,
    96_256,
    ["1g.12gb", "1g.12gb+me", "1g.24gb", "2g.24gb", "3g.47gb", "4g.47gb", "7g.94gb"],
    [12 * GIB, 24 * GIB, 47 * GIB, 94 * GIB]
);
eight_slice!(
    H100_96GB,
    MigProduct::H100_96GB,
    98_304,
    ["1g.12gb", "1g.12gb+me", "1g.24gb", "2g.24gb", "3g.48gb", "4g.48gb", "7g.96gb"],
    [12 * GIB, 24 * GIB, 48 * GIB, 96 * GIB]
);
eight_slice!(
    H200_141GB,
    MigProduct::H200_141GB,
    144_384,
    ["1g.18gb", "1g.18gb+me", "1g.35gb", "2g.35gb", "3g.71gb", "4g.71gb", "7g.141gb"],
    [18 * GIB, 35 * GIB, 71 * GIB, 141 * GIB]
);
eight_slice!(
    B200_180GB,
    MigProduct::B200_180GB,
    184_320,
    ["1g.23gb", "1g.23gb+me", "1g.45gb", "2g.45gb", "3g.90gb", "4g.90gb", "7g.180gb"],
    [23 * GIB, 45 * GIB, 90 * GIB, 180 * GIB]
);

static A30_24GB: Geometry = Geometry {
    product: MigProduct::A30_24GB,
    memory_slices: 4,
    compute_slices: 4,
    max_instances: 4,
    memory_mib: 24_576,
    profiles: &[
        Profile {
            class: ProfileClass::G1,
            name: "1g.6gb",
            compute_slices: 1,
            memory_slices: 1,
            memory_mib: 6 * GIB,
            max_count: 4,
            starts: &[0, 1, 2, 3],
        },
        Profile {
            class: ProfileClass::G1Me,
            name: "1g.6gb+me",
            compute_slices: 1,
            memory_slices: 1,
            memory_mib: 6 * GIB,
            max_count: 1,
            starts: &[0, 1, 2, 3],
        },
        Profile {
            class: ProfileClass::G2,
            name: "2g.12gb",
            compute_slices: 2,
            memory_slices: 2,
            memory_mib: 12 * GIB,
            max_count: 2,
            starts: &[0, 2],
        },
        Profile {
            class: ProfileClass::G2Me,
            name: "2g.12gb+me",
            compute_slices: 2,
            memory_slices: 2,
            memory_mib: 12 * GIB,
            max_count: 1,
            starts: &[0, 2],
        },
        Profile {
            class: ProfileClass::G4,
            name: "4g.24gb",
            compute_slices: 4,
            memory_slices: 4,
            memory_mib: 24 * GIB,
            max_count: 1,
            starts: &[0],
        },
    ],
};

/// One GPU instance on a GPU: its profile class and first memory slice.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Instance {
    pub class: ProfileClass,
    pub start: u8,
}

/// Why NVIDIA would refuse an instance.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MigError {
    #[error("{product} has no MIG profile {profile}")]
    UnknownProfile { product: MigProduct, profile: String },
    #[error("{profile} cannot start at memory slice {start}; allowed starts are {allowed:?}")]
    BadStart { profile: &'static str, start: u8, allowed: &'static [u8] },
    #[error("{profile} at {start} overlaps memory slices {overlap} already in use")]
    Overlap { profile: &'static str, start: u8, overlap: String },
    #[error("{profile} allows at most {max} per GPU")]
    TooMany { profile: &'static str, max: u8 },
    #[error("only one instance with media engines fits on a GPU; {existing} already has them")]
    MediaTaken { existing: &'static str },
    #[error("a GPU holds at most {max} instances")]
    InstanceLimit { max: u8 },
    #[error("no {profile} instance at memory slice {start}")]
    NoSuchInstance { profile: &'static str, start: u8 },
}

/// The MIG instances on one GPU, always a layout NVIDIA would accept.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "RawLayout")]
pub struct MigLayout {
    product: MigProduct,
    /// Sorted by start.
    instances: Vec<Instance>,
    #[serde(skip)]
    mask: u8,
}

impl MigLayout {
    pub fn empty(product: MigProduct) -> Self {
        Self { product, instances: Vec::new(), mask: 0 }
    }

    /// Builds a layout from instances, refusing any NVIDIA would refuse.
    pub fn from_instances(product: MigProduct, instances: &[Instance]) -> Result<Self, MigError> {
        let mut layout = Self::empty(product);
        for i in instances {
            layout.create(i.class, i.start)?;
        }
        Ok(layout)
    }

    pub fn product(&self) -> MigProduct {
        self.product
    }

    pub fn geometry(&self) -> &'static Geometry {
        self.product.geometry()
    }

    pub fn instances(&self) -> &[Instance] {
        &self.instances
    }

    /// Occupied memory slices as a bit mask (bit i = slice i).
    pub fn used_mask(&self) -> u8 {
        self.mask
    }

    pub fn used_compute(&self) -> u8 {
        self.instances.iter().map(|i| self.profile(i.class).compute_slices).sum()
    }

    pub fn free_memory_slices(&self) -> u8 {
        self.geometry().memory_slices - self.mask.count_ones() as u8
    }

    pub fn is_empty(&self) -> bool {
        self.instances.is_empty()
    }

    fn profile(&self, class: ProfileClass) -> &'static Profile {
        // Instances only ever hold classes the product has (checked at creation).
        self.geometry().profile(class).unwrap_or(&self.geometry().profiles[0])
    }

    /// Checks whether `class` could be created at `start`, with NVIDIA's reason if not.
    pub fn check(&self, class: ProfileClass, start: u8) -> Result<&'static Profile, MigError> {
        let geom = self.geometry();
        let profile = geom
            .profile(class)
            .ok_or_else(|| MigError::UnknownProfile { product: self.product, profile: format!("{class:?}") })?;
        if !profile.starts.contains(&start) {
            return Err(MigError::BadStart { profile: profile.name, start, allowed: profile.starts });
        }
        let want = profile.mask_at(start);
        let overlap = want & self.mask;
        if overlap != 0 {
            let slices: Vec<String> = (0..8).filter(|b| overlap & (1 << b) != 0).map(|b| b.to_string()).collect();
            return Err(MigError::Overlap { profile: profile.name, start, overlap: slices.join(",") });
        }
        if self.instances.len() >= geom.max_instances as usize {
            return Err(MigError::InstanceLimit { max: geom.max_instances });
        }
        let same = self.instances.iter().filter(|i| i.class == class).count();
        if same >= profile.max_count as usize {
            return Err(MigError::TooMany { profile: profile.name, max: profile.max_count });
        }
        if class.has_media()
            && let Some(existing) = self.instances.iter().find(|i| i.class.has_media())
        {
            return Err(MigError::MediaTaken { existing: self.profile(existing.class).name });
        }
        Ok(profile)
    }

    /// Creates an instance if NVIDIA would.
    pub fn create(&mut self, class: ProfileClass, start: u8) -> Result<(), MigError> {
        let profile = self.check(class, start)?;
        self.mask |= profile.mask_at(start);
        let pos = self.instances.partition_point(|i| i.start < start);
        self.instances.insert(pos, Instance { class, start });
        Ok(())
    }

    /// Destroys the instance of `class` at `start`.
    pub fn destroy(&mut self, class: ProfileClass, start: u8) -> Result<(), MigError> {
        let pos = self.instances.iter().position(|i| i.class == class && i.start == start).ok_or_else(|| {
            let name = self.geometry().profile(class).map_or("unknown profile", |p| p.name);
            MigError::NoSuchInstance { profile: name, start }
        })?;
        self.instances.remove(pos);
        self.recompute_mask();
        Ok(())
    }

    fn recompute_mask(&mut self) {
        let geom = self.product.geometry();
        self.mask = self
            .instances
            .iter()
            .filter_map(|i| geom.profile(i.class).map(|p| p.mask_at(i.start)))
            .fold(0, |m, x| m | x);
    }

    /// Every start at which `class` could be created now, ascending.
    pub fn placements(&self, class: ProfileClass) -> Vec<u8> {
        match self.geometry().profile(class) {
            Some(p) => p.starts.iter().copied().filter(|&s| self.check(class, s).is_ok()).collect(),
            None => Vec::new(),
        }
    }

    /// The largest profile (by compute, then memory) that can still be created, if any.
    pub fn largest_placeable(&self) -> Option<&'static Profile> {
        self.geometry().profiles.iter().rev().find(|p| !p.class.has_media() && !self.placements(p.class).is_empty())
    }
}

/// Wire form of a layout; converting it back re-checks every instance.
#[derive(Deserialize)]
struct RawLayout {
    product: MigProduct,
    instances: Vec<Instance>,
}

impl TryFrom<RawLayout> for MigLayout {
    type Error = MigError;
    fn try_from(raw: RawLayout) -> Result<Self, MigError> {
        Self::from_instances(raw.product, &raw.instances)
    }
}

#[cfg(test)]
mod tests;
