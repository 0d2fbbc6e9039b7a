//! The vocabulary: plain facts every stage shares and none owns (labels, protocols, object keys,
//! declared ports, the policy direction). Nothing here knows about the datapath, the inventory,
//! the policies or the outputs; everything above may use it.

use std::collections::BTreeMap;
use std::fmt;

use serde::Serialize;

use auditor_ebpf::flow::proto;

/// The label every namespace carries with its own name (set by the API server since 1.21).
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// The label Cilium gives every endpoint with its pod's service account; pods carry it here too
/// so Cilium selectors on it work. Kubernetes itself never sets this key, so `NetworkPolicy`
/// selectors are unaffected in practice.
pub const CILIUM_SERVICE_ACCOUNT_LABEL: &str = "io.cilium.k8s.policy.serviceaccount";

/// Labels of a pod or namespace: pairs sorted by key, so equal sets compare and hash equal.
/// A sorted boxed slice rather than a `BTreeMap`: a map's first node has room for eleven pairs
/// (over 500 bytes) where a pod has two or three labels, and the model keeps a set per pod.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Labels(Box<[(Box<str>, Box<str>)]>);

impl Labels {
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// The value of `key`.
    #[must_use]
    pub fn get(&self, key: &str) -> Option<&str> {
        self.position(key).ok().map(|at| &*self.0[at].1)
    }

    #[must_use]
    pub fn contains_key(&self, key: &str) -> bool {
        self.position(key).is_ok()
    }

    /// Sets `key` to `value`, replacing its old value.
    pub fn insert(&mut self, key: impl Into<Box<str>>, value: impl Into<Box<str>>) {
        let key = key.into();
        let value = value.into();
        let mut pairs = std::mem::take(&mut self.0).into_vec();
        match pairs.binary_search_by(|(k, _)| (**k).cmp(&*key)) {
            Ok(at) => pairs[at].1 = value,
            Err(at) => pairs.insert(at, (key, value)),
        }
        self.0 = pairs.into_boxed_slice();
    }

    /// The pairs in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (&**k, &**v))
    }

    #[must_use]
    pub fn len(&self) -> usize {
        self.0.len()
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether every pair of `subset` is in these labels (a Service's selector, say).
    #[must_use]
    pub fn contains_all<'a>(&self, subset: impl IntoIterator<Item = (&'a str, &'a str)>) -> bool {
        subset.into_iter().all(|(k, v)| self.get(k) == Some(v))
    }

    fn position(&self, key: &str) -> Result<usize, usize> {
        self.0.binary_search_by(|(k, _)| (**k).cmp(key))
    }
}

/// Pairs in any order; of a key given twice, the last value wins (as in a map).
impl<K: Into<Box<str>>, V: Into<Box<str>>> FromIterator<(K, V)> for Labels {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        let mut pairs: Vec<(Box<str>, Box<str>)> = iter
            .into_iter()
            .map(|(k, v)| (k.into(), v.into()))
            .collect();
        // Stable, so equal keys keep their order and the last one is kept below.
        pairs.sort_by(|a, b| a.0.cmp(&b.0));
        let mut kept: Vec<(Box<str>, Box<str>)> = Vec::with_capacity(pairs.len());
        for pair in pairs {
            match kept.last_mut() {
                Some(last) if last.0 == pair.0 => *last = pair,
                _ => kept.push(pair),
            }
        }
        Self(kept.into_boxed_slice())
    }
}

impl<K: Into<Box<str>>, V: Into<Box<str>>, const N: usize> From<[(K, V); N]> for Labels {
    fn from(pairs: [(K, V); N]) -> Self {
        pairs.into_iter().collect()
    }
}

impl From<BTreeMap<String, String>> for Labels {
    fn from(map: BTreeMap<String, String>) -> Self {
        map.into_iter().collect()
    }
}

/// `namespace/name` of a namespaced object (`namespace` empty for cluster-scoped ones).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectKey {
    pub namespace: String,
    pub name: String,
}

impl ObjectKey {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

/// `namespace/name`, or `name` alone for a cluster-scoped object.
impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.namespace.is_empty() {
            f.write_str(&self.name)
        } else {
            write!(f, "{}/{}", self.namespace, self.name)
        }
    }
}

