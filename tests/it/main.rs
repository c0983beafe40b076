//! Strata's integration tests: one binary, one module per area.

mod golden;
mod support;

mod cli;
mod engine;
mod generate;
mod quantize;
mod reference;
