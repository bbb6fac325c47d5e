//! The bind verb: the gang barrier, the exact devices, MIG instances, then the Binding.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tessera_api::Assignment;
use tessera_api::annotations;
use tessera_api::gpunode::{GpuSpec, MigInstanceSpec, Mode};
use tessera_core::policy::{self};
use tessera_core::{Context, Demand, GpuMode, MigOp, NodeName, Placement, PodKey};

use crate::binder::{BindRequest, WantedInstance};
use crate::error::Error;
use crate::wire::{ExtenderBindingArgs, ExtenderBindingResult};

use crate::assume::Assumed;
use crate::gangs::Barrier;
use crate::state::{Inner, Scheduler};

/// A bind in progress: retries of the same pod's bind wait for it instead of starting another.
#[derive(Clone, Debug)]
pub(crate) struct Inflight {
    pub(crate) node: String,
    /// What the bind waits for now, for the answer given when the reply budget runs out.
    pub(crate) stage: Arc<Mutex<String>>,
    pub(crate) done: tokio::sync::watch::Receiver<Option<Result<(), (&'static str, String)>>>,
}

impl Scheduler {
    /// The bind verb. It answers within [`crate::settings::Settings::reply_budget`]: the work runs in its own
    /// task, which goes on when the answer is due (a gang waiting for its members, a node
    /// creating a MIG instance); then the answer is an error, the devices stay reserved, and
    /// kube-scheduler's retry of the same pod on the same node joins the bind in progress
    /// instead of starting a second one. A retry after the bind finished is answered from
    /// its outcome.
    pub async fn bind(self: &Arc<Self>, args: ExtenderBindingArgs) -> ExtenderBindingResult {
        let budget = self.settings.reply_budget();
        match self.bind_within(args.clone(), budget).await {
            Ok(()) => {
                self.metrics.decision("bind", "bound");
                ExtenderBindingResult::default()
            }
            Err(e) => {
                self.metrics.decision("bind", e.kind());
                tracing::warn!(error = %e.chain(), pod = %args.pod_name, node = %args.node, "Bind failed");
                ExtenderBindingResult { error: e.chain() }
            }
        }
    }

    pub(crate) async fn bind_within(
        self: &Arc<Self>,
        args: ExtenderBindingArgs,
        budget: Duration,
    ) -> Result<(), Error> {
        for (field, v) in [("PodName", &args.pod_name), ("PodNamespace", &args.pod_namespace), ("Node", &args.node)] {
            if v.is_empty() {
                return Err(Error::BadRequest(format!("ExtenderBindingArgs.{field} is empty")));
            }
        }
        if !self.is_leader() {
            return Err(Error::NotLeader);
        }
        let key = PodKey::new(&args.pod_namespace, &args.pod_name);
        let flight = {
            let mut inner = self.lock();
            match inner.inflight.get(&key) {
                Some(f) if f.node == args.node => f.clone(),
                Some(f) => {
                    return Err(Error::Binding {
                        pod: key,
                        node: f.node.clone(),
                        why: format!("a bind to {} waits until it ends", args.node),
                    });
                }
                None => {
                    if inner.bound_here.get(&key).is_some_and(|(n, _)| *n == args.node) {
                        // Bound by an earlier request whose answer kube-scheduler did not get.
                        return Ok(());
                    }
                    let (tx, rx) = tokio::sync::watch::channel(None);
                    let stage = Arc::new(Mutex::new("starting".to_owned()));
                    let f = Inflight { node: args.node.clone(), stage: stage.clone(), done: rx };
                    inner.inflight.insert(key.clone(), f.clone());
                    drop(inner);
                    let me = self.clone();
                    let k = key.clone();
                    tokio::spawn(async move {
                        let result = me.try_bind(&args, &stage).await.map_err(|e| (e.kind(), e.chain()));
                        let mut inner = me.lock();
                        inner.inflight.remove(&k);
                        if result.is_ok() {
                            let now = me.now_ms();
                            inner.bound_here.insert(k, (args.node.clone(), now));
                        }
                        drop(inner);
                        tx.send_replace(Some(result));
                    });
                    f
                }
            }
        };
        let mut rx = flight.done.clone();
        match tokio::time::timeout(budget, rx.wait_for(Option::is_some)).await {
            Ok(Ok(r)) => match &*r {
                Some(Ok(())) => Ok(()),
                Some(Err((kind, message))) => Err(Error::Relayed { kind, message: message.clone() }),
                None => Err(Error::Relayed { kind: "internal", message: "the bind ended without an outcome".into() }),
            },
            Ok(Err(_)) => {
                Err(Error::Relayed { kind: "internal", message: "the bind task ended without an outcome".into() })
            }
            Err(_) => {
                let stage = flight.stage.lock().map(|s| s.clone()).unwrap_or_default();
                Err(Error::Binding {
                    pod: key,
                    node: flight.node,
                    why: format!(
                        "it is {stage}, longer than the {budget:?} kube-scheduler's httpTimeout leaves; the devices stay reserved and a retry of this bind joins it"
                    ),
                })
            }
        }
    }

