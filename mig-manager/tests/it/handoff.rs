//! A scripted kubelet over the real gRPC APIs on unix sockets: it serves `Registration` and
//! `PodResources`, and drives the device plugin in kubelet's order (Register →
//! GetDevicePluginOptions → ListAndWatch → per admitted pod GetPreferredAllocation → Allocate),
//! admitting pods one at a time as kubelet's sync loop does, in an order unrelated to their
//! creation. Every container must see exactly its pod's signed assignment.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use tessera_api::signing::{Keyring, Keys};
use tessera_api::{AssignedDevice, Assignment};
use tessera_core::mig::MigProduct;
use tessera_mig_manager::device_plugin::server::{PluginConfig, connect_unix, run};
use tessera_mig_manager::device_plugin::v1beta1::device_plugin_client::DevicePluginClient;
use tessera_mig_manager::device_plugin::v1beta1::registration_server::{Registration, RegistrationServer};
use tessera_mig_manager::device_plugin::v1beta1::{
    AllocateRequest, ContainerAllocateRequest, ContainerPreferredAllocationRequest, Empty, PreferredAllocationRequest,
    RegisterRequest,
};
use tessera_mig_manager::device_plugin::{ALLOCATED_POD, Allocations, KUBELET_SOCKET, Plugin, SOCKET_NAME, Trust};
use tessera_mig_manager::events::MemoryEvents;
use tessera_mig_manager::gpu::fake::FakeGpus;
use tessera_mig_manager::gpu::{GpuBackend, observe};
use tessera_mig_manager::metrics;
use tessera_mig_manager::podresources::KubeletSocket;
use tessera_mig_manager::podresources::v1::pod_resources_lister_server::{
    PodResourcesLister, PodResourcesListerServer,
};
use tessera_mig_manager::podresources::v1::{
    AllocatableResourcesRequest, AllocatableResourcesResponse, ContainerDevices, ContainerResources,
    ListPodResourcesRequest, ListPodResourcesResponse, PodResources,
};
use tessera_mig_manager::pods::{PodInfo, StaticPods};
use tokio::net::UnixListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::{Request, Response, Status};

const NODE: &str = "gpu-node-1";
const RESOURCE: &str = "tessera.dev/gpu";
const KEYS: &str = "k1 dGVzc2VyYS1oYW5kb2ZmLXRlc3Qta2V5LTMyLWJ5dGVzIQ==";

type Containers = Vec<(String, Vec<String>)>;

/// kubelet's pod manager and device accounting, as the PodResources API shows them.
#[derive(Debug, Default)]
struct KubeletState {
    /// (namespace, name, [(container, device IDs of `tessera.dev/gpu`)]).
    pods: Vec<(String, String, Containers)>,
    /// Devices of other plugins (e.g. NVIDIA's), per pod.
    other: Vec<(String, String, String, Vec<String>)>,
}

#[derive(Clone, Debug, Default)]
struct FakeKubelet {
    state: Arc<Mutex<KubeletState>>,
    registered: Option<mpsc::UnboundedSender<RegisterRequest>>,
}

#[tonic::async_trait]
impl Registration for FakeKubelet {
    async fn register(&self, request: Request<RegisterRequest>) -> Result<Response<Empty>, Status> {
        if let Some(tx) = &self.registered {
            let _ = tx.send(request.into_inner());
        }
        Ok(Response::new(Empty {}))
    }
}

#[tonic::async_trait]
impl PodResourcesLister for FakeKubelet {
    async fn list(&self, _: Request<ListPodResourcesRequest>) -> Result<Response<ListPodResourcesResponse>, Status> {
        let st = self.state.lock().unwrap();
        let mut pod_resources: Vec<PodResources> = st
            .pods
            .iter()
            .map(|(ns, name, containers)| PodResources {
                name: name.clone(),
                namespace: ns.clone(),
                containers: containers
                    .iter()
                    .map(|(c, ids)| ContainerResources {
                        name: c.clone(),
                        devices: if ids.is_empty() {
                            vec![]
                        } else {
                            vec![ContainerDevices {
                                resource_name: RESOURCE.into(),
                                device_ids: ids.clone(),
                                topology: None,
                            }]
                        },
                        cpu_ids: vec![],
                    })
                    .collect(),
            })
            .collect();
        for (ns, name, resource, ids) in &st.other {
            pod_resources.push(PodResources {
                name: name.clone(),
                namespace: ns.clone(),
                containers: vec![ContainerResources {
                    name: "main".into(),
                    devices: vec![ContainerDevices {
                        resource_name: resource.clone(),
                        device_ids: ids.clone(),
                        topology: None,
                    }],
                    cpu_ids: vec![],
                }],
            });
        }
        Ok(Response::new(ListPodResourcesResponse { pod_resources }))
    }

