//! A fake kubelet on a temp unix socket: Register → ListAndWatch → Allocate, and
//! re-registration when kubelet's socket is recreated.

use std::sync::Arc;
use std::time::Duration;

use tessera_api::Assignment;
use tessera_core::mig::MigProduct;
use tokio::net::UnixListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::{Request, Response, Status};

use super::server::{PluginConfig, connect_unix, run};
use super::v1beta1::device_plugin_client::DevicePluginClient;
use super::v1beta1::registration_server::{Registration, RegistrationServer};
use super::v1beta1::{
    AllocateRequest, ContainerAllocateRequest, ContainerPreferredAllocationRequest, Empty, PreferredAllocationRequest,
    RegisterRequest,
};
use super::*;
use crate::gpu::fake::FakeGpus;
use crate::gpu::{GpuBackend, observe};
use crate::pods::StaticPods;
use crate::pods::tests::{mig_device, pod};

#[derive(Debug)]
struct FakeKubelet {
    seen: mpsc::UnboundedSender<RegisterRequest>,
}

#[tonic::async_trait]
impl Registration for FakeKubelet {
    async fn register(&self, request: Request<RegisterRequest>) -> Result<Response<Empty>, Status> {
        let _ = self.seen.send(request.into_inner());
        Ok(Response::new(Empty {}))
    }
}

fn start_kubelet(dir: &std::path::Path) -> (JoinHandle<()>, mpsc::UnboundedReceiver<RegisterRequest>) {
    let path = dir.join(KUBELET_SOCKET);
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(RegistrationServer::new(FakeKubelet { seen: tx }))
            .serve_with_incoming(UnixListenerStream::new(listener))
            .await;
    });
    (task, rx)
}

async fn recv<T>(rx: &mut mpsc::UnboundedReceiver<T>) -> T {
    tokio::time::timeout(Duration::from_secs(10), rx.recv()).await.expect("timed out").expect("channel closed")
}

struct Rig {
    dir: tempfile::TempDir,
    fake: Arc<FakeGpus>,
    inventory: watch::Sender<Observed>,
    pods: Arc<StaticPods>,
    allocations: Arc<Allocations>,
    registered: watch::Receiver<bool>,
    plugin_task: JoinHandle<crate::Result<()>>,
}

fn rig() -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let fake = Arc::new(FakeGpus::new(MigProduct::H100_80GB, 2, true).with_mig(0, &["3g.40gb", "3g.40gb"]).unwrap());
    let (inventory, rx) = watch::channel(observe(fake.as_ref()).unwrap());
    let pods = Arc::new(StaticPods::default());
    let allocations = Arc::new(Allocations::default());
    let plugin = Plugin::new("n1", rx, pods.clone(), allocations.clone(), None);
    let cfg = PluginConfig {
        dir: dir.path().to_path_buf(),
        socket_name: SOCKET_NAME.into(),
        resource: "tessera.dev/gpu".into(),
        poll: Duration::from_millis(50),
    };
    let (reg_tx, registered) = watch::channel(false);
    let plugin_task = tokio::spawn(run(cfg, plugin, reg_tx));
    Rig { dir, fake, inventory, pods, allocations, registered, plugin_task }
}

async fn plugin_client(dir: &std::path::Path, endpoint: &str) -> DevicePluginClient<tonic::transport::Channel> {
    DevicePluginClient::new(connect_unix(&dir.join(endpoint)).await.unwrap())
}

