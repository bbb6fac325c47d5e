//! Integration tests: real weights from the model cache, real HTTP over loopback.
//!
//! The cache is `<repo>/.cache/models` (or `$TESSERA_MODEL_CACHE`), filled by
//! `scripts/fetch-models.sh`: the models, the ONNX export of MiniLM and the ONNX Runtime
//! library. Without it these tests fail under CI (`CI` set) and skip with one printed line
//! elsewhere.
#![allow(clippy::disallowed_methods)] // tests wait on a real server with deadlines

mod chat;
mod drain;
mod embeddings;
mod multi;
mod ort;
mod routes;
mod support;
