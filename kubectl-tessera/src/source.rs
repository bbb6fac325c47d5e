//! Where the scheduler's read-only API is reached: through `kubectl port-forward` to its Service
//! (the user's kubeconfig and RBAC; the forwarded connection arrives on the pod's loopback, which
//! the read-only surface trusts), through the API server's service proxy with `kubectl get --raw`
//! (only where the surface runs with `--read-auth=none`), or directly over plain HTTP (a
//! port-forward of your own, or `tessera-scheduler --demo` on this machine).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow, bail};
use serde_json::Value;

/// How `kubectl` is run: its path and the flags every call gets (e.g. `--context`).
#[derive(Clone, Debug)]
pub struct Kubectl {
    pub program: PathBuf,
    pub global_args: Vec<String>,
}

impl Kubectl {
    pub fn new(program: impl Into<PathBuf>) -> Self {
        Self { program: program.into(), global_args: Vec::new() }
    }

    /// Runs `kubectl ARGS` and returns its stdout; a failure carries kubectl's stderr.
    pub fn run(&self, args: &[&str]) -> Result<Vec<u8>> {
        let out = Command::new(&self.program)
            .args(&self.global_args)
            .args(args)
            .output()
            .with_context(|| format!("running {}", self.program.display()))?;
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            bail!("kubectl {} failed: {}", args.join(" "), stderr.trim());
        }
        Ok(out.stdout)
    }

    /// `kubectl port-forward -n NAMESPACE TARGET :REMOTE_PORT` on 127.0.0.1, once it says which
    /// local port it chose; the forward ends when the returned value is dropped.
    pub fn port_forward(&self, namespace: &str, target: &str, remote_port: &str) -> Result<Forward> {
        let args = ["port-forward", "-n", namespace, target, &format!(":{remote_port}"), "--address", "127.0.0.1"];
        let mut child = Command::new(&self.program)
            .args(&self.global_args)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("running {}", self.program.display()))?;
        let (tx, rx) = std::sync::mpsc::channel();
        let stdout = child.stdout.take().ok_or_else(|| anyhow!("kubectl port-forward: no stdout"))?;
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let mut stderr = child.stderr.take().ok_or_else(|| anyhow!("kubectl port-forward: no stderr"))?;
        let errors = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = stderr.read_to_string(&mut s);
            s
        });
        let mut forward = Forward { child, port: 0 };
        #[allow(clippy::disallowed_methods)] // the port-forward wait is bounded on the monotonic clock
        let deadline = std::time::Instant::now() + PORT_FORWARD_TIMEOUT;
        loop {
            #[allow(clippy::disallowed_methods)] // the port-forward wait is bounded on the monotonic clock
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    // "Forwarding from 127.0.0.1:43125 -> 8889"
                    if let Some(port) = line
                        .strip_prefix("Forwarding from 127.0.0.1:")
                        .and_then(|rest| rest.split_whitespace().next())
                        .and_then(|p| p.parse::<u16>().ok())
                    {
                        forward.port = port;
                        return Ok(forward);
                    }
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    bail!(
                        "kubectl {} did not start forwarding within {} s",
                        args.join(" "),
                        PORT_FORWARD_TIMEOUT.as_secs()
                    )
                }
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    let _ = forward.child.wait();
                    let stderr = errors.join().unwrap_or_default();
                    bail!("kubectl {} failed: {}", args.join(" "), stderr.trim());
                }
            }
        }
    }

    /// `kubectl ARGS` parsed as JSON.
    pub fn json(&self, args: &[&str]) -> Result<Value> {
        let out = self.run(args)?;
        serde_json::from_slice(&out).with_context(|| format!("kubectl {} did not print JSON", args.join(" ")))
    }
}

/// Longest wait for `kubectl port-forward` to say it is forwarding.
const PORT_FORWARD_TIMEOUT: Duration = Duration::from_secs(30);

/// A running `kubectl port-forward`; stopped on drop.
#[derive(Debug)]
pub struct Forward {
    child: Child,
    /// The local port on 127.0.0.1.
    pub port: u16,
}

