//! Integration tests of tessera-core: one binary, a module per topic.

mod snapshot_model;
