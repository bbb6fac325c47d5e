//! Signed assignments: the scheduler signs each `tessera.dev/assignment` it writes; the node
//! agent (before it hands a device out) and the scheduler's rebuild (before it counts a pod's
//! devices) check the signature.
//!
//! The signature is an HMAC-SHA256 over the pod UID, the node, the key ID and the exact
//! annotation text, written beside the assignment as `tessera.dev/assignment-signature`:
//!
//! ```text
//! v1:<key id>:<pod uid>:<base64url HMAC, no padding>
//! ```
//!
//! Keys come from a key file (a mounted Secret), one key per line, `<id> <base64 secret>`;
//! the first key signs, every listed key verifies, so a key is rotated by putting a new one
//! first, waiting until every pod signed with the old one is gone, and then removing it.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};

use crate::Assignment;

/// Version tag of the signature format.
pub const FORMAT: &str = "v1";
/// Fewest secret bytes a key may have.
pub const MIN_SECRET_BYTES: usize = 16;
/// Secret bytes of a generated key.
pub const GENERATED_SECRET_BYTES: usize = 32;

/// A key file that cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("reading the assignment key file {path}: {why}")]
    Read { path: String, why: String },
    #[error("assignment key file line {line}: {why}")]
    Line { line: usize, why: String },
    #[error("the assignment key file lists no key (one `<id> <base64 secret>` per line)")]
    Empty,
    #[error("assignment key {0} is listed twice")]
    Duplicate(String),
}

/// Why an assignment is not trusted. [`Refusal::reason`] is the stable name used as the Event
/// reason's suffix and the metric label.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// An assignment without a signature.
    Unsigned,
    /// The signature annotation cannot be read.
    Malformed(String),
    /// The assignment annotation is not valid assignment JSON.
    BadAssignment(String),
    /// Signed with a key this keyring does not list (removed, or never issued).
    UnknownKey(String),
    /// The signature does not match the assignment: written by someone without the key, or
    /// the assignment was edited after signing.
    Forged,
    /// A valid signature, but for another pod (copied from another pod, or from a deleted pod
    /// of the same name).
    OtherPod { signed_for: String },
    /// A valid signature for another node.
    OtherNode { signed_for: String },
    /// Names a device another live pod holds.
    DeviceHeld { device: String, holder: String },
    /// Names devices the node cannot give it for another reason (a GPU it lacks, in another
    /// mode, or too small), with why.
    DeviceUnavailable(String),
}

impl Refusal {
    /// Stable short name: metric label and Event reason suffix.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::Unsigned => "Unsigned",
            Refusal::Malformed(_) => "MalformedSignature",
            Refusal::BadAssignment(_) => "MalformedAssignment",
            Refusal::UnknownKey(_) => "UnknownKey",
            Refusal::Forged => "Forged",
            Refusal::OtherPod { .. } => "Replayed",
            Refusal::OtherNode { .. } => "ForeignNode",
            Refusal::DeviceHeld { .. } => "DeviceHeld",
            Refusal::DeviceUnavailable(_) => "DeviceUnavailable",
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sig = crate::annotations::ASSIGNMENT_SIGNATURE;
        match self {
            Refusal::Unsigned => write!(f, "the assignment has no {sig} annotation (it was not written by tessera)"),
            Refusal::Malformed(why) => write!(f, "the {sig} annotation cannot be read: {why}"),
            Refusal::BadAssignment(why) => write!(f, "the assignment cannot be read: {why}"),
            Refusal::UnknownKey(id) => {
                write!(f, "the assignment is signed with key {id:?}, which is not in the key file")
            }
            Refusal::Forged => write!(f, "the signature does not match the assignment (forged or edited)"),
            Refusal::OtherPod { signed_for } => {
                write!(f, "the assignment was signed for another pod (UID {signed_for}): copied or replayed")
            }
            Refusal::OtherNode { signed_for } => {
                write!(f, "the assignment was signed for node {signed_for}, not this one")
            }
            Refusal::DeviceHeld { device, holder } => {
                write!(f, "the assignment names device {device}, which live pod {holder} holds")
            }
            Refusal::DeviceUnavailable(why) => write!(f, "the assignment's devices are not available: {why}"),
        }
    }
}

struct Key {
    id: String,
    key: hmac::Key,
}

/// The assignment keys: the first signs, any verifies.
pub struct Keyring {
    keys: Vec<Key>,
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the secrets.
        f.debug_struct("Keyring").field("ids", &self.ids()).finish()
    }
}

fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 32 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// The bytes the HMAC covers. NUL separators: none of the parts can contain one ambiguously
/// (IDs and UIDs are checked; the assignment is JSON, which escapes control characters).
fn message(key_id: &str, pod_uid: &str, node: &str, assignment: &str) -> Vec<u8> {
    let mut m = Vec::with_capacity(48 + key_id.len() + pod_uid.len() + node.len() + assignment.len());
    for part in ["tessera.dev/assignment", FORMAT, key_id, pod_uid, node, assignment] {
        m.extend_from_slice(part.as_bytes());
        m.push(0);
    }
    m
}

impl Keyring {
    /// Parses a key file: one `<id> <base64 secret>` per line (`<id>=<secret>` also works);
    /// blank lines and `#` comments are skipped.
    pub fn parse(text: &str) -> Result<Self, KeyError> {
        let mut keys: Vec<Key> = Vec::new();
        for (n, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = |why: &str| KeyError::Line { line: n + 1, why: why.to_owned() };
            let (id, secret) = line
                .split_once(|c: char| c.is_whitespace() || c == '=')
                .ok_or_else(|| bad("expected `<id> <base64 secret>`"))?;
            let secret = secret.trim();
            if !valid_id(id) {
                return Err(bad("the key ID must be 1-32 characters of A-Z, a-z, 0-9, '.', '_' or '-'"));
            }
            let bytes = STANDARD
                .decode(secret)
                .or_else(|_| URL_SAFE_NO_PAD.decode(secret.trim_end_matches('=')))
                .map_err(|_| bad("the secret is not base64"))?;
            if bytes.len() < MIN_SECRET_BYTES {
                return Err(bad(&format!(
                    "the secret has {} bytes; at least {MIN_SECRET_BYTES} are needed",
                    bytes.len()
                )));
            }
            if keys.iter().any(|k| k.id == id) {
                return Err(KeyError::Duplicate(id.to_owned()));
            }
            keys.push(Key { id: id.to_owned(), key: hmac::Key::new(hmac::HMAC_SHA256, &bytes) });
        }
        if keys.is_empty() {
            return Err(KeyError::Empty);
        }
        Ok(Self { keys })
    }

    /// Reads and parses a key file.
    pub fn load(path: &Path) -> Result<Self, KeyError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| KeyError::Read { path: path.display().to_string(), why: e.to_string() })?;
        Self::parse(&text)
    }

    /// A new key-file line `<id> <base64 secret>` with a random secret.
    pub fn generate_line(id: &str) -> Result<String, KeyError> {
        if !valid_id(id) {
            return Err(KeyError::Line { line: 1, why: format!("invalid key ID {id:?}") });
        }
        let mut secret = [0u8; GENERATED_SECRET_BYTES];
        SystemRandom::new()
            .fill(&mut secret)
            .map_err(|_| KeyError::Read { path: "the system random source".into(), why: "unavailable".into() })?;
        Ok(format!("{id} {}", STANDARD.encode(secret)))
    }

    /// The key IDs, the signing key first.
    pub fn ids(&self) -> Vec<&str> {
        self.keys.iter().map(|k| k.id.as_str()).collect()
    }

    /// The signature annotation for `assignment` (the exact annotation text) on the pod with
    /// `pod_uid`, bound to `node`.
    pub fn sign(&self, pod_uid: &str, node: &str, assignment: &str) -> String {
        let k = &self.keys[0];
        let tag = hmac::sign(&k.key, &message(&k.id, pod_uid, node, assignment));
        format!("{FORMAT}:{}:{pod_uid}:{}", k.id, URL_SAFE_NO_PAD.encode(tag.as_ref()))
    }

    /// Checks a pod's assignment and signature. `pod_uid` is the pod's own UID and `node` the
    /// node the pod is bound to (or the agent's node). Returns the assignment when trusted.
    pub fn verify(
        &self,
        pod_uid: &str,
        node: &str,
        assignment: &str,
        signature: Option<&str>,
    ) -> Result<Assignment, Refusal> {
        let parsed = Assignment::from_annotation(assignment).map_err(|e| Refusal::BadAssignment(e.to_string()))?;
        let Some(signature) = signature.map(str::trim).filter(|s| !s.is_empty()) else {
            return Err(Refusal::Unsigned);
        };
        let mut parts = signature.splitn(4, ':');
        let (Some(format), Some(id), Some(uid), Some(tag)) = (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(Refusal::Malformed("expected v1:<key id>:<pod uid>:<hmac>".into()));
        };
        if format != FORMAT {
            return Err(Refusal::Malformed(format!("unknown format {format:?} (this version reads {FORMAT})")));
        }
        let tag = URL_SAFE_NO_PAD.decode(tag).map_err(|_| Refusal::Malformed("the HMAC is not base64url".into()))?;
        let key = self.keys.iter().find(|k| k.id == id).ok_or_else(|| Refusal::UnknownKey(id.to_owned()))?;
        hmac::verify(&key.key, &message(id, uid, &parsed.node, assignment), &tag).map_err(|_| Refusal::Forged)?;
        if uid != pod_uid {
            return Err(Refusal::OtherPod { signed_for: uid.to_owned() });
        }
        if parsed.node != node {
            return Err(Refusal::OtherNode { signed_for: parsed.node });
        }
        Ok(parsed)
    }
}