/// A transport protocol: what the datapath keys flows by, what policies and Services name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum Protocol {
    #[serde(rename = "TCP")]
    Tcp,
    #[serde(rename = "UDP")]
    Udp,
    #[serde(rename = "SCTP")]
    Sctp,
    #[serde(rename = "ICMP")]
    Icmp,
    #[serde(rename = "ICMPv6")]
    Icmpv6,
}

impl Protocol {
    /// From the IP protocol number; `None` for protocols the datapath does not key flows by.
    #[must_use]
    pub const fn from_number(number: u8) -> Option<Self> {
        match number {
            proto::TCP => Some(Self::Tcp),
            proto::UDP => Some(Self::Udp),
            proto::SCTP => Some(Self::Sctp),
            proto::ICMP => Some(Self::Icmp),
            proto::ICMPV6 => Some(Self::Icmpv6),
            _ => None,
        }
    }

    /// The name as Kubernetes and flow lines write it.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "TCP",
            Self::Udp => "UDP",
            Self::Sctp => "SCTP",
            Self::Icmp => "ICMP",
            Self::Icmpv6 => "ICMPv6",
        }
    }

    /// The `protocol` metric label value: the name in lower case.
    #[must_use]
    pub const fn label(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
            Self::Sctp => "sctp",
            Self::Icmp => "icmp",
            Self::Icmpv6 => "icmpv6",
        }
    }

    /// The protocol as policies name it: they have one ICMP for both address families.
    #[must_use]
    pub const fn policy(self) -> Self {
        match self {
            Self::Icmpv6 => Self::Icmp,
            other => other,
        }
    }

    /// Parses the names used in flow lines and policies (case-insensitive).
    #[must_use]
    pub fn parse(name: &str) -> Option<Self> {
        match name.to_ascii_uppercase().as_str() {
            "TCP" => Some(Self::Tcp),
            "UDP" => Some(Self::Udp),
            "SCTP" => Some(Self::Sctp),
            "ICMP" => Some(Self::Icmp),
            "ICMPV6" => Some(Self::Icmpv6),
            _ => None,
        }
    }

    /// Whether the "port" of this protocol is an echo identifier, not a port.
    #[must_use]
    pub const fn is_icmp(self) -> bool {
        matches!(self, Self::Icmp | Self::Icmpv6)
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A port a container declares: what named ports in policies and Services resolve to, and what
/// makes a destination port worth a label value of its own.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ContainerPort {
    pub name: Option<String>,
    pub port: u16,
    pub protocol: Protocol,
}

/// A policy direction, as seen from the endpoint a policy selects. Not to be confused with the
/// TC hook that saw a packet ([`auditor_ebpf::flow::Hook`]): on the host side of a pod's veth,
/// the pod's egress arrives at the TC ingress hook.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Ingress,
    Egress,
}

impl Direction {
    pub const BOTH: [Self; 2] = [Self::Ingress, Self::Egress];

    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Ingress => "ingress",
            Self::Egress => "egress",
        }
    }

    /// 0 for ingress, 1 for egress: for per-direction arrays.
    #[must_use]
    pub const fn index(self) -> usize {
        match self {
            Self::Ingress => 0,
            Self::Egress => 1,
        }
    }
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_sorted_last_value_wins() {
        let labels: Labels = [("b", "1"), ("a", "2"), ("b", "3")].into_iter().collect();
        assert_eq!(labels.iter().collect::<Vec<_>>(), [("a", "2"), ("b", "3")]);
        assert!(labels.contains_all([("b", "3")]));
        assert!(!labels.contains_all([("b", "1")]));
    }

    #[test]
    fn protocols_parse_and_name() {
        for p in [
            Protocol::Tcp,
            Protocol::Udp,
            Protocol::Sctp,
            Protocol::Icmp,
            Protocol::Icmpv6,
        ] {
            assert_eq!(Protocol::parse(p.as_str()), Some(p));
            assert_eq!(Protocol::parse(p.label()), Some(p));
        }
        assert_eq!(Protocol::Icmpv6.policy(), Protocol::Icmp);
        assert_eq!(Protocol::from_number(58), Some(Protocol::Icmpv6));
        assert_eq!(Protocol::parse("GRE"), None);
    }

    #[test]
    fn object_keys_display_without_an_empty_namespace() {
        assert_eq!(ObjectKey::new("ns", "a").to_string(), "ns/a");
        assert_eq!(ObjectKey::new("", "n1").to_string(), "n1");
    }
}
