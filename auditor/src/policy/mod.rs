//! The intended policy model: NetworkPolicy and Cilium policies compiled to rules, and verdicts.
//! Pure library: no I/O, no async, no kernel. Compilers (`netpol`, `cilium`) turn objects into the
//! rule IR (`ir`); the engine (`model`) indexes rules by the identities they select and judges flows.

pub mod cilium;
pub mod explain;
pub mod ir;
pub mod model;
pub mod netpol;
pub mod selector;