    pub(crate) async fn try_bind(&self, args: &ExtenderBindingArgs, stage: &Mutex<String>) -> Result<(), Error> {
        let key = PodKey::new(&args.pod_namespace, &args.pod_name);
        let node = NodeName(args.node.clone());
        let set_stage = |s: String| {
            if let Ok(mut st) = stage.lock() {
                *st = s;
            }
        };
        if let Some(g) = self.lock().gang_of(&key) {
            set_stage(format!("waiting for every member of gang {g} to reach bind"));
        }
        let gang = self.hold_for_gang(&key).await?;
        let prepared = match self.reserve(&key, &node, &args.pod_uid) {
            Ok(p) => p,
            Err(e) => {
                if let Some(g) = &gang {
                    self.lock().fail_gang(g, &e.chain());
                }
                return Err(e);
            }
        };
        set_stage(if prepared.gpus.is_empty() {
            "binding".to_owned()
        } else {
            format!("waiting for node {node} to create its MIG instances")
        });
        match self.effect(args, &key, &prepared).await {
            Ok(mig_uuids) => {
                let mut inner = self.lock();
                for ((gpu, start), uuid) in mig_uuids {
                    inner.mig_uuids.insert((node.clone(), gpu, start), uuid);
                }
                Arc::make_mut(&mut inner.snap).confirm(&key)?;
                inner.generation += 1;
                if self.settings.mode == "demo" {
                    // No informer will ever report the pod: the bind is the last word.
                    inner.cache.remove(&key);
                }
                if let Some(g) = &gang {
                    // Bound: its reservation annotation has served.
                    inner.outbox.clear(key.clone());
                    // Every planned member bound: the gang is done.
                    let done = inner.gangs.get(g).is_some_and(|st| st.all_bound(&inner.snap));
                    if done {
                        inner.gangs.remove(g);
                    }
                }
                self.metrics.reservations.set(inner.cache.len() as i64);
                drop(inner);
                if gang.is_some() {
                    self.writes_ready();
                }
                Ok(())
            }
            Err(e) if e.api().is_some_and(tessera_api::kube_error::is_conflict) => {
                // The API server already has a binding for the pod: an earlier bind of ours won,
                // or someone else bound it. Either way the pod may hold these devices now, so
                // they are never released here; the informer settles which (an assumed pod the
                // rebuild shows elsewhere is dropped then).
                let (ns, name) = (&args.pod_namespace, &args.pod_name);
                let bound_to = self.lookup.pod(ns, name).and_then(|p| p.spec.and_then(|s| s.node_name));
                let mut inner = self.lock();
                let _ = Arc::make_mut(&mut inner.snap).confirm(&key);
                inner.generation += 1;
                if gang.is_some() {
                    inner.outbox.clear(key.clone());
                }
                drop(inner);
                match bound_to {
                    Some(n) if n == args.node => {
                        tracing::info!(pod = %key, node = %n, "The pod is bound already (an earlier bind won); keeping its devices");
                        Ok(())
                    }
                    _ => Err(e),
                }
            }
            Err(e) => {
                let mut inner = self.lock();
                // Out of the assume cache first: dropping the gang's plan lays the state over
                // the last rebuild again, which must not bring this pod back.
                inner.cache.remove(&key);
                if Arc::make_mut(&mut inner.snap).release(&key).is_ok() {
                    inner.generation += 1;
                }
                if let Some(g) = &gang {
                    inner.fail_gang(g, &e.chain());
                }
                self.metrics.reservations.set(inner.cache.len() as i64);
                drop(inner);
                if gang.is_some() {
                    self.writes_ready();
                }
                Err(e)
            }
        }
    }

