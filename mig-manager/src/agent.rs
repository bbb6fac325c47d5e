//! The agent loop: every period, list pods, read the spec, discover, reconcile, advertise,
//! record metrics and publish status. Nothing is carried between passes except the
//! conditions' transition times and the device plugin's fresh allocations, so a restarted
//! agent picks up where the last one stopped.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tessera_api::GpuNodeStatus;
use tessera_api::annotations::RESOURCE_GPU;
use tessera_api::gpunode::{Condition, HeldDevice};
use tokio::sync::{Notify, watch};
use tracing::{Instrument, info_span, warn};

use crate::device_plugin::Allocations;
use crate::gpu::{GpuBackend, GpuError, Observed, Sample, observe};
use crate::metrics::Metrics;
use crate::mig::reconcile::{Outcome, Reconciler};
use crate::podresources::{KubeletResources, PodView, physical};
use crate::pods::{PodInfo, PodSource, held_devices};
use crate::status::{self, Desired, NodeApi, PassReport};

/// Everything one agent needs.
#[derive(Debug)]
pub struct Agent {
    pub node: String,
    pub backend: Arc<dyn GpuBackend>,
    pub node_api: Arc<dyn NodeApi>,
    pub pods: Arc<dyn PodSource>,
    pub allocations: Arc<Allocations>,
    /// What the device plugin advertises.
    pub inventory: watch::Sender<Observed>,
    /// Registration state of the device plugin, when it runs.
    pub registered: Option<watch::Receiver<bool>>,
    pub metrics: Arc<Metrics>,
    /// kubelet's PodResources API, when used.
    pub kubelet: Option<Arc<dyn KubeletResources>>,
    previous: Vec<Condition>,
}

/// The pieces an [`Agent`] is built from.
#[derive(Debug)]
pub struct Parts {
    pub node: String,
    pub backend: Arc<dyn GpuBackend>,
    pub node_api: Arc<dyn NodeApi>,
    pub pods: Arc<dyn PodSource>,
    pub allocations: Arc<Allocations>,
    pub inventory: watch::Sender<Observed>,
    pub registered: Option<watch::Receiver<bool>>,
    pub metrics: Arc<Metrics>,
    pub kubelet: Option<Arc<dyn KubeletResources>>,
}

struct Discovered {
    observed: Result<Observed, GpuError>,
    outcome: Option<Result<Outcome, GpuError>>,
    links: Vec<crate::gpu::Link>,
    samples: Vec<(u32, Sample)>,
}

impl Agent {
    pub fn new(parts: Parts) -> Self {
        let Parts { node, backend, node_api, pods, allocations, inventory, registered, metrics, kubelet } = parts;
        Self {
            node,
            backend,
            node_api,
            pods,
            allocations,
            inventory,
            registered,
            metrics,
            kubelet,
            previous: Vec::new(),
        }
    }

