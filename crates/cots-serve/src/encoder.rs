//! What turns a query into a vector? The [`QueryEncoder`] trait of
//! `cots-infer`, re-exported: the service talks to the model only through
//! it, so tests can count, slow down or break the encoder without a
//! different server. `cots_train::query::RunEncoder` implements it for a
//! trained run.

pub use cots_infer::{Error as EncodeError, QueryEncoder, Result as EncodeResult};
