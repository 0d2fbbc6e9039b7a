//! The policy store: the intended model, pure (no I/O, no async, no kernel, and no knowledge of
//! the inventory). The kind table ([`kinds`]) maps each policy kind to its compiler
//! ([`netpol`], [`cilium`]); compilers turn objects into the rule IR ([`ir`], with label
//! selectors in [`selector`]); the model ([`model`]) indexes rules by the identities they select
//! and decides one direction of a flow at a time.

pub mod cilium;
pub mod ir;
pub mod kinds;
pub mod model;
pub mod netpol;
pub mod selector;