    /// One pass; returns the status it published (or tried to).
    pub async fn pass(&mut self) -> GpuNodeStatus {
        #[allow(clippy::disallowed_methods)] // times a pass for its metric
        let started = Instant::now();
        let pods: Option<Vec<PodInfo>> = match self.pods.pods().await {
            Ok(p) => {
                self.allocations.retain_live(&p);
                Some(p)
            }
            Err(error) => {
                warn!(%error, "Listing pods failed; not changing MIG this pass");
                self.metrics.pass_failed(error.kind());
                None
            }
        };
        let desired: Option<Desired> = match self.node_api.desired().await {
            Ok(d) => Some(d),
            Err(error) => {
                warn!(%error, "Reading GpuNode spec failed; not changing MIG this pass");
                self.metrics.pass_failed(error.kind());
                None
            }
        };
        // What kubelet says every container holds, whichever plugin gave it.
        let held: Option<Vec<HeldDevice>> = match &self.kubelet {
            None => Some(Vec::new()),
            Some(k) => match k.list().await {
                Ok(views) => Some(held_from(&views, pods.as_deref().unwrap_or_default(), &self.allocations)),
                Err(error) => {
                    warn!(%error, "Reading kubelet's PodResources failed; not changing MIG this pass");
                    self.metrics.pass_failed(error.kind());
                    None
                }
            },
        };
        let has_spec = desired.as_ref().is_some_and(|d| !d.gpus.is_empty());
        // Reconcile only when we know both what is wanted and who holds what.
        let to_apply = match (&desired, &pods, &held) {
            (Some(d), Some(p), Some(h)) if has_spec => Some((d.gpus.clone(), p.clone(), h.clone())),
            _ => None,
        };
        let backend = self.backend.clone();
        let allocations = self.allocations.clone();
        let node = self.node.clone();
        let found = tokio::task::spawn_blocking(move || {
            let observed = observe(backend.as_ref());
            let outcome = match (&observed, to_apply) {
                (Ok(obs), Some((gpus, pods, kubelet_held))) => {
                    let mut held = held_devices(&pods, &node, obs);
                    // Never repartition what kubelet says a container holds.
                    held.extend(kubelet_held.into_iter().map(|h| h.uuid));
                    let in_use = || -> BTreeSet<String> {
                        let mut s = held.clone();
                        s.extend(allocations.held());
                        s
                    };
                    Some(Reconciler::new(backend.clone()).reconcile(&gpus, &in_use))
                }
                _ => None,
            };
            let observed = match &outcome {
                Some(Ok(o)) => Ok(o.observed.clone()),
                _ => observed,
            };
            let (links, samples) = match &observed {
                Ok(obs) => (
                    backend.links().unwrap_or_default(),
                    obs.gpus
                        .iter()
                        .filter_map(|g| backend.sample(g.info.index).ok().map(|s| (g.info.index, s)))
                        .collect(),
                ),
                Err(_) => (Vec::new(), Vec::new()),
            };
            Discovered { observed, outcome, links, samples }
        })
        .await;
        let found = match found {
            Ok(f) => f,
            Err(e) => Discovered {
                observed: Err(GpuError::Nvml { call: "discovery task", message: e.to_string() }),
                outcome: None,
                links: Vec::new(),
                samples: Vec::new(),
            },
        };

        // The device plugin serves what exists now, or nothing when discovery failed.
        let observed = found.observed.as_ref().ok().cloned().unwrap_or_default();
        self.inventory.send_replace(observed.clone());
        self.metrics.nvml_up.set(i64::from(found.observed.is_ok()));
        self.metrics.observed(&observed, &found.samples);
        let outcome = match found.outcome {
            Some(Ok(o)) => {
                self.metrics.reconciled(&o, started.elapsed().as_secs_f64());
                Some(o)
            }
            Some(Err(error)) => {
                warn!(%error, "Reconcile pass failed; will retry");
                self.metrics.pass_failed(error.kind());
                None
            }
            None => None,
        };
        let registered = self.registered.as_ref().map(|r| *r.borrow());
        if let Some(r) = registered {
            self.metrics.device_plugin_registered.set(i64::from(r));
        }
        let report = PassReport {
            discovery: found.observed.as_ref().map(|_| ()),
            outcome: outcome.as_ref(),
            has_spec,
            registered,
        };
        #[allow(clippy::disallowed_methods)] // condition transition times are wall-clock stamps
        let now = k8s_openapi::jiff::Timestamp::now().to_string();
        let conditions = status::conditions(&report, &self.previous, &now);
        self.previous = conditions.clone();
        let published = GpuNodeStatus {
            gpus: status::gpu_statuses(&observed),
            links: status::links(&found.links),
            observed_generation: desired.as_ref().and_then(|d| d.generation),
            conditions,
            held: held.unwrap_or_default(),
        };
        if let Err(error) = self.node_api.publish(published.clone()).await {
            warn!(%error, "Publishing GpuNode status failed; will retry");
            self.metrics.pass_failed(error.kind());
        }
        published
    }

    /// Runs passes forever: one every `period`, and one as soon as `trigger` is notified
    /// (the GpuNode spec changed).
    pub async fn run(mut self, period: Duration, trigger: Arc<Notify>) {
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = trigger.notified() => {}
            }
            let span = info_span!("mig_reconcile", node = %self.node);
            self.pass().instrument(span).await;
        }
    }
}

