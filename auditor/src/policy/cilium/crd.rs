//! The Cilium policy objects as written (cilium.io/v2). Unknown fields are not refused here:
//! [`crate::decode`] finds them, an error for files (`check`, `--policies`) and a note for objects
//! the API server validated, because a misspelt `fromEndpoint` must never silently turn a narrow
//! rule into an allow-from-everyone one.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Deserialize;

/// A `CiliumNetworkPolicy` or `CiliumClusterwideNetworkPolicy` object. Both kinds share the shape;
/// the kind decides how selectors are scoped, so it is passed to [`super::compile`].
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CiliumPolicy {
    #[serde(default)]
    pub metadata: ObjectMeta,
    /// A single rule.
    #[serde(default)]
    pub spec: Option<CiliumRule>,
    /// More rules; Cilium applies `spec` and every entry of `specs`.
    #[serde(default)]
    pub specs: Option<Vec<CiliumRule>>,
}

/// One Cilium rule (`spec` or an entry of `specs`).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CiliumRule {
    #[serde(default)]
    pub endpoint_selector: Option<EndpointSelector>,
    /// Host policies (clusterwide only): they apply to nodes, which the model does not judge.
    #[serde(default)]
    pub node_selector: Option<EndpointSelector>,
    #[serde(default)]
    pub ingress: Option<Vec<IngressRule>>,
    #[serde(default)]
    pub ingress_deny: Option<Vec<IngressRule>>,
    #[serde(default)]
    pub egress: Option<Vec<EgressRule>>,
    #[serde(default)]
    pub egress_deny: Option<Vec<EgressRule>>,
    #[serde(default)]
    pub enable_default_deny: Option<DefaultDeny>,
    /// Metadata only.
    #[serde(default)]
    pub labels: Option<Vec<serde_json::Value>>,
    #[serde(default)]
    pub description: Option<String>,
    /// Policy verdict logging settings: no effect on verdicts.
    #[serde(default)]
    pub log: Option<serde_json::Value>,
}

/// `enableDefaultDeny`: unset means "on for each direction the rule has rules for".
#[derive(Clone, Debug, Default, Deserialize)]
pub struct DefaultDeny {
    #[serde(default)]
    pub ingress: Option<bool>,
    #[serde(default)]
    pub egress: Option<bool>,
}

/// A Cilium endpoint selector: a Kubernetes label selector whose keys may carry a source prefix
/// (`k8s:`, `any:`, `reserved:`).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointSelector {
    #[serde(default)]
    pub match_labels: Option<BTreeMap<String, String>>,
    #[serde(default)]
    pub match_expressions: Option<Vec<SelectorRequirement>>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct SelectorRequirement {
    pub key: String,
    pub operator: SelectorOperator,
    #[serde(default)]
    pub values: Option<Vec<String>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub enum SelectorOperator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

/// An `ingress` or `ingressDeny` entry. Deny entries are the same shape minus L7 and
/// authentication, which [`super::compile`] rejects in them.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IngressRule {
    #[serde(default)]
    pub from_endpoints: Option<Vec<EndpointSelector>>,
    #[serde(default)]
    pub from_requires: Option<Vec<EndpointSelector>>,
    #[serde(default, rename = "fromCIDR")]
    pub from_cidr: Option<Vec<String>>,
    #[serde(default, rename = "fromCIDRSet")]
    pub from_cidr_set: Option<Vec<CidrRule>>,
    #[serde(default)]
    pub from_entities: Option<Vec<CiliumEntity>>,
    #[serde(default)]
    pub from_groups: Option<Vec<serde_json::Value>>,
    #[serde(default)]
    pub from_nodes: Option<Vec<EndpointSelector>>,
    #[serde(default)]
    pub to_ports: Option<Vec<PortRule>>,
    #[serde(default, rename = "icmps")]
    pub icmps: Option<Vec<IcmpRule>>,
    #[serde(default)]
    pub authentication: Option<serde_json::Value>,
}

