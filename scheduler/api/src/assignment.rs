//! The `tessera.dev/assignment` annotation: which devices the scheduler chose for a pod.

use serde::{Deserialize, Serialize};
use tessera_core::{Gpu, Grant, Placement, Snapshot};

/// `{"node": .., "devices": [..]}`, written by the scheduler through the Binding.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    pub node: String,
    pub devices: Vec<AssignedDevice>,
}

/// One device of an assignment: a whole GPU, a MIG instance, or a share of a GPU.
///
/// Every optional field is written as an explicit `null` when absent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AssignedDevice {
    /// UUID of the physical GPU (`GPU-…`).
    pub gpu: String,
    /// GPU index on the node.
    pub index: u32,
    /// MIG profile name, e.g. `2g.20gb`, when the device is a MIG instance.
    #[serde(default)]
    pub profile: Option<String>,
    /// First memory slice of the MIG instance.
    #[serde(default)]
    pub start: Option<u8>,
    /// UUID of the MIG instance (`MIG-…`), when known.
    #[serde(default)]
    pub mig: Option<String>,
    /// Time-sliced share in milli-GPU.
    #[serde(default)]
    pub share: Option<u32>,
}

impl Assignment {
    /// Parses the annotation value.
    pub fn from_annotation(value: &str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(value)
    }

    /// The annotation value.
    pub fn to_annotation(&self) -> String {
        // Plain strings, integers and options: serialisation cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// The devices `placement` grants, named as the annotation names them: GPU UUIDs and MIG
    /// profile names from `snap`'s node, and the UUID `mig` knows for the MIG instance at
    /// (GPU index, start), if any (an instance still to be created has none).
    pub fn of(snap: &Snapshot, placement: &Placement, mig: impl Fn(u32, u8) -> Option<String>) -> Self {
        let node = snap.node(&placement.node);
        let gpu = |i: u32| node.and_then(|n| n.gpu(i));
        let devices = placement
            .grants
            .iter()
            .map(|g| {
                let mut dev = AssignedDevice {
                    gpu: gpu(g.gpu()).map(|x| x.uuid.clone()).unwrap_or_default(),
                    index: g.gpu(),
                    profile: None,
                    start: None,
                    mig: None,
                    share: None,
                };
                match *g {
                    Grant::Whole { .. } => {}
                    Grant::Share { milli, .. } => dev.share = Some(milli),
                    Grant::Mig { gpu: index, class, start } => {
                        dev.profile = gpu(index)
                            .and_then(Gpu::mig_product)
                            .and_then(|m| m.geometry().profile(class))
                            .map(|x| x.name.to_owned());
                        dev.start = Some(start);
                        dev.mig = mig(index, start);
                    }
                }
                dev
            })
            .collect();
        Self { node: placement.node.0.clone(), devices }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assignment_round_trips_through_the_annotation_with_explicit_nulls() {
        let a = Assignment {
            node: "gpu-node-1".into(),
            devices: vec![
                AssignedDevice {
                    gpu: "GPU-fef8089b-4820-abfc-e83e-94318197576e".into(),
                    index: 0,
                    profile: Some("2g.20gb".into()),
                    start: Some(4),
                    mig: Some("MIG-0c757cd7-e942-5726-a0b8-0e8fb7067135".into()),
                    share: None,
                },
                AssignedDevice {
                    gpu: "GPU-5d3c0e84-1b9f-4f2e-a0e4-9b1c2d3e4f50".into(),
                    index: 3,
                    profile: None,
                    start: None,
                    mig: None,
                    share: Some(300),
                },
            ],
        };
        let text = a.to_annotation();
        assert_eq!(
            text,
            r#"{"node":"gpu-node-1","devices":[{"gpu":"GPU-fef8089b-4820-abfc-e83e-94318197576e","index":0,"profile":"2g.20gb","start":4,"mig":"MIG-0c757cd7-e942-5726-a0b8-0e8fb7067135","share":null},{"gpu":"GPU-5d3c0e84-1b9f-4f2e-a0e4-9b1c2d3e4f50","index":3,"profile":null,"start":null,"mig":null,"share":300}]}"#
        );
        assert_eq!(Assignment::from_annotation(&text).unwrap(), a);
    }

    #[test]
    fn a_placement_names_gpu_uuids_profiles_shares_and_known_mig_uuids() {
        use tessera_core::mig::ProfileClass;
        use tessera_core::{GpuMode, Node, NodeName};
        let gpus = [GpuMode::Full, GpuMode::Shared, GpuMode::Mig]
            .into_iter()
            .enumerate()
            .map(|(i, mode)| {
                let mut g = Gpu::new(i as u32, "H100-80GB", 81559, mode);
                g.uuid = format!("GPU-{i}");
                g
            })
            .collect();
        let mut snap = Snapshot::default();
        snap.add_node(Node::new("n1", 8000, 65536, gpus)).unwrap();
        let placement = Placement {
            node: NodeName("n1".into()),
            grants: vec![
                Grant::Whole { gpu: 0 },
                Grant::Share { gpu: 1, milli: 250 },
                Grant::Mig { gpu: 2, class: ProfileClass::G2, start: 2 },
                Grant::Mig { gpu: 2, class: ProfileClass::G1, start: 6 },
            ],
            ops: Vec::new(),
            score: 0.0,
        };
        let a = Assignment::of(&snap, &placement, |gpu, start| (start == 2).then(|| format!("MIG-{gpu}-{start}")));
        let dev = |gpu: &str, index, profile: Option<&str>, start, mig: Option<&str>, share| AssignedDevice {
            gpu: gpu.into(),
            index,
            profile: profile.map(str::to_owned),
            start,
            mig: mig.map(str::to_owned),
            share,
        };
        assert_eq!(a.node, "n1");
        assert_eq!(
            a.devices,
            [
                dev("GPU-0", 0, None, None, None, None),
                dev("GPU-1", 1, None, None, None, Some(250)),
                dev("GPU-2", 2, Some("2g.20gb"), Some(2), Some("MIG-2-2"), None),
                dev("GPU-2", 2, Some("1g.10gb"), Some(6), None, None),
            ]
        );
    }

    #[test]
    fn assignment_accepts_omitted_optional_fields() {
        let a = Assignment::from_annotation(r#"{"node":"n1","devices":[{"gpu":"GPU-1","index":2}]}"#).unwrap();
        assert_eq!(a.devices[0].profile, None);
        assert_eq!(a.devices[0].index, 2);
    }

    #[test]
    fn assignment_rejects_a_device_without_gpu() {
        assert!(Assignment::from_annotation(r#"{"node":"n1","devices":[{"index":2}]}"#).is_err());
    }
}
