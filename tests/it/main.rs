//! Strata's integration tests: one binary, one module per area.

mod golden;
mod netns;
mod support;

mod batch;
mod chat;
mod cli;
mod cluster;
mod discovery;
mod engine;
mod generate;
mod mtp;
mod prefix;
mod quantize;
mod reasoning;
mod recovery;
mod reference;
mod security;
mod serve;
mod speculative;
mod streaming;
mod structured;
mod tools;
