//! Integration tests of tessera-core: one binary, a module per topic.

mod gang_model;
mod placement_model;
mod snapshot_model;
