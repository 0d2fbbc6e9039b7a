//! flow-auditor: judges every pod flow against the intended network policy model.
//!
//! The modules follow a packet through the auditor, and a stage never reaches back into an earlier
//! one: datapath (load, attach, read) -> flows (state, outcome) -> inventory (who is who) ->
//! policy (model, verdict, explanation) -> audit (allowed/denied/unexpected) -> export.

pub mod audit;
pub mod check;
pub mod config;
pub mod daemon;
pub mod datapath;
pub mod export;
pub mod flows;
pub mod inventory;
pub mod policy;
pub mod vocab;
