//! Integration tests: real weights from the model cache, real HTTP over loopback.
//!
//! The cache is `<repo>/.cache/models` (or `$TESSERA_MODEL_CACHE`), filled by
//! `scripts/fetch-models.sh`. Without it these tests fail under CI (`CI` set) and skip with one
//! printed line elsewhere.

mod chat;
mod drain;
mod embeddings;
mod routes;
mod support;