/// Where the keys come from: a key file re-read whenever it changes (a mounted Secret is
/// updated in place by kubelet), or a fixed keyring (tests, tools).
pub struct Keys {
    path: Option<PathBuf>,
    cached: Mutex<Option<(Stamp, Arc<Keyring>)>>,
    /// Used while the key file is unusable (a key just generated into the Secret, before
    /// kubelet has updated the mounted file).
    fallback: Option<Arc<Keyring>>,
}

/// When and how large the key file was when last read.
type Stamp = Option<(SystemTime, u64)>;

impl fmt::Debug for Keys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keys").field("path", &self.path).finish_non_exhaustive()
    }
}

impl Keys {
    /// Keys read from `path`, now and whenever the file changes.
    pub fn file(path: impl Into<PathBuf>) -> Self {
        Self { path: Some(path.into()), cached: Mutex::new(None), fallback: None }
    }

    /// Uses `ring` while the key file cannot be used.
    pub fn with_fallback(mut self, ring: Keyring) -> Self {
        self.fallback = Some(Arc::new(ring));
        self
    }

    /// A keyring that never changes.
    pub fn fixed(ring: Keyring) -> Self {
        Self { path: None, cached: Mutex::new(Some((None, Arc::new(ring)))), fallback: None }
    }

    /// The key file, when keys come from one.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// The current keyring. A key file that changed is read again; when the new contents
    /// cannot be used, the error is returned (the old keys are not silently kept).
    pub fn current(&self) -> Result<Arc<Keyring>, KeyError> {
        let mut cached = self.cached.lock().unwrap_or_else(|p| p.into_inner());
        let Some(path) = &self.path else {
            return cached.as_ref().map(|(_, r)| r.clone()).ok_or(KeyError::Empty);
        };
        let stamp = std::fs::metadata(path).ok().and_then(|m| Some((m.modified().ok()?, m.len())));
        if let Some((seen, ring)) = cached.as_ref()
            && stamp.is_some()
            && *seen == stamp
        {
            return Ok(ring.clone());
        }
        let ring = match (Keyring::load(path), &self.fallback) {
            (Ok(r), _) => Arc::new(r),
            (Err(_), Some(fallback)) => return Ok(fallback.clone()),
            (Err(e), None) => return Err(e),
        };
        *cached = Some((stamp, ring.clone()));
        Ok(ring)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEYS: &str = "# rotation: k2 signs, k1 still verifies\nk2 c2Vjb25kLXNlY3JldC1rZXktMzItYnl0ZXMhIQ==\nk1=Zmlyc3Qtc2VjcmV0LWtleS0xNi1ieXRlcw==\n";
    const A: &str = r#"{"node":"n1","devices":[{"gpu":"GPU-1","index":0}]}"#;

    #[test]
    fn a_signed_assignment_verifies_for_its_pod_and_node_only() {
        let ring = Keyring::parse(KEYS).unwrap();
        assert_eq!(ring.ids(), ["k2", "k1"]);
        let sig = ring.sign("uid-a", "n1", A);
        assert!(sig.starts_with("v1:k2:uid-a:"), "{sig}");
        assert_eq!(ring.verify("uid-a", "n1", A, Some(&sig)).unwrap().devices[0].gpu, "GPU-1");
        assert_eq!(ring.verify("uid-b", "n1", A, Some(&sig)), Err(Refusal::OtherPod { signed_for: "uid-a".into() }));
        let (other_node, other_sig) = (A.replace("n1", "n2"), ring.sign("uid-a", "n2", &A.replace("n1", "n2")));
        assert_eq!(
            ring.verify("uid-a", "n1", &other_node, Some(&other_sig)),
            Err(Refusal::OtherNode { signed_for: "n2".into() })
        );
        assert_eq!(ring.verify("uid-a", "n1", A, None), Err(Refusal::Unsigned));
    }

    #[test]
    fn edited_or_foreign_signatures_are_refused() {
        let ring = Keyring::parse(KEYS).unwrap();
        let sig = ring.sign("uid-a", "n1", A);
        let edited = A.replace("GPU-1", "GPU-2");
        assert_eq!(ring.verify("uid-a", "n1", &edited, Some(&sig)), Err(Refusal::Forged));
        // The UID in the signature text changed to the victim's: the HMAC no longer matches.
        let retargeted = sig.replace("uid-a", "uid-b");
        assert_eq!(ring.verify("uid-b", "n1", A, Some(&retargeted)), Err(Refusal::Forged));
        let attacker = Keyring::parse("k2 YXR0YWNrZXItc2VjcmV0LTE2LWJ5dGVz").unwrap();
        assert_eq!(ring.verify("uid-a", "n1", A, Some(&attacker.sign("uid-a", "n1", A))), Err(Refusal::Forged));
        let unknown = Keyring::parse("k9 YXR0YWNrZXItc2VjcmV0LTE2LWJ5dGVz").unwrap().sign("uid-a", "n1", A);
        assert_eq!(ring.verify("uid-a", "n1", A, Some(&unknown)), Err(Refusal::UnknownKey("k9".into())));
        assert!(matches!(ring.verify("uid-a", "n1", A, Some("nonsense")), Err(Refusal::Malformed(_))));
        assert!(matches!(ring.verify("uid-a", "n1", "{", Some(&sig)), Err(Refusal::BadAssignment(_))));
    }

    #[test]
    fn rotation_accepts_the_old_key_and_signs_with_the_new() {
        let old = Keyring::parse("k1 Zmlyc3Qtc2VjcmV0LWtleS0xNi1ieXRlcw==").unwrap();
        let before = old.sign("uid-a", "n1", A);
        let rotated = Keyring::parse(KEYS).unwrap();
        assert!(rotated.verify("uid-a", "n1", A, Some(&before)).is_ok());
        let after = rotated.sign("uid-a", "n1", A);
        assert_eq!(old.verify("uid-a", "n1", A, Some(&after)), Err(Refusal::UnknownKey("k2".into())));
    }

    #[test]
    fn key_files_are_checked_and_generated_keys_parse() {
        assert_eq!(Keyring::parse("# none\n\n").unwrap_err(), KeyError::Empty);
        assert!(matches!(Keyring::parse("k1 c2hvcnQ=").unwrap_err(), KeyError::Line { line: 1, .. }));
        assert!(matches!(
            Keyring::parse("bad/id c2Vjb25kLXNlY3JldC1rZXktMzItYnl0ZXMhIQ==").unwrap_err(),
            KeyError::Line { .. }
        ));
        assert!(matches!(Keyring::parse("k1 !!!notbase64!!!").unwrap_err(), KeyError::Line { .. }));
        let line = Keyring::generate_line("k1").unwrap();
        let dup = format!("{line}\n{line}\n");
        assert_eq!(Keyring::parse(&dup).unwrap_err(), KeyError::Duplicate("k1".into()));
        let ring = Keyring::parse(&line).unwrap();
        let sig = ring.sign("u", "n1", A);
        assert!(ring.verify("u", "n1", A, Some(&sig)).is_ok());
        assert!(!format!("{ring:?}").contains(line.split_once(' ').unwrap().1), "Debug never shows a secret");
    }

    #[test]
    fn a_key_file_is_read_again_when_it_changes() {
        let dir = std::env::temp_dir().join(format!("tessera-keys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("keys");
        std::fs::write(&path, "k1 Zmlyc3Qtc2VjcmV0LWtleS0xNi1ieXRlcw==\n").unwrap();
        let keys = Keys::file(&path);
        assert_eq!(keys.current().unwrap().ids(), ["k1"]);
        std::fs::write(&path, KEYS).unwrap();
        assert_eq!(keys.current().unwrap().ids(), ["k2", "k1"]);
        std::fs::write(&path, "").unwrap();
        assert_eq!(keys.current().unwrap_err(), KeyError::Empty);
        let with = Keys::file(&path).with_fallback(Keyring::parse(KEYS).unwrap());
        assert_eq!(with.current().unwrap().ids(), ["k2", "k1"], "the fallback while the file is empty");
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(matches!(keys.current().unwrap_err(), KeyError::Read { .. }));
    }
}
