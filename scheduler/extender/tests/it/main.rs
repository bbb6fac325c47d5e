//! Integration tests of tessera-scheduler: wire fixtures, HTTP handlers, kube paths against a
//! mock API server, loopback HTTP and TLS, the dashboard in headless Chromium. The real-cluster
//! suite is the tessera-e2e crate (e2e/).
#![allow(clippy::disallowed_methods)] // tests wait on a real server with deadlines

mod authn;
mod browser;
mod contract;
mod dashboard;
mod fed;
mod fixtures;
mod gang;
mod hostile;
mod http;
mod kube_api;
mod loopback;
mod reservations;
mod signing;
mod tls;
mod views;
mod wire;