    /// Holds a planned gang member's bind until every planned member has reached bind (or the
    /// plan's deadline passes, which fails them all). Returns the gang's name for members.
    pub(crate) async fn hold_for_gang(&self, key: &PodKey) -> Result<Option<String>, Error> {
        let (name, mut rx, deadline_ms) = {
            let mut inner = self.lock();
            let Some(name) = inner.gang_of(key) else { return Ok(None) };
            let Some(arrival) = inner.gangs.get_mut(&name).and_then(|st| st.arrive(key)) else { return Ok(None) };
            if arrival.opened {
                tracing::info!(gang = %name, "Every gang member reached bind; binding all");
            }
            (name, arrival.barrier, arrival.deadline_ms)
        };
        let deadline = self.origin + Duration::from_millis(deadline_ms);
        let outcome = tokio::time::timeout_at(deadline, rx.wait_for(|b| *b != Barrier::Waiting)).await;
        match outcome {
            Ok(Ok(b)) => match &*b {
                Barrier::Failed(why) => Err(Error::Gang { gang: name, why: why.clone() }),
                _ => Ok(Some(name)),
            },
            Ok(Err(_)) => Err(Error::Gang { gang: name, why: "the plan was dropped".into() }),
            Err(_) => {
                let why = "the reservation deadline passed before every member reached bind";
                let now = self.now_ms();
                let mut inner = self.lock();
                inner.refuse_unarrived(&name, now);
                inner.fail_gang(&name, why);
                Err(Error::Gang { gang: name, why: why.into() })
            }
        }
    }

    /// Reserves the exact devices for the pod on `node` in the snapshot (so it counts at once)
    /// and returns what must happen on the cluster.
    pub(crate) fn reserve(&self, key: &PodKey, node: &NodeName, uid: &str) -> Result<Prepared, Error> {
        let looked_up = match self.lock().seen.get(key).map(|s| s.demand.clone()) {
            Some(Ok(d)) => Some(d),
            Some(Err(msg)) => return Err(Error::Unplaceable { pod: key.clone(), reason: msg }),
            None => None,
        };
        let demand = match looked_up {
            Some(d) => d,
            None => {
                let (ns, name) = key.0.split_once('/').unwrap_or(("default", &key.0));
                let pod = self.lookup.pod(ns, name).ok_or_else(|| Error::UnknownPod(key.clone()))?;
                self.demand_of(&pod).map_err(|e| Error::Unplaceable { pod: key.clone(), reason: e.to_string() })?
            }
        };
        let mut inner = self.lock();
        if !uid.is_empty() {
            inner.uids.insert(uid.to_owned(), key.clone());
        }
        let placement = match inner.snap.allocation(key).cloned() {
            Some(a) if a.node == *node => {
                Placement { node: node.clone(), grants: a.grants, ops: Vec::new(), score: 0.0 }
            }
            Some(a) => {
                // kube-scheduler chose another node than the one held for the pod: move it.
                Arc::make_mut(&mut inner.snap).release(key)?;
                inner.cache.remove(key);
                inner.generation += 1;
                tracing::info!(pod = %key, from = %a.node, to = %node, "Moving held devices to the bound node");
                self.place_on(&inner, &demand, node)?
            }
            None => self.place_on(&inner, &demand, node)?,
        };
        if inner.snap.allocation(key).is_none() {
            // Assumed, not lapsing: the bind itself releases it if anything fails.
            placement.apply(Arc::make_mut(&mut inner.snap), &demand, None)?;
            inner.generation += 1;
        }
        let at_ms = self.now_ms();
        inner.cache.insert(key.clone(), Assumed { placement: placement.clone(), demand: demand.clone(), at_ms });
        self.metrics.reservations.set(inner.cache.len() as i64);
        let n = inner.snap.node(node).ok_or_else(|| Error::Core(tessera_core::Error::UnknownNode(node.clone())))?;
        let mut wanted = Vec::new();
        let mut changed: Vec<u32> = Vec::new();
        for op in &placement.ops {
            let gpu = match *op {
                MigOp::SetMode { gpu, .. } | MigOp::Destroy { gpu, .. } => gpu,
                MigOp::Create { gpu, class, start } => {
                    let profile = n
                        .gpu(gpu)
                        .and_then(|g| g.mig_product())
                        .and_then(|p| p.geometry().profile(class))
                        .map_or_else(|| format!("{class:?}"), |p| p.name.to_owned());
                    wanted.push(WantedInstance { gpu, profile, start });
                    gpu
                }
            };
            if !changed.contains(&gpu) {
                changed.push(gpu);
            }
        }
        let gpus = changed.iter().filter_map(|&i| n.gpu(i)).map(gpu_spec).collect();
        let assignment = Assignment::of(&inner.snap, &placement, |gpu, start| {
            inner.mig_uuids.get(&(node.clone(), gpu, start)).cloned()
        });
        Ok(Prepared { gpus, wanted, assignment, ops: placement.ops.len() })
    }

    /// The lock that orders `GpuNode.spec` writes to one node.
    pub(crate) fn node_lock(&self, node: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.spec_locks.lock().unwrap_or_else(|e| e.into_inner());
        locks.entry(node.to_owned()).or_default().clone()
    }