#[tokio::test]
async fn fake_kubelet_registers_lists_and_allocates_the_assigned_device() {
    let r = rig();
    let (_kubelet, mut seen) = start_kubelet(r.dir.path());
    let req = recv(&mut seen).await;
    assert_eq!(req.version, "v1beta1");
    assert_eq!(req.resource_name, "tessera.dev/gpu");
    assert_eq!(req.endpoint, SOCKET_NAME);
    assert!(req.options.unwrap().get_preferred_allocation_available);

    let mut client = plugin_client(r.dir.path(), &req.endpoint).await;
    let opts = client.get_device_plugin_options(Empty {}).await.unwrap().into_inner();
    assert!(opts.get_preferred_allocation_available && !opts.pre_start_required);

    let mut stream = client.list_and_watch(Empty {}).await.unwrap().into_inner();
    let first = stream.message().await.unwrap().unwrap();
    let mig = r.fake.mig_devices(0).unwrap();
    let ids: Vec<&str> = first.devices.iter().map(|d| d.id.as_str()).collect();
    assert_eq!(ids, [mig[0].uuid.as_str(), mig[1].uuid.as_str()], "GPU 1 is in MIG mode with no instances");
    assert!(first.devices.iter().all(|d| d.health == HEALTHY));

    // The scheduler assigned the second 3g.40gb (by profile and start, MIG UUID left null).
    let gpu0 = r.fake.devices().unwrap()[0].uuid.clone();
    let a = Assignment { node: "n1".into(), devices: vec![mig_device(&gpu0, 0, "3g.40gb", 4, None)] };
    r.pods.set(vec![pod("embed-0", 100, a)]);

    let pref = client
        .get_preferred_allocation(PreferredAllocationRequest {
            container_requests: vec![ContainerPreferredAllocationRequest {
                available_device_i_ds: ids.iter().map(|s| s.to_string()).collect(),
                must_include_device_i_ds: vec![],
                allocation_size: 1,
            }],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(pref.container_responses[0].device_i_ds, [mig[1].uuid.clone()]);

    // kubelet ignores the hint and picks the first device; the plugin still returns the assigned one.
    let resp = client
        .allocate(AllocateRequest {
            container_requests: vec![ContainerAllocateRequest { devices_ids: vec![mig[0].uuid.clone()] }],
        })
        .await
        .unwrap()
        .into_inner();
    let envs = &resp.container_responses[0].envs;
    assert_eq!(envs["NVIDIA_VISIBLE_DEVICES"], mig[1].uuid);
    assert_eq!(envs["CUDA_VISIBLE_DEVICES"], mig[1].uuid);
    assert!(r.allocations.held().contains(&mig[1].uuid));

    // The pod is allocated now: a second Allocate finds nothing and says so.
    let err = client
        .allocate(AllocateRequest {
            container_requests: vec![ContainerAllocateRequest { devices_ids: vec![mig[0].uuid.clone()] }],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert!(err.message().contains("tessera.dev/assignment"), "{}", err.message());

    // A new MIG device appears: ListAndWatch sends the full list again.
    r.fake
        .apply(&tessera_core::MigOp::Create { gpu: 1, class: tessera_core::mig::ProfileClass::G7, start: 0 })
        .unwrap();
    r.inventory.send_replace(observe(r.fake.as_ref()).unwrap());
    let second = tokio::time::timeout(Duration::from_secs(5), stream.message()).await.unwrap().unwrap().unwrap();
    assert_eq!(second.devices.len(), 3);
    r.plugin_task.abort();
}

#[tokio::test]
async fn allocate_for_another_nodes_assignment_is_refused() {
    let r = rig();
    let (_kubelet, mut seen) = start_kubelet(r.dir.path());
    let req = recv(&mut seen).await;
    let mut client = plugin_client(r.dir.path(), &req.endpoint).await;
    let mut other = pod(
        "other-node",
        1,
        Assignment { node: "n2".into(), devices: vec![mig_device("GPU-x", 0, "3g.40gb", 0, None)] },
    );
    other.uid = "u2".into();
    r.pods.set(vec![other]);
    let err = client
        .allocate(AllocateRequest {
            container_requests: vec![ContainerAllocateRequest { devices_ids: vec!["MIG-1".into()] }],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    assert!(err.message().contains("signed for node n2") && err.message().contains("ForeignNode"), "{}", err.message());
    r.plugin_task.abort();
}

#[tokio::test]
async fn plugin_registers_again_when_kubelet_restarts() {
    let mut r = rig();
    let (kubelet, mut seen) = start_kubelet(r.dir.path());
    recv(&mut seen).await;
    tokio::time::timeout(Duration::from_secs(5), r.registered.wait_for(|v| *v)).await.unwrap().unwrap();
    // kubelet restarts: its socket is removed and created anew, and it wipes our socket too.
    kubelet.abort();
    let _ = std::fs::remove_file(r.dir.path().join(SOCKET_NAME));
    let (_kubelet2, mut seen2) = start_kubelet(r.dir.path());
    let again = recv(&mut seen2).await;
    assert_eq!(again.endpoint, SOCKET_NAME);
    assert!(r.dir.path().join(SOCKET_NAME).exists(), "socket recreated");
    let mut client = plugin_client(r.dir.path(), SOCKET_NAME).await;
    assert!(client.get_device_plugin_options(Empty {}).await.is_ok());
    r.plugin_task.abort();
}
