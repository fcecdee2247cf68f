//! The command-line tools built on the library: what a batch integrator or an
//! operator runs beside the worker, with the worker's own config.

pub mod batch;
pub mod dlq;
pub mod submit;
pub mod workers;
