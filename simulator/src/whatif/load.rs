//! The pods to place: Pod manifests and the PodGroups their gangs name, read with the
//! scheduler's own parser and grouped into units.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use anyhow::{Context as _, Result, bail};
use k8s_openapi::api::core::v1::Pod;
use tessera_api::pod as podparse;
use tessera_api::podgroup::PodGroupSpec;
use tessera_core::Demand;

use crate::capture::{self, Cluster, Item, Kind};
use crate::driver::Unit;

/// Reads the extra pods: Pod manifests (multi-document YAML, a List, or JSON) and the
/// `PodGroup`s their gangs name. `pending` first adds the capture's own pending GPU pods.
/// Pods of the files outside gangs are placed `replicas` times (`NAME-1` … `NAME-N`).
pub fn load_pods(paths: &[impl AsRef<Path>], cluster: &Cluster, replicas: u32, pending: bool) -> Result<Vec<Unit>> {
    if replicas == 0 {
        bail!("--replicas must be at least 1");
    }
    // (pod, where it comes from, whether it is copied `replicas` times)
    let mut pods: Vec<(Pod, String, bool)> = Vec::new();
    if pending {
        pods.extend(cluster.pending.iter().map(|p| (p.clone(), "capture (pending pod)".to_owned(), false)));
    }
    let mut groups: BTreeMap<String, PodGroupSpec> = BTreeMap::new();
    let mut generated: HashMap<String, u32> = HashMap::new();
    for path in paths {
        let path = path.as_ref();
        let mut items: Vec<Item> = Vec::new();
        for (i, doc) in capture::documents(path)?.into_iter().enumerate() {
            let what =
                if i == 0 { path.display().to_string() } else { format!("{} (document {})", path.display(), i + 1) };
            capture::items(doc, &what, &mut items)?;
        }
        for item in &items {
            match item.kind {
                Kind::Pod => {
                    let mut pod: Pod = capture::typed(item)?;
                    if pod.metadata.name.is_none()
                        && let Some(prefix) = pod.metadata.generate_name.clone()
                    {
                        let n = generated.entry(prefix.clone()).or_default();
                        *n += 1;
                        pod.metadata.name = Some(format!("{prefix}{n}"));
                    }
                    pods.push((pod, item.origin.clone(), true));
                }
                Kind::PodGroup => {
                    let g: tessera_api::PodGroup = capture::typed(item)?;
                    let ns = g.metadata.namespace.as_deref().unwrap_or("default");
                    let Some(name) = g.metadata.name.as_deref() else {
                        bail!("{}: PodGroup without metadata.name", item.origin);
                    };
                    groups.insert(format!("{ns}/{name}"), g.spec);
                }
                Kind::Node | Kind::GpuNode => {
                    bail!("{}: a {:?} among the pods to place; cluster objects go in --capture", item.origin, item.kind)
                }
            }
        }
    }
    if pods.is_empty() {
        bail!("no pods to place");
    }
    let mut units: Vec<Unit> = Vec::new();
    let mut gang_at: HashMap<String, usize> = HashMap::new();
    let mut seen: BTreeMap<String, String> = BTreeMap::new();
    for (pod, origin, copied) in pods {
        let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
        let group = podparse::pod_group_name(&pod).map(|g| format!("{ns}/{g}"));
        let spec = group.as_ref().and_then(|g| groups.get(g).or_else(|| cluster.pod_groups.get(g)));
        let key = podparse::pod_key(&pod).with_context(|| format!("{origin}: pod"))?;
        let d = podparse::demand(&pod, spec).with_context(|| format!("{origin}: pod {key}"))?;
        let copies: Vec<Demand> = if copied && d.gang.is_none() && replicas > 1 {
            (1..=replicas)
                .map(|r| {
                    let mut c = d.clone();
                    c.pod = tessera_core::PodKey(format!("{}-{r}", d.pod));
                    c
                })
                .collect()
        } else {
            vec![d]
        };
        for d in copies {
            if let Some(first) = seen.insert(d.pod.0.clone(), origin.clone()) {
                bail!("pod {} appears twice: {first} and {origin}", d.pod);
            }
            if let Some(a) = cluster.snap.allocation(&d.pod) {
                bail!(
                    "{origin}: pod {} is already in the capture, on node {}; give the new pod another name",
                    d.pod,
                    a.node
                );
            }
            match d.gang.clone() {
                None => units.push(Unit::Pod(d)),
                Some(g) => match gang_at.get(&g.name) {
                    Some(&i) => {
                        if let Unit::Gang { members, .. } = &mut units[i] {
                            if let Some(first) = members[0].gang.as_ref().filter(|f| **f != g) {
                                bail!(
                                    "{origin}: pod {} declares gang {} with {} members and a {} ms timeout; \
                                     pod {} declares {} members and {} ms",
                                    d.pod,
                                    g.name,
                                    g.min_member,
                                    g.timeout_ms,
                                    members[0].pod,
                                    first.min_member,
                                    first.timeout_ms
                                );
                            }
                            members.push(d);
                        }
                    }
                    None => {
                        gang_at.insert(g.name.clone(), units.len());
                        units.push(Unit::Gang { name: g.name.clone(), members: vec![d] });
                    }
                },
            }
        }
    }
    for u in &units {
        if let Unit::Gang { name, members } = u {
            let min = members[0].gang.as_ref().map_or(1, |g| g.min_member) as usize;
            if members.len() < min {
                bail!("gang {name} needs {min} members but {} are given", members.len());
            }
        }
    }
    Ok(units)
}