    async fn get_allocatable_resources(
        &self,
        _: Request<AllocatableResourcesRequest>,
    ) -> Result<Response<AllocatableResourcesResponse>, Status> {
        Ok(Response::new(AllocatableResourcesResponse::default()))
    }
}

fn listen(path: &Path) -> UnixListenerStream {
    let _ = std::fs::remove_file(path);
    UnixListenerStream::new(UnixListener::bind(path).unwrap())
}

/// One node: fake GPUs, the plugin (PodResources + signatures) and the scripted kubelet.
struct Node {
    _dir: tempfile::TempDir,
    fake: Arc<FakeGpus>,
    kubelet: FakeKubelet,
    api: Arc<StaticPods>,
    events: Arc<MemoryEvents>,
    metrics: Arc<metrics::Metrics>,
    registry: prometheus_client::registry::Registry,
    client: DevicePluginClient<tonic::transport::Channel>,
    /// Healthy device IDs from ListAndWatch, and those kubelet has handed out.
    advertised: Vec<String>,
    used: BTreeSet<String>,
    ring: Keyring,
    /// The API's pod list (what `api` serves).
    current: Vec<PodInfo>,
    /// The fake kubelet's PodResources socket.
    pr_socket: PathBuf,
    allocations: Arc<Allocations>,
}

async fn node(fake: FakeGpus) -> Node {
    let dir = tempfile::tempdir().unwrap();
    let fake = Arc::new(fake);
    let (reg_tx, mut reg_rx) = mpsc::unbounded_channel();
    let kubelet = FakeKubelet { state: Arc::default(), registered: Some(reg_tx) };
    let reg = listen(&dir.path().join(KUBELET_SOCKET));
    let k = kubelet.clone();
    tokio::spawn(tonic::transport::Server::builder().add_service(RegistrationServer::new(k)).serve_with_incoming(reg));
    let pr_socket: PathBuf = dir.path().join("pod-resources.sock");
    let pr = listen(&pr_socket);
    let k = kubelet.clone();
    tokio::spawn(
        tonic::transport::Server::builder().add_service(PodResourcesListerServer::new(k)).serve_with_incoming(pr),
    );

    let (inventory, rx) = tokio::sync::watch::channel(observe(fake.as_ref()).unwrap());
    std::mem::forget(inventory); // the inventory stays as discovered for the test's length
    let api = Arc::new(StaticPods::default());
    let events = Arc::new(MemoryEvents::default());
    let (registry, m) = metrics::registry();
    let metrics = Arc::new(m);
    let allocations = Arc::new(Allocations::default());
    let plugin = Plugin::new(NODE, rx, api.clone(), allocations.clone(), Some(metrics.clone()))
        .with_kubelet(Arc::new(KubeletSocket::new(&pr_socket)))
        .with_trust(Trust::Signed(Arc::new(Keys::fixed(Keyring::parse(KEYS).unwrap()))))
        .with_refusals(events.clone())
        .with_share_slots(10);
    let cfg = PluginConfig {
        dir: dir.path().to_path_buf(),
        socket_name: SOCKET_NAME.into(),
        resource: RESOURCE.into(),
        poll: Duration::from_millis(50),
    };
    let (reg_state, _) = tokio::sync::watch::channel(false);
    tokio::spawn(run(cfg, plugin, reg_state));

    // kubelet's order: Register, then GetDevicePluginOptions and ListAndWatch.
    let req = tokio::time::timeout(Duration::from_secs(10), reg_rx.recv()).await.unwrap().unwrap();
    assert_eq!((req.version.as_str(), req.resource_name.as_str()), ("v1beta1", RESOURCE));
    let mut client = DevicePluginClient::new(connect_unix(&dir.path().join(&req.endpoint)).await.unwrap());
    let opts = client.get_device_plugin_options(Empty {}).await.unwrap().into_inner();
    assert!(opts.get_preferred_allocation_available);
    let mut stream = client.list_and_watch(Empty {}).await.unwrap().into_inner();
    let first = stream.message().await.unwrap().unwrap();
    let advertised = first.devices.iter().filter(|d| d.health == "Healthy").map(|d| d.id.clone()).collect();
    tokio::spawn(async move { while let Ok(Some(_)) = stream.message().await {} });
    Node {
        _dir: dir,
        fake,
        kubelet,
        api,
        events,
        metrics,
        registry,
        client,
        advertised,
        used: BTreeSet::new(),
        ring: Keyring::parse(KEYS).unwrap(),
        current: Vec::new(),
        pr_socket,
        allocations,
    }
}

