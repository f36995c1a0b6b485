//! Benchmarks live in benches/; this library holds what several of them
//! share.

pub mod train_step;
