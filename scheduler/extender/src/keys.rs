//! The assignment keys: read from the mounted Secret, and generated into that Secret on first
//! install, when it holds no key yet.

use std::path::Path;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::Client;
use kube::api::{Api, PostParams};
use tessera_api::kube_error::{is_conflict, kube_error};
use tessera_api::signing::{KeyError, Keyring, Keys};

/// The Secret's data key that holds the key file.
pub const SECRET_KEY: &str = "keys";

/// Keys from `path`; when the file holds no usable key and `secret` (`namespace/name`) is
/// given, a new key is written into that Secret (if it still has none) and used until kubelet
/// updates the mounted file.
pub async fn load(path: &Path, secret: Option<(&str, &str)>, client: Option<&Client>) -> anyhow::Result<Keys> {
    let keys = Keys::file(path);
    let error = match keys.current() {
        Ok(_) => return Ok(keys),
        Err(e) => e,
    };
    let (Some((namespace, name)), Some(client), KeyError::Empty | KeyError::Read { .. }) = (secret, client, &error)
    else {
        return Err(anyhow::Error::new(error).context("the assignment key file (--assignment-keys)"));
    };
    let text = ensure_secret(client, namespace, name).await?;
    let ring = Keyring::parse(&text).map_err(|e| anyhow::anyhow!("Secret {namespace}/{name}: {e}"))?;
    tracing::info!(secret = %format!("{namespace}/{name}"), keys = ?ring.ids(),
                   "Using the assignment key from the Secret until the mounted file shows it");
    Ok(keys.with_fallback(ring))
}

/// The Secret's key file, after writing a generated key into it when it has none.
async fn ensure_secret(client: &Client, namespace: &str, name: &str) -> anyhow::Result<String> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let read = |s: &Secret| {
        s.data
            .as_ref()
            .and_then(|d| d.get(SECRET_KEY))
            .map(|b| String::from_utf8_lossy(&b.0).into_owned())
            .filter(|t| Keyring::parse(t).is_ok())
    };
    for _ in 0..5 {
        let mut secret = api.get(name).await.map_err(|e| {
            anyhow::anyhow!("reading Secret {namespace}/{name} (it holds the assignment keys): {}", kube_error(&e))
        })?;
        if let Some(text) = read(&secret) {
            return Ok(text);
        }
        let line = Keyring::generate_line("k1")?;
        secret.data.get_or_insert_default().insert(SECRET_KEY.into(), ByteString(format!("{line}\n").into_bytes()));
        // `replace` carries the resourceVersion just read: another replica writing first makes
        // this fail, and the next round reads its key.
        match api.replace(name, &PostParams::default(), &secret).await {
            Ok(s) => {
                tracing::info!(secret = %format!("{namespace}/{name}"), "Generated the assignment signing key");
                return read(&s).ok_or_else(|| anyhow::anyhow!("Secret {namespace}/{name} lost the generated key"));
            }
            Err(e) if is_conflict(&e) => continue,
            Err(e) => anyhow::bail!("writing the generated key into Secret {namespace}/{name}: {}", kube_error(&e)),
        }
    }
    anyhow::bail!("Secret {namespace}/{name} kept changing while the assignment key was written")
}
