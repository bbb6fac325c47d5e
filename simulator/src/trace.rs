//! Loader for the Alibaba GPU trace v2023 ("openb") CSVs.
//!
//! Node lists: `sn,cpu_milli,memory_mib,gpu,model`. Pod lists: `name,cpu_milli,memory_mib,
//! num_gpu,gpu_milli` followed, in all but the multigpu files, by `gpu_spec,qos,pod_phase,
//! creation_time,deletion_time,scheduled_time`; the trailing columns are optional.

use std::path::Path;

use anyhow::{Context as _, Result, bail};
use serde::Deserialize;
use tessera_core::cluster::{Gpu, GpuMode, Node};
use tessera_core::demand::{Demand, GpuDemand};
use tessera_core::testing::model_memory_mib;
use tessera_core::topology::Topology;

#[derive(Debug, Clone, Deserialize)]
struct NodeRow {
    sn: String,
    cpu_milli: u64,
    memory_mib: u64,
    gpu: u32,
    #[serde(default)]
    model: String,
}

/// One pod of the trace.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct PodRow {
    pub name: String,
    pub cpu_milli: u64,
    pub memory_mib: u64,
    pub num_gpu: u32,
    pub gpu_milli: u32,
    #[serde(default)]
    pub gpu_spec: String,
}

impl PodRow {
    /// GPU request in milli-GPU (what the paper's x axis accumulates).
    pub fn gpu_request_milli(&self) -> u64 {
        match self.num_gpu {
            0 => 0,
            1 => u64::from(self.gpu_milli),
            n => u64::from(n) * 1000,
        }
    }

    /// The demand this pod makes, under a unique key.
    pub fn demand(&self, key: String) -> Demand {
        let gpu = match (self.num_gpu, self.gpu_milli) {
            (0, _) => GpuDemand::None,
            (1, m) if m < 1000 => GpuDemand::Share { milli: m },
            (n, _) => GpuDemand::Whole { count: n },
        };
        let mut d = Demand::new(key.as_str(), gpu).with_cpu(self.cpu_milli, self.memory_mib);
        d.gpu_models = self.gpu_spec.split('|').map(str::trim).filter(|s| !s.is_empty()).map(str::to_owned).collect();
        d
    }
}

/// Reads a node list; GPU nodes get shared-mode (time-sliced) GPUs as in the trace's cluster.
pub fn load_nodes(path: &Path) -> Result<Vec<Node>> {
    let mut rdr = csv::Reader::from_path(path).with_context(|| format!("opening node list {}", path.display()))?;
    let mut nodes = Vec::new();
    for (i, row) in rdr.deserialize::<NodeRow>().enumerate() {
        let row = row.with_context(|| format!("{}: row {}", path.display(), i + 2))?;
        if row.gpu > 0 && row.model.is_empty() {
            bail!("{}: row {}: node {} has {} GPUs but no model", path.display(), i + 2, row.sn, row.gpu);
        }
        let mem = model_memory_mib(&row.model);
        let gpus = (0..row.gpu)
            .map(|g| {
                let mut gpu = Gpu::new(g, &row.model, mem, GpuMode::Shared);
                gpu.uuid = format!("{}-gpu{g}", row.sn);
                gpu
            })
            .collect();
        let mut node = Node::new(&row.sn, row.cpu_milli, row.memory_mib, gpus);
        node.topology = std::sync::Arc::new(Topology::unconnected(row.gpu));
        nodes.push(node);
    }
    if nodes.is_empty() {
        bail!("{}: no nodes", path.display());
    }
    Ok(nodes)
}

/// Reads a pod list (11- or 5-column schema).
pub fn load_pods(path: &Path) -> Result<Vec<PodRow>> {
    let mut rdr = csv::ReaderBuilder::new()
        .flexible(true)
        .from_path(path)
        .with_context(|| format!("opening pod list {}", path.display()))?;
    let mut pods = Vec::new();
    for (i, row) in rdr.deserialize::<PodRow>().enumerate() {
        let row = row.with_context(|| format!("{}: row {}", path.display(), i + 2))?;
        if row.num_gpu == 1 && (row.gpu_milli == 0 || row.gpu_milli > 1000) {
            bail!("{}: row {}: pod {} asks 1 GPU with gpu_milli {}", path.display(), i + 2, row.name, row.gpu_milli);
        }
        pods.push(row);
    }
    if pods.is_empty() {
        bail!("{}: no pods", path.display());
    }
    Ok(pods)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap_or_else(|e| panic!("{e}"));
        p
    }

    #[test]
    fn both_pod_schemas_load() {
        let dir = std::env::temp_dir().join(format!("tessera-sim-trace-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
        let full = write(
            &dir,
            "full.csv",
            "name,cpu_milli,memory_mib,num_gpu,gpu_milli,gpu_spec,qos,pod_phase,creation_time,deletion_time,scheduled_time\n\
             p0,12000,16384,1,1000,,LS,Running,0,12537496,0\n\
             p1,6000,12288,1,460,V100M16|V100M32,LS,Running,1,2,1\n\
             p2,4000,8192,0,0,,BE,Pending,5,,\n",
        );
        let short = write(&dir, "short.csv", "name,cpu_milli,memory_mib,num_gpu,gpu_milli\np0,8000,4096,4,1000\n");
        let pods = load_pods(&full).unwrap_or_else(|e| panic!("{e:#}"));
        assert_eq!(pods.len(), 3);
        assert_eq!(pods[1].demand("k".into()).gpu, GpuDemand::Share { milli: 460 });
        assert_eq!(pods[1].demand("k".into()).gpu_models, vec!["V100M16", "V100M32"]);
        assert_eq!(pods[2].demand("k".into()).gpu, GpuDemand::None);
        assert_eq!(pods[0].demand("k".into()).gpu, GpuDemand::Whole { count: 1 });
        let pods = load_pods(&short).unwrap_or_else(|e| panic!("{e:#}"));
        assert_eq!(pods[0].demand("k".into()).gpu, GpuDemand::Whole { count: 4 });
        assert_eq!(pods[0].gpu_request_milli(), 4000);
        let bad = write(&dir, "bad.csv", "name,cpu_milli,memory_mib,num_gpu,gpu_milli\np0,x,1,1,1\n");
        let e = load_pods(&bad).expect_err("bad row accepted");
        assert!(format!("{e:#}").contains("row 2"), "{e:#}");
        let nodes =
            write(&dir, "nodes.csv", "sn,cpu_milli,memory_mib,gpu,model\nn0,64000,262144,2,P100\nn1,96000,1024,0,\n");
        let nodes = load_nodes(&nodes).unwrap_or_else(|e| panic!("{e:#}"));
        assert_eq!(nodes[0].gpus.len(), 2);
        assert_eq!(nodes[1].gpus.len(), 0);
        std::fs::remove_dir_all(&dir).ok();
    }
}
