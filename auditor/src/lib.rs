//! flow-auditor: judges every pod flow against the intended network policy model.
//!
//! The modules are layers, and a layer uses only the layers below it (none reaches up, and no
//! two import each other):
//!
//! - drivers: [`check`] (`auditor check`) and [`daemon`] (`auditor run`), with [`config`]: they
//!   wire sources to stores to outputs and hold no logic of their own;
//! - outputs: [`export`] (metrics, HTTP, the unexpected-flow log);
//! - judging: [`audit`] (the two stores joined into a [`audit::Cluster`]; verdicts, peers,
//!   explanations; allowed / denied / unexpected, each flow counted once);
//! - sources: [`source`] (the Kubernetes watch, snapshot files, policy directories: they read
//!   the world and emit typed changes);
//! - stores: [`inventory`] (who is who) and [`policy`] (the kind table, rules, decisions), which
//!   know nothing of each other;
//! - flows: [`flows`] (one record per flow, with its outcome);
//! - datapath: [`datapath`] (load, attach, read; the kernel side is `auditor-ebpf`);
//! - vocabulary: [`vocab`] (labels, protocol, object keys, ports, the policy direction) and
//!   [`decode`] (one manifest document into a typed object).

pub mod audit;
pub mod check;
pub mod config;
pub mod daemon;
pub mod datapath;
pub mod decode;
pub mod export;
pub mod flows;
pub mod inventory;
pub mod policy;
pub mod source;
pub mod vocab;