/// An `egress` or `egressDeny` entry.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EgressRule {
    #[serde(default)]
    pub to_endpoints: Option<Vec<EndpointSelector>>,
    #[serde(default)]
    pub to_requires: Option<Vec<EndpointSelector>>,
    #[serde(default, rename = "toCIDR")]
    pub to_cidr: Option<Vec<String>>,
    #[serde(default, rename = "toCIDRSet")]
    pub to_cidr_set: Option<Vec<CidrRule>>,
    #[serde(default)]
    pub to_entities: Option<Vec<CiliumEntity>>,
    #[serde(default)]
    pub to_services: Option<Vec<serde_json::Value>>,
    #[serde(default, rename = "toFQDNs")]
    pub to_fqdns: Option<Vec<FqdnSelector>>,
    #[serde(default)]
    pub to_groups: Option<Vec<serde_json::Value>>,
    #[serde(default)]
    pub to_nodes: Option<Vec<EndpointSelector>>,
    #[serde(default)]
    pub to_ports: Option<Vec<PortRule>>,
    #[serde(default, rename = "icmps")]
    pub icmps: Option<Vec<IcmpRule>>,
    #[serde(default)]
    pub authentication: Option<serde_json::Value>,
}

/// `fromCIDRSet` / `toCIDRSet` entry.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CidrRule {
    #[serde(default)]
    pub cidr: Option<String>,
    #[serde(default)]
    pub except: Option<Vec<String>>,
    /// References a `CiliumCIDRGroup` object, which the model does not load.
    #[serde(default)]
    pub cidr_group_ref: Option<String>,
    #[serde(default)]
    pub cidr_group_selector: Option<serde_json::Value>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FqdnSelector {
    #[serde(default)]
    pub match_name: Option<String>,
    #[serde(default)]
    pub match_pattern: Option<String>,
}

/// Cilium's entity names, as the CRD's enum lists them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CiliumEntity {
    All,
    World,
    #[serde(rename = "world-ipv4")]
    WorldIpv4,
    #[serde(rename = "world-ipv6")]
    WorldIpv6,
    Cluster,
    Host,
    RemoteNode,
    KubeApiserver,
    Ingress,
    Health,
    Init,
    Unmanaged,
    None,
}

/// A `toPorts` entry.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PortRule {
    #[serde(default)]
    pub ports: Option<Vec<PortProtocol>>,
    /// L7 rules (`http`, `kafka`, `dns`, `l7proto`/`l7`): judged only at L3/L4.
    #[serde(default)]
    pub rules: Option<L7Rules>,
    #[serde(default, rename = "terminatingTLS")]
    pub terminating_tls: Option<serde_json::Value>,
    #[serde(default, rename = "originatingTLS")]
    pub originating_tls: Option<serde_json::Value>,
    #[serde(default)]
    pub server_names: Option<Vec<String>>,
    #[serde(default)]
    pub listener: Option<serde_json::Value>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct L7Rules {
    #[serde(default)]
    pub http: Option<Vec<serde_json::Value>>,
    #[serde(default)]
    pub kafka: Option<Vec<serde_json::Value>>,
    #[serde(default)]
    pub dns: Option<Vec<serde_json::Value>>,
    #[serde(default, rename = "l7proto")]
    pub l7proto: Option<String>,
    #[serde(default)]
    pub l7: Option<Vec<serde_json::Value>>,
}

impl L7Rules {
    /// The L7 protocols named, for explanations (`http`, `dns`, ...).
    pub(super) fn kinds(&self) -> Vec<String> {
        let Self {
            http,
            kafka,
            dns,
            l7proto,
            l7: _,
        } = self;
        let mut kinds = Vec::new();
        if http.is_some() {
            kinds.push("http".to_owned());
        }
        if kafka.is_some() {
            kinds.push("kafka".to_owned());
        }
        if dns.is_some() {
            kinds.push("dns".to_owned());
        }
        if let Some(proto) = l7proto {
            kinds.push(proto.clone());
        }
        kinds
    }
}

/// One port of a `toPorts` entry. Cilium's `port` is a string: a number or a port name.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PortProtocol {
    #[serde(default)]
    pub port: Option<String>,
    #[serde(default)]
    pub end_port: Option<i32>,
    #[serde(default)]
    pub protocol: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct IcmpRule {
    #[serde(default)]
    pub fields: Option<Vec<IcmpField>>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct IcmpField {
    #[serde(default)]
    pub family: Option<String>,
    #[serde(rename = "type")]
    pub icmp_type: IcmpType,
}

/// ICMP type: a number or one of Cilium's names (`EchoRequest`, ...).
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum IcmpType {
    Number(u8),
    Name(String),
}
