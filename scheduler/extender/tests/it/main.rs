//! Integration tests of tessera-scheduler: wire fixtures, HTTP handlers, kube paths against a
//! mock API server, loopback HTTP and TLS, the dashboard in headless Chromium, and the opt-in
//! end-to-end suite.

mod authn;
mod browser;
mod contract;
mod dashboard;
mod e2e;
mod fixtures;
mod gang;
mod hostile;
mod http;
mod kube_api;
mod loopback;
mod reservations;
mod signing;
mod tls;
mod wire;