fn whole(fake: &FakeGpus, index: u32) -> AssignedDevice {
    AssignedDevice {
        gpu: fake.devices().unwrap()[index as usize].uuid.clone(),
        index,
        profile: None,
        start: None,
        mig: None,
        share: None,
    }
}

/// A bound pod as the API shows it, with its assignment signed by `ring` (or not).
fn api_pod(name: &str, uid: &str, a: &Assignment, signature: Option<String>) -> PodInfo {
    let mut annotations = serde_json::json!({"tessera.dev/assignment": a.to_annotation()});
    if let Some(s) = signature {
        annotations["tessera.dev/assignment-signature"] = serde_json::Value::String(s);
    }
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "namespace": "ml", "uid": uid, "annotations": annotations,
                     "creationTimestamp": "2026-01-02T03:04:05Z"},
        "spec": {"nodeName": NODE, "schedulerName": "tessera",
                 "containers": [{"name": "main", "resources": {"limits": {RESOURCE: "1"}}}]},
        "status": {"phase": "Pending"}
    }))
    .unwrap();
    PodInfo::from_pod(&pod)
}

fn signed(ring: &Keyring, name: &str, a: &Assignment) -> PodInfo {
    let uid = format!("uid-{name}");
    api_pod(name, &uid, a, Some(ring.sign(&uid, &a.node, &a.to_annotation())))
}

/// What one admission gave the container.
#[derive(Debug)]
struct Admitted {
    visible: Result<String, Status>,
    allocated_pod: Option<String>,
    kubelet_ids: Vec<String>,
}

impl Node {
    /// kubelet admits `pod`: adds it to its pod manager, asks for a preferred allocation, and
    /// allocates (taking the hint, or the first free ID when `ignore_hint`).
    async fn admit(&mut self, pod: &PodInfo, ignore_hint: bool) -> Admitted {
        self.kubelet.state.lock().unwrap().pods.push((
            pod.namespace.clone(),
            pod.name.clone(),
            vec![("main".into(), vec![])],
        ));
        let available: Vec<String> = self.advertised.iter().filter(|d| !self.used.contains(*d)).cloned().collect();
        let pref = self
            .client
            .get_preferred_allocation(PreferredAllocationRequest {
                container_requests: vec![ContainerPreferredAllocationRequest {
                    available_device_i_ds: available.clone(),
                    must_include_device_i_ds: vec![],
                    allocation_size: 1,
                }],
            })
            .await
            .unwrap()
            .into_inner();
        let ids =
            if ignore_hint { vec![available[0].clone()] } else { pref.container_responses[0].device_i_ds.clone() };
        assert_eq!(ids.len(), 1, "kubelet allocates what the pod asks for");
        let resp = self
            .client
            .allocate(AllocateRequest {
                container_requests: vec![ContainerAllocateRequest { devices_ids: ids.clone() }],
            })
            .await;
        match resp {
            Ok(r) => {
                let r = r.into_inner();
                // kubelet records the devices only now.
                self.used.extend(ids.iter().cloned());
                let mut st = self.kubelet.state.lock().unwrap();
                if let Some(p) = st.pods.iter_mut().find(|p| p.1 == pod.name) {
                    p.2[0].1 = ids.clone();
                }
                let c = &r.container_responses[0];
                Admitted {
                    visible: Ok(c.envs["NVIDIA_VISIBLE_DEVICES"].clone()),
                    allocated_pod: c.annotations.get(ALLOCATED_POD).cloned(),
                    kubelet_ids: ids,
                }
            }
            Err(status) => {
                // kubelet rejects the pod: it fails and leaves the pod manager's active pods.
                self.kubelet.state.lock().unwrap().pods.retain(|p| p.1 != pod.name);
                Admitted { visible: Err(status), allocated_pod: None, kubelet_ids: ids }
            }
        }
    }