    /// The desired spec of the GPUs in `changed`, from the state as it is now (the bind's own
    /// reservation and those of binds on the same GPUs included).
    pub(crate) fn fresh_specs(&self, node: &str, changed: &[GpuSpec]) -> Vec<GpuSpec> {
        let inner = self.lock();
        let Some(n) = inner.snap.node(&NodeName(node.to_owned())) else { return changed.to_vec() };
        changed.iter().map(|g| n.gpu(g.index).map_or_else(|| g.clone(), gpu_spec)).collect()
    }

    pub(crate) fn place_on(&self, inner: &Inner, demand: &Demand, node: &NodeName) -> Result<Placement, Error> {
        let ctx = Context { workload: &inner.workload, seed: self.settings.seed };
        let verdicts =
            policy::evaluate(&inner.snap, demand, self.policy.as_ref(), &ctx, Some(std::slice::from_ref(node)))?;
        match verdicts.into_iter().next().map(|v| v.outcome) {
            Some(Ok((c, s))) => {
                Ok(Placement { node: node.clone(), grants: c.grants.into_vec(), ops: c.ops, score: s.node })
            }
            Some(Err(r)) => Err(Error::Unplaceable { pod: demand.pod.clone(), reason: r.to_string() }),
            None => Err(Error::Unplaceable { pod: demand.pod.clone(), reason: format!("node {node} not evaluated") }),
        }
    }

    /// The cluster side of a bind: new MIG instances first, then the Binding.
    pub(crate) async fn effect(
        &self,
        args: &ExtenderBindingArgs,
        key: &PodKey,
        prepared: &Prepared,
    ) -> Result<BTreeMap<(u32, u8), String>, Error> {
        let mut assignment = prepared.assignment.clone();
        let mut uuids = BTreeMap::new();
        // New instances, or a GPU switching mode (an idle MIG GPU handed out whole).
        if !prepared.gpus.is_empty() {
            self.metrics.mig_reconfig_requests_total.inc();
            let gpus = {
                // One spec write per node at a time, each from the state as it is now: a
                // concurrent bind's instances on the same GPU are in it (its reservation is),
                // so no write drops another's instance.
                let lock = self.node_lock(&args.node);
                let _held = lock.lock().await;
                let gpus = self.fresh_specs(&args.node, &prepared.gpus);
                self.binder.write_spec(&args.node, &gpus).await?;
                gpus
            };
            uuids = self.binder.await_status(&args.node, &gpus, &prepared.wanted, self.settings.mig_timeout).await?;
            self.lock().reconfigs_done += prepared.ops as u64;
            for d in &mut assignment.devices {
                if let Some(s) = d.start
                    && d.mig.is_none()
                {
                    d.mig = uuids.get(&(d.index, s)).cloned().filter(|u| !u.is_empty());
                }
            }
        }
        let text = assignment.to_annotation();
        let mut ann = BTreeMap::from([(annotations::ASSIGNMENT.to_owned(), text.clone())]);
        if let Some(keys) = &self.settings.assignment_keys {
            if args.pod_uid.is_empty() {
                return Err(Error::BadRequest(format!(
                    "pod {key}: the binding has no pod UID to sign the assignment for"
                )));
            }
            let ring =
                keys.current().map_err(|e| Error::BadRequest(format!("signing the assignment of {key}: {e}")))?;
            ann.insert(annotations::ASSIGNMENT_SIGNATURE.to_owned(), ring.sign(&args.pod_uid, &args.node, &text));
        }
        let req = BindRequest {
            namespace: args.pod_namespace.clone(),
            name: args.pod_name.clone(),
            uid: args.pod_uid.clone(),
            node: args.node.clone(),
            annotations: ann,
        };
        tracing::debug!(pod = %key, node = %args.node, "Binding");
        self.binder.bind(&req).await?;
        Ok(uuids)
    }
}

/// What a bind must do on the cluster.
#[derive(Debug)]
pub(crate) struct Prepared {
    pub(crate) gpus: Vec<GpuSpec>,
    pub(crate) wanted: Vec<WantedInstance>,
    pub(crate) assignment: Assignment,
    /// MIG operations the placement needs (counted as reconfigurations once applied).
    pub(crate) ops: usize,
}

/// The desired `GpuNode.spec` entry of a GPU as the snapshot has it.
pub fn gpu_spec(g: &tessera_core::Gpu) -> GpuSpec {
    match g.mig_layout() {
        Some(l) if g.mode() == GpuMode::Mig => GpuSpec {
            index: g.index,
            mode: Mode::Mig,
            instances: l
                .instances()
                .iter()
                .filter_map(|i| {
                    l.geometry()
                        .profile(i.class)
                        .map(|p| MigInstanceSpec { profile: p.name.to_owned(), start: i.start })
                })
                .collect(),
        },
        _ => GpuSpec { index: g.index, mode: Mode::Full, instances: Vec::new() },
    }
}
