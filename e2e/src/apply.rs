//! `kubectl apply` of YAML files through the API: every document, server-side apply, with the
//! API server's `Warning` headers kept (a CRD with an unknown `format` warns on 1.36).

use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};
use kube::Client;
use kube::api::{ApiResource, GroupVersionKind, Patch, PatchParams};
use kube::core::Request;
use kube::discovery::{Scope, pinned_kind};
use serde_json::Value;

/// Every non-empty document of a YAML stream, as JSON.
pub fn documents(yaml: &str) -> Result<Vec<Value>> {
    let mut out = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(yaml) {
        let v: Value = serde::Deserialize::deserialize(doc).context("parsing YAML")?;
        if !v.is_null() {
            out.push(v);
        }
    }
    Ok(out)
}

/// What one apply did.
#[derive(Debug, Clone)]
pub struct Applied {
    pub kind: String,
    pub namespace: Option<String>,
    pub name: String,
    /// `Warning` headers of the answer.
    pub warnings: Vec<String>,
}

/// Applies one object (server-side apply, field manager `tessera-e2e`, forced).
pub async fn apply(client: &Client, obj: &Value) -> Result<Applied> {
    let api_version = obj["apiVersion"].as_str().ok_or_else(|| anyhow!("object without apiVersion: {obj}"))?;
    let kind = obj["kind"].as_str().ok_or_else(|| anyhow!("object without kind: {obj}"))?;
    let name = obj["metadata"]["name"].as_str().ok_or_else(|| anyhow!("{kind} without metadata.name"))?;
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    let gvk = GroupVersionKind::gvk(group, version, kind);
    let (ar, caps): (ApiResource, _) = pinned_kind(client, &gvk)
        .await
        .with_context(|| format!("the API server does not serve {api_version} {kind}"))?;
    let namespace = match caps.scope {
        Scope::Namespaced => Some(obj["metadata"]["namespace"].as_str().unwrap_or("default").to_owned()),
        Scope::Cluster => None,
    };
    let url = match &namespace {
        Some(ns) => format!(
            "/{}/namespaces/{ns}/{}",
            if group.is_empty() { format!("api/{version}") } else { format!("apis/{group}/{version}") },
            ar.plural
        ),
        None => format!(
            "/{}/{}",
            if group.is_empty() { format!("api/{version}") } else { format!("apis/{group}/{version}") },
            ar.plural
        ),
    };
    let mut obj = obj.clone();
    if let Some(ns) = &namespace {
        obj["metadata"]["namespace"] = Value::String(ns.clone());
    }
    let req = Request::new(url)
        .patch(name, &PatchParams::apply("tessera-e2e").force(), &Patch::Apply(&obj))
        .map_err(|e| anyhow!("building the apply of {kind} {name}: {e}"))?;
    let resp =
        client.send(req.map(kube::client::Body::from)).await.with_context(|| format!("applying {kind} {name}"))?;
    let warnings =
        resp.headers().get_all("warning").iter().map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned()).collect();
    let status = resp.status();
    if !status.is_success() {
        let body = http_body_util::BodyExt::collect(resp.into_body()).await.map(|b| b.to_bytes()).unwrap_or_default();
        bail!("applying {kind} {name}: {status}: {}", String::from_utf8_lossy(&body));
    }
    Ok(Applied { kind: kind.to_owned(), namespace, name: name.to_owned(), warnings })
}

/// Applies every document of `path`, in order.
pub async fn apply_file(client: &Client, path: &Path) -> Result<Vec<Applied>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut out = Vec::new();
    for doc in documents(&text).with_context(|| format!("in {}", path.display()))? {
        out.push(apply(client, &doc).await.with_context(|| format!("in {}", path.display()))?);
    }
    Ok(out)
}

/// An object as a typed value (for the `k8s_openapi` types).
pub fn typed<T: serde::de::DeserializeOwned>(v: Value) -> Result<T> {
    serde_json::from_value(v).context("building an object")
}