    /// Binds `pods` at once (all in the API), then admits them in `order`; returns how many
    /// containers saw a device other than their own assignment.
    async fn round(&mut self, pods: &[(PodInfo, String)], order: &[usize], ignore_hint_every: usize) -> usize {
        let mut api = self.api_pods();
        api.extend(pods.iter().map(|(p, _)| p.clone()));
        self.set_api(api);
        let mut swaps = 0;
        for (n, &i) in order.iter().enumerate() {
            let (pod, want) = &pods[i];
            let got = self.admit(pod, ignore_hint_every > 0 && n % ignore_hint_every == 0).await;
            let visible = got.visible.unwrap_or_else(|s| panic!("pod {} refused: {}", pod.key(), s.message()));
            assert_eq!(got.allocated_pod.as_deref(), Some(pod.key().as_str()));
            if &visible != want {
                swaps += 1;
            }
            assert_eq!(got.kubelet_ids.len(), 1);
        }
        swaps
    }

    fn api_pods(&self) -> Vec<PodInfo> {
        self.current.clone()
    }

    fn set_api(&mut self, pods: Vec<PodInfo>) {
        self.api.set(pods.clone());
        self.current = pods;
    }

    /// Every pod finishes and is deleted.
    fn clear(&mut self) {
        self.set_api(vec![]);
        let mut st = self.kubelet.state.lock().unwrap();
        st.pods.clear();
        st.other.clear();
        self.used.clear();
    }

    fn refusals(&self) -> Vec<(String, String)> {
        self.events.seen()
    }

    fn metrics_text(&self) -> String {
        let _ = &self.metrics;
        metrics::encode(&self.registry)
    }
}

/// A deterministic permutation of 0..n (xorshift).
fn shuffled(n: usize, seed: u64) -> Vec<usize> {
    let mut v: Vec<usize> = (0..n).collect();
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for i in (1..n).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.swap(i, (x % (i as u64 + 1)) as usize);
    }
    v
}

fn assignment(devices: Vec<AssignedDevice>) -> Assignment {
    Assignment { node: NODE.into(), devices }
}

#[tokio::test]
async fn exact_handoff_with_2_4_and_8_pods_admitted_at_once() {
    let mut n = node(FakeGpus::new(MigProduct::H100_80GB, 8, false)).await;
    let (mut trials, mut pods_total, mut swaps) = (0, 0, 0);
    let started = Instant::now();
    for count in [2usize, 4, 8] {
        for trial in 0..10u64 {
            let gpus = shuffled(8, trial * 31 + count as u64);
            let pods: Vec<(PodInfo, String)> = (0..count)
                .map(|i| {
                    let d = whole(&n.fake, gpus[i] as u32);
                    let uuid = d.gpu.clone();
                    (signed(&n.ring, &format!("p{count}-{trial}-{i}"), &assignment(vec![d])), uuid)
                })
                .collect();
            // kubelet's admission order is unrelated to creation or binding order; every other
            // pod it ignores the plugin's hint.
            let order = shuffled(count, trial + 1000);
            swaps += n.round(&pods, &order, 2).await;
            trials += 1;
            pods_total += count;
            n.clear();
        }
    }
    let per_pod = started.elapsed().as_secs_f64() * 1000.0 / pods_total as f64;
    println!("handoff: {trials} rounds, {pods_total} pods admitted, {swaps} swaps, {per_pod:.2} ms per admission");
    assert_eq!(swaps, 0);
    assert!(n.refusals().is_empty(), "{:?}", n.refusals());
    assert!(n.metrics_text().contains(&format!("tessera_node_allocations_total{{result=\"ok\"}} {pods_total}")));
}