impl Drop for Forward {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The scheduler's read-only API.
#[derive(Clone, Debug)]
pub enum Source {
    /// `http://HOST:PORT[/PREFIX]`, spoken to directly.
    Direct { host: String, port: u16, prefix: String },
    /// The Service `namespace/service`, port `port`, through `kubectl port-forward`.
    PortForward { kubectl: Kubectl, namespace: String, service: String, port: String },
    /// The Service `namespace/service`, port `port`, through the API server's proxy.
    Proxy { kubectl: Kubectl, namespace: String, service: String, port: String },
}

impl Source {
    /// Parses `--server`: only plain `http://` (use the proxy for anything remote).
    pub fn direct(url: &str) -> Result<Self> {
        let rest = url.strip_prefix("http://").ok_or_else(|| {
            anyhow!(
                "--server {url:?}: only http:// URLs are spoken to directly; leave --server out to go through kubectl"
            )
        })?;
        let (authority, prefix) = match rest.find('/') {
            Some(i) => (&rest[..i], rest[i..].trim_end_matches('/')),
            None => (rest, ""),
        };
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) => (h, p.parse::<u16>().with_context(|| format!("--server {url:?}: bad port"))?),
            None => (authority, 80),
        };
        if host.is_empty() {
            bail!("--server {url:?}: no host");
        }
        Ok(Source::Direct { host: host.to_owned(), port, prefix: prefix.to_owned() })
    }

    /// GETs `path` (e.g. `/api/v1/cluster`) and parses the JSON answer. A non-2xx answer becomes
    /// an error with the server's `Error` message when it sent one.
    pub fn get_json(&self, path: &str) -> Result<Value> {
        match self {
            Source::PortForward { kubectl, namespace, service, port } => {
                let forward = kubectl.port_forward(namespace, &format!("svc/{service}"), port)?;
                let direct = Source::Direct { host: "127.0.0.1".into(), port: forward.port, prefix: String::new() };
                direct.get_json(path)
            }
            Source::Direct { host, port, prefix } => {
                let (status, body) = http_get(host, *port, &format!("{prefix}{path}"), Duration::from_secs(15))?;
                let value: Option<Value> = serde_json::from_slice(&body).ok();
                if !(200..300).contains(&status) {
                    let msg = value
                        .as_ref()
                        // The scheduler writes `Error` (the extender wire's spelling).
                        .and_then(|v| v.get("Error").or_else(|| v.get("error")))
                        .and_then(Value::as_str)
                        .map(str::to_owned)
                        .unwrap_or_else(|| String::from_utf8_lossy(&body).trim().to_owned());
                    bail!("{path}: HTTP {status}: {msg}");
                }
                value.ok_or_else(|| anyhow!("{path}: the answer is not JSON"))
            }
            Source::Proxy { kubectl, namespace, service, port } => {
                let raw = format!("/api/v1/namespaces/{namespace}/services/http:{service}:{port}/proxy{path}");
                kubectl.json(&["get", "--raw", &raw])
            }
        }
    }
}

/// A GET over HTTP/1.0, so the answer is never chunked and ends when the server closes.
fn http_get(host: &str, port: u16, path: &str, timeout: Duration) -> Result<(u16, Vec<u8>)> {
    let addr = (host, port)
        .to_socket_addrs()
        .with_context(|| format!("resolving {host}:{port}"))?
        .next()
        .ok_or_else(|| anyhow!("{host}:{port} resolves to nothing"))?;
    let mut stream =
        TcpStream::connect_timeout(&addr, timeout).with_context(|| format!("connecting to {host}:{port}"))?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    write!(
        stream,
        "GET {path} HTTP/1.0\r\nHost: {host}:{port}\r\nAccept: application/json\r\nUser-Agent: kubectl-tessera\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).with_context(|| format!("reading the answer from {host}:{port}"))?;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| anyhow!("{host}:{port} answered without HTTP headers"))?;
    let head = String::from_utf8_lossy(&raw[..split]);
    let status = head
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| anyhow!("{host}:{port} answered with a bad status line"))?;
    Ok((status, raw[split + 4..].to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_urls_are_split_into_host_port_and_prefix() {
        match Source::direct("http://127.0.0.1:8889/tessera/").unwrap() {
            Source::Direct { host, port, prefix } => {
                assert_eq!((host.as_str(), port, prefix.as_str()), ("127.0.0.1", 8889, "/tessera"));
            }
            other => panic!("{other:?}"),
        }
        match Source::direct("http://localhost").unwrap() {
            Source::Direct { port, prefix, .. } => assert_eq!((port, prefix.as_str()), (80, "")),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn https_and_nonsense_servers_are_refused_with_the_flag_named() {
        for bad in ["https://x:443", "127.0.0.1:8889", "http://:80", "http://h:notaport"] {
            let e = Source::direct(bad).unwrap_err().to_string();
            assert!(e.contains("--server"), "{bad}: {e}");
        }
    }
}
