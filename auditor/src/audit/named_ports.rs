//! Which destination ports are worth a label value of their own: those the policies name (the
//! others are `other`), so the `dst_port` label stays bounded.

use std::collections::HashSet;

use crate::policy::ir::{PortSpec, Rule};
use crate::vocab::Protocol;

/// Ports the policies name explicitly, per protocol. A range counts only when it is short, so a
/// policy allowing `1024-65535` cannot blow up the label set.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NamedPorts {
    ports: HashSet<(Option<Protocol>, u16)>,
}

/// The widest port range whose ports get label values of their own.
pub const MAX_LABELLED_RANGE: u16 = 16;

impl NamedPorts {
    /// Collects the numbered ports of `rules`.
    pub fn from_rules<'a>(rules: impl IntoIterator<Item = &'a Rule>) -> Self {
        let mut ports = HashSet::new();
        for rule in rules {
            for m in &rule.ports {
                if let PortSpec::Range(first, last) = m.port
                    && last >= first
                    && last - first < MAX_LABELLED_RANGE
                {
                    ports.extend((first..=last).map(|p| (m.protocol, p)));
                }
            }
        }
        Self { ports }
    }

    /// Whether some policy names `port` for `protocol` (or for any protocol).
    #[must_use]
    pub fn contains(&self, protocol: Protocol, port: u16) -> bool {
        self.ports.contains(&(Some(protocol), port)) || self.ports.contains(&(None, port))
    }

    #[must_use]
    pub fn len(&self) -> usize {
        self.ports.len()
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.ports.is_empty()
    }
}