#[tokio::test]
async fn multi_gpu_mig_and_share_pods_each_get_their_own_devices() {
    // Multi-GPU: TP-4 and two TP-2 pods at once, on one 8-GPU node.
    let mut n = node(FakeGpus::new(MigProduct::H100_80GB, 8, false)).await;
    let set = |n: &Node, idx: &[u32]| idx.iter().map(|&i| whole(&n.fake, i)).collect::<Vec<_>>();
    let multi: Vec<(PodInfo, String)> = [("tp4", vec![4, 5, 6, 7]), ("tp2-a", vec![2, 0]), ("tp2-b", vec![3, 1])]
        .into_iter()
        .map(|(name, idx)| {
            let devices = set(&n, &idx);
            let want = devices.iter().map(|d| d.gpu.clone()).collect::<Vec<_>>().join(",");
            (signed(&n.ring, name, &assignment(devices)), want)
        })
        .collect();
    assert_eq!(n.round(&multi, &[2, 0, 1], 0).await, 0);
    n.clear();

    // Shares: seven pods on two GPUs and a whole GPU, at once; kubelet has ten slots per GPU.
    let mut shares = Vec::new();
    for (i, gpu) in [0u32, 0, 0, 0, 1, 1, 1].into_iter().enumerate() {
        let mut d = whole(&n.fake, gpu);
        d.share = Some(250);
        let want = d.gpu.clone();
        shares.push((signed(&n.ring, &format!("share-{i}"), &assignment(vec![d])), want));
    }
    let d = whole(&n.fake, 2);
    let want = d.gpu.clone();
    shares.push((signed(&n.ring, "whole-2", &assignment(vec![d])), want));
    assert_eq!(n.round(&shares, &shuffled(8, 7), 0).await, 0);
    // With the hint taken, kubelet's own accounting names a slot of the right GPU.
    let gpu0 = n.fake.devices().unwrap()[0].uuid.clone();
    let on_gpu0 = n.used.iter().filter(|id| id.starts_with(&gpu0)).count();
    assert_eq!(on_gpu0, 4, "{:?}", n.used);
    n.clear();

    // MIG: seven 1g.10gb instances on GPU 0 and a 7g.80gb on GPU 1, eight pods at once.
    let fake = FakeGpus::new(MigProduct::H100_80GB, 2, true)
        .with_mig(0, &["1g.10gb"; 7])
        .unwrap()
        .with_mig(1, &["7g.80gb"])
        .unwrap();
    let mut m = node(fake).await;
    let mut migs = Vec::new();
    for (gpu, mig) in [(0u32, m.fake.mig_devices(0).unwrap()), (1, m.fake.mig_devices(1).unwrap())] {
        for (i, dev) in mig.iter().enumerate() {
            let d = AssignedDevice {
                gpu: m.fake.devices().unwrap()[gpu as usize].uuid.clone(),
                index: gpu,
                profile: Some(MigProduct::H100_80GB.geometry().profile(dev.instance.class).unwrap().name.to_owned()),
                start: Some(dev.instance.start),
                // Half by MIG UUID, half by profile and start only (as a bind before the
                // instance existed writes it).
                mig: (i % 2 == 0).then(|| dev.uuid.clone()),
                share: None,
            };
            migs.push((signed(&m.ring, &format!("mig-{gpu}-{i}"), &assignment(vec![d])), dev.uuid.clone()));
        }
    }
    assert_eq!(migs.len(), 8);
    assert_eq!(m.round(&migs, &shuffled(8, 3), 3).await, 0);
}

