//! The intended policy model: NetworkPolicy and Cilium policies compiled to rules, and verdicts.