/// The devices kubelet reports held, per container: other plugins' device IDs as the physical
/// UUIDs they stand for; tessera's own with the devices the plugin served the pod (kubelet's
/// IDs for `tessera.dev/gpu` are admission slots).
pub fn held_from(views: &[PodView], pods: &[PodInfo], allocations: &Allocations) -> Vec<HeldDevice> {
    let mut out = Vec::new();
    for v in views {
        let uid = pods.iter().find(|p| p.namespace == v.namespace && p.name == v.name).map(|p| p.uid.as_str());
        for c in &v.containers {
            for (resource, ids) in &c.devices {
                let uuids: Vec<String> = if resource == RESOURCE_GPU {
                    uid.and_then(|u| allocations.of(u)).unwrap_or_default()
                } else {
                    ids.iter().map(|id| physical(id).to_owned()).collect()
                };
                for uuid in uuids {
                    let h = HeldDevice { pod: v.key(), container: c.name.clone(), resource: resource.clone(), uuid };
                    if !out.contains(&h) {
                        out.push(h);
                    }
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use tessera_api::gpunode::{GpuSpec, MigInstanceSpec, Mode, condition};
    use tessera_api::{AssignedDevice, Assignment, GpuNodeSpec};
    use tessera_core::mig::MigProduct;

    use super::*;
    use crate::gpu::fake::FakeGpus;
    use crate::gpu::null::NullBackend;
    use crate::metrics;
    use crate::podresources::StaticResources;
    use crate::pods::StaticPods;
    use crate::status::LocalNodeApi;

    fn agent(
        backend: Arc<dyn GpuBackend>,
        spec_file: Option<std::path::PathBuf>,
        pods: Arc<StaticPods>,
    ) -> (Agent, Arc<LocalNodeApi>) {
        agent_with(backend, spec_file, pods, Arc::default())
    }

    fn agent_with(
        backend: Arc<dyn GpuBackend>,
        spec_file: Option<std::path::PathBuf>,
        pods: Arc<StaticPods>,
        kubelet: Arc<StaticResources>,
    ) -> (Agent, Arc<LocalNodeApi>) {
        let api = Arc::new(LocalNodeApi::new(spec_file));
        let (_, m) = metrics::registry();
        let (tx, _) = watch::channel(Observed::default());
        let a = Agent::new(Parts {
            node: "n1".into(),
            backend,
            node_api: api.clone(),
            pods,
            allocations: Arc::default(),
            inventory: tx,
            registered: None,
            metrics: Arc::new(m),
            kubelet: Some(kubelet),
        });
        (a, api)
    }

    fn cond<'a>(s: &'a GpuNodeStatus, t: &str) -> &'a Condition {
        s.conditions.iter().find(|c| c.type_ == t).unwrap()
    }

    #[tokio::test]
    async fn agent_applies_the_spec_but_keeps_an_assigned_instance() {
        let fake = Arc::new(FakeGpus::new(MigProduct::H100_80GB, 2, true).with_mig(0, &["4g.40gb"]).unwrap());
        let gpu0 = fake.devices().unwrap()[0].uuid.clone();
        let busy = fake.mig_devices(0).unwrap()[0].uuid.clone();
        let dir = tempfile::tempdir().unwrap();
        let spec_path = dir.path().join("spec.json");
        let spec = GpuNodeSpec {
            gpus: vec![
                GpuSpec {
                    index: 0,
                    mode: Mode::Mig,
                    instances: vec![MigInstanceSpec { profile: "7g.80gb".into(), start: 0 }],
                },
                GpuSpec { index: 1, mode: Mode::Full, instances: vec![] },
            ],
        };
        std::fs::write(&spec_path, serde_json::to_string(&spec).unwrap()).unwrap();
        let a = Assignment {
            node: "n1".into(),
            devices: vec![AssignedDevice {
                gpu: gpu0,
                index: 0,
                profile: Some("4g.40gb".into()),
                start: Some(0),
                mig: None,
                share: None,
            }],
        };
        let pods = Arc::new(StaticPods::new(vec![crate::pods::tests::pod("vlm-0", 1, a)]));
        let (mut agent, api) = agent(fake.clone(), Some(spec_path), pods.clone());
        let status = agent.pass().await;
        assert_eq!(api.last().as_ref(), Some(&status));
        assert_eq!(status.gpus[1].mode, Mode::Full, "GPU 1 switched to full");
        assert_eq!(status.gpus[0].instances[0].uuid, busy, "the assigned 4g stays");
        let r = cond(&status, condition::RECONCILED);
        assert_eq!((r.status.as_str(), r.reason.as_str()), ("False", "InstanceInUse"));
        // The pod finishes; the next pass converges.
        pods.set(vec![]);
        let status = agent.pass().await;
        assert_eq!(status.gpus[0].instances[0].profile, "7g.80gb");
        assert_eq!(cond(&status, condition::RECONCILED).reason, "Converged");
        assert_eq!(cond(&status, condition::NVML_READY).status, "True");
    }

    #[tokio::test]
    async fn a_spec_change_notification_runs_a_pass_before_the_period() {
        let fake = Arc::new(FakeGpus::new(MigProduct::H100_80GB, 1, true));
        let dir = tempfile::tempdir().unwrap();
        let spec_path = dir.path().join("spec.json");
        std::fs::write(&spec_path, r#"{"gpus":[]}"#).unwrap();
        let (agent, api) = agent(fake.clone(), Some(spec_path.clone()), Arc::default());
        let trigger = Arc::new(Notify::new());
        let task = tokio::spawn(agent.run(Duration::from_secs(3600), trigger.clone()));
        let wait_for = |want: usize| {
            let api = api.clone();
            async move {
                for _ in 0..200 {
                    if api.last().is_some_and(|s| s.gpus[0].instances.len() == want) {
                        return true;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                false
            }
        };
        assert!(wait_for(0).await, "first pass at start");
        std::fs::write(
            &spec_path,
            r#"{"gpus":[{"index":0,"mode":"mig","instances":[{"profile":"1g.10gb","start":6}]}]}"#,
        )
        .unwrap();
        trigger.notify_one();
        assert!(wait_for(1).await, "notified pass applied the new spec long before the hour");
        task.abort();
    }

    #[tokio::test]
    async fn without_nvml_the_agent_says_so_and_advertises_nothing() {
        let (mut agent, _) = agent(Arc::new(NullBackend::new("libnvidia-ml.so.1 missing")), None, Arc::default());
        let rx = agent.inventory.subscribe();
        let status = agent.pass().await;
        assert!(status.gpus.is_empty());
        let c = cond(&status, condition::NVML_READY);
        assert_eq!((c.status.as_str(), c.reason.as_str()), ("False", "NoNvml"));
        assert!(rx.borrow().gpus.is_empty());
    }
}

#[cfg(test)]
mod podresources_tests {
    use std::collections::BTreeMap;

    use tessera_api::GpuNodeSpec;
    use tessera_api::gpunode::{GpuSpec, MigInstanceSpec, Mode};
    use tessera_core::mig::MigProduct;

    use super::*;
    use crate::gpu::fake::FakeGpus;
    use crate::metrics;
    use crate::podresources::{ContainerView, StaticResources};
    use crate::pods::StaticPods;
    use crate::status::LocalNodeApi;

    #[tokio::test]
    async fn devices_nvidias_plugin_gave_are_published_and_never_repartitioned() {
        let fake =
            Arc::new(FakeGpus::new(MigProduct::H100_80GB, 2, true).with_mig(0, &["3g.40gb", "3g.40gb"]).unwrap());
        let nvidia_mig = fake.mig_devices(0).unwrap()[1].uuid.clone();
        let dir = tempfile::tempdir().unwrap();
        let spec_path = dir.path().join("spec.json");
        let spec = GpuNodeSpec {
            gpus: vec![GpuSpec {
                index: 0,
                mode: Mode::Mig,
                instances: vec![MigInstanceSpec { profile: "7g.80gb".into(), start: 0 }],
            }],
        };
        std::fs::write(&spec_path, serde_json::to_string(&spec).unwrap()).unwrap();
        let kubelet = Arc::new(StaticResources::default());
        kubelet.set(vec![PodView {
            namespace: "ml".into(),
            name: "cuda-job".into(),
            containers: vec![ContainerView {
                name: "main".into(),
                devices: BTreeMap::from([("nvidia.com/mig-3g.40gb".to_owned(), vec![nvidia_mig.clone()])]),
            }],
        }]);
        let api = Arc::new(LocalNodeApi::new(Some(spec_path)));
        let (_, m) = metrics::registry();
        let (tx, _) = watch::channel(Observed::default());
        let mut agent = Agent::new(Parts {
            node: "n1".into(),
            backend: fake.clone(),
            node_api: api.clone(),
            pods: Arc::new(StaticPods::default()),
            allocations: Arc::default(),
            inventory: tx,
            registered: None,
            metrics: Arc::new(m),
            kubelet: Some(kubelet.clone()),
        });
        let status = agent.pass().await;
        assert_eq!(
            status.held,
            [HeldDevice {
                pod: "ml/cuda-job".into(),
                container: "main".into(),
                resource: "nvidia.com/mig-3g.40gb".into(),
                uuid: nvidia_mig.clone()
            }]
        );
        assert!(status.gpus[0].instances.iter().any(|i| i.uuid == nvidia_mig), "the held instance stays");
        // The NVIDIA pod ends: the GPU is repartitioned.
        kubelet.set(vec![]);
        let status = agent.pass().await;
        assert!(status.held.is_empty());
        assert_eq!(status.gpus[0].instances[0].profile, "7g.80gb");
    }
}