#[tokio::test]
async fn unsigned_forged_replayed_foreign_and_double_booked_assignments_are_refused() {
    let mut n = node(FakeGpus::new(MigProduct::H100_80GB, 8, false)).await;
    let ring = Keyring::parse(KEYS).unwrap();
    let a0 = assignment(vec![whole(&n.fake, 0)]);

    // A pod created with spec.nodeName and a hand-written annotation.
    let unsigned = api_pod("unsigned", "uid-unsigned", &a0, None);
    // Signed with a key of the same ID that the node does not have.
    let attacker = Keyring::parse("k1 YW4tYXR0YWNrZXJzLW93bi1rZXktMzItYnl0ZXMhIQ==").unwrap();
    let forged = api_pod("forged", "uid-forged", &a0, Some(attacker.sign("uid-forged", NODE, &a0.to_annotation())));
    // The annotation and signature of a deleted pod, copied onto a new pod of the same name.
    let replayed = api_pod("model-0", "uid-new", &a0, Some(ring.sign("uid-old", NODE, &a0.to_annotation())));
    // A valid assignment for another node.
    let other = Assignment { node: "gpu-node-2".into(), devices: a0.devices.clone() };
    let foreign =
        api_pod("foreign", "uid-foreign", &other, Some(ring.sign("uid-foreign", "gpu-node-2", &other.to_annotation())));

    for (pod, reason) in
        [(&unsigned, "Unsigned"), (&forged, "Forged"), (&replayed, "Replayed"), (&foreign, "ForeignNode")]
    {
        n.set_api(vec![pod.clone()]);
        let got = n.admit(pod, false).await;
        let status = got.visible.expect_err(reason);
        assert_eq!(status.code(), tonic::Code::PermissionDenied, "{reason}: {}", status.message());
        assert!(status.message().contains(reason), "{}", status.message());
        assert!(!status.message().contains("Refusal"), "no debug dump: {}", status.message());
        n.clear();
    }

    // A signed pod runs on GPU 0; a second signed assignment naming GPU 0 is refused, and so is
    // one naming GPU 3, which NVIDIA's plugin gave a pod.
    let holder = signed(&ring, "holder", &a0);
    n.round(&[(holder.clone(), a0.devices[0].gpu.clone())], &[0], 0).await;
    let twice = signed(&ring, "twice", &a0);
    let gpu3 = whole(&n.fake, 3).gpu;
    n.kubelet.state.lock().unwrap().other.push(("ml".into(), "cuda-job".into(), "nvidia.com/gpu".into(), vec![gpu3]));
    let on3 = signed(&ring, "on-nvidia-gpu", &assignment(vec![whole(&n.fake, 3)]));
    for (pod, reason) in [(&twice, "DeviceHeld"), (&on3, "DeviceHeld")] {
        let mut api = n.api_pods();
        api.push(pod.clone());
        n.set_api(api);
        let status = n.admit(pod, false).await.visible.expect_err(reason);
        assert!(status.message().contains(reason), "{}", status.message());
        let api: Vec<PodInfo> = n.api_pods().into_iter().filter(|p| p.uid != pod.uid).collect();
        n.set_api(api);
    }
    // A legitimate pod right after is served.
    let ok = signed(&ring, "after", &assignment(vec![whole(&n.fake, 5)]));
    assert_eq!(n.round(&[(ok, whole(&n.fake, 5).gpu)], &[0], 0).await, 0);

    let seen: Vec<(String, String)> = n.refusals();
    let want: Vec<(String, String)> = [
        ("ml/unsigned", "Unsigned"),
        ("ml/forged", "Forged"),
        ("ml/model-0", "Replayed"),
        ("ml/foreign", "ForeignNode"),
        ("ml/twice", "DeviceHeld"),
        ("ml/on-nvidia-gpu", "DeviceHeld"),
    ]
    .into_iter()
    .map(|(a, b)| (a.to_owned(), b.to_owned()))
    .collect();
    assert_eq!(seen, want);
    let text = n.metrics_text();
    for (reason, count) in [("Unsigned", 1), ("Forged", 1), ("Replayed", 1), ("ForeignNode", 1), ("DeviceHeld", 2)] {
        let line = format!("tessera_node_assignment_refusals_total{{reason=\"{reason}\"}} {count}");
        assert!(text.contains(&line), "{line} missing in\n{text}");
    }
}

#[tokio::test]
async fn the_agent_publishes_what_kubelets_pod_resources_reports_every_container_holds() {
    use tessera_mig_manager::agent::{Agent, Parts};
    use tessera_mig_manager::gpu::Observed;
    use tessera_mig_manager::status::LocalNodeApi;

    let mut n = node(FakeGpus::new(MigProduct::H100_80GB, 4, false)).await;
    let tessera_pod = signed(&n.ring, "served", &assignment(vec![whole(&n.fake, 1)]));
    assert_eq!(n.round(&[(tessera_pod, whole(&n.fake, 1).gpu)], &[0], 0).await, 0);
    let gpu3 = whole(&n.fake, 3).gpu;
    n.kubelet.state.lock().unwrap().other.push((
        "ml".into(),
        "cuda-job".into(),
        "nvidia.com/gpu".into(),
        vec![format!("{gpu3}::2")],
    ));
    let (_, m) = metrics::registry();
    let (tx, _) = tokio::sync::watch::channel(Observed::default());
    let mut agent = Agent::new(Parts {
        node: NODE.into(),
        backend: n.fake.clone(),
        node_api: Arc::new(LocalNodeApi::new(None)),
        pods: n.api.clone(),
        allocations: n.allocations.clone(),
        inventory: tx,
        registered: None,
        metrics: Arc::new(m),
        kubelet: Some(Arc::new(KubeletSocket::new(&n.pr_socket))),
    });
    let status = agent.pass().await;
    let held: Vec<(&str, &str, &str)> =
        status.held.iter().map(|h| (h.pod.as_str(), h.resource.as_str(), h.uuid.as_str())).collect();
    let gpu1 = whole(&n.fake, 1).gpu;
    assert_eq!(
        held,
        [("ml/served", RESOURCE, gpu1.as_str()), ("ml/cuda-job", "nvidia.com/gpu", gpu3.as_str())],
        "tessera's pod with the device it was served, NVIDIA's time-sliced replica as its GPU"
    );
}
