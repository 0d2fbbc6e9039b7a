//! The one place that maps a policy kind to its API resource and its compiler. The sources (the
//! Kubernetes watch, snapshot files, policy directories), `check` and the RBAC the deployment
//! grants all read this table: a new policy kind is a new row (and its [`PolicyKind`] variant).

use k8s_openapi::api::networking::v1 as networking;

use super::cilium::{self, CiliumPolicy};
use super::ir::{CompileError, CompiledPolicy, PolicyKind};
use super::netpol;
use crate::decode::{self, DecodeError, Document, Strictness};

/// A policy object that could not be read or compiled.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// Not the object its kind says (a wrong type, an unknown field read strictly); the line is
    /// within the document when known.
    #[error(transparent)]
    Decode(DecodeError),
    /// Read, but it says something the model cannot take (a bad CIDR, an unknown entity).
    #[error(transparent)]
    Compile(CompileError),
}

impl PolicyError {
    /// The line within the document, when known.
    #[must_use]
    pub const fn line(&self) -> Option<usize> {
        match self {
            Self::Decode(e) => e.line,
            Self::Compile(_) => None,
        }
    }
}

type Compile = fn(Document<'_>, Strictness) -> Result<CompiledPolicy, PolicyError>;

/// One policy kind: where the API serves it and how it is compiled.
#[derive(Clone, Copy, Debug)]
pub struct PolicyKindInfo {
    pub kind: PolicyKind,
    /// API group (`""` for the core group, which holds no policy kind).
    pub group: &'static str,
    pub version: &'static str,
    /// The resource name, for the watch and the RBAC rules.
    pub plural: &'static str,
    pub namespaced: bool,
    /// Defined by a CRD that a cluster may not have (the watch then waits for it quietly).
    pub optional: bool,
    compile: Compile,
}

impl PolicyKindInfo {
    /// `group/version`, as `apiVersion` writes it.
    #[must_use]
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_owned()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// Reads and compiles one object of this kind.
    ///
    /// # Errors
    /// When the document is not such an object, or its content cannot be compiled.
    pub fn compile(
        &self,
        document: Document<'_>,
        strictness: Strictness,
    ) -> Result<CompiledPolicy, PolicyError> {
        (self.compile)(document, strictness)
    }
}

/// Unknown fields matter under the spec only: `status`, `apiVersion` and the rest of the
/// envelope are not policy.
const SPEC_SCOPES: &[&str] = &["spec", "specs"];

fn network_policy(
    document: Document<'_>,
    strictness: Strictness,
) -> Result<CompiledPolicy, PolicyError> {
    let decoded = decode::decode::<networking::NetworkPolicy>(document, strictness, SPEC_SCOPES)
        .map_err(PolicyError::Decode)?;
    netpol::compile(&decoded.object)
        .map(|p| p.with_unknown_fields(decoded.unknown))
        .map_err(PolicyError::Compile)
}

fn cilium_policy(
    kind: PolicyKind,
    document: Document<'_>,
    strictness: Strictness,
) -> Result<CompiledPolicy, PolicyError> {
    let decoded = decode::decode::<CiliumPolicy>(document, strictness, SPEC_SCOPES)
        .map_err(PolicyError::Decode)?;
    cilium::compile(kind, &decoded.object)
        .map(|p| p.with_unknown_fields(decoded.unknown))
        .map_err(PolicyError::Compile)
}

/// Every policy kind the model knows, in [`PolicyKind::ALL`] order.
pub static POLICY_KINDS: [PolicyKindInfo; 3] = [
    PolicyKindInfo {
        kind: PolicyKind::NetworkPolicy,
        group: "networking.k8s.io",
        version: "v1",
        plural: "networkpolicies",
        namespaced: true,
        optional: false,
        compile: network_policy,
    },
    PolicyKindInfo {
        kind: PolicyKind::CiliumNetworkPolicy,
        group: "cilium.io",
        version: "v2",
        plural: "ciliumnetworkpolicies",
        namespaced: true,
        optional: true,
        compile: |document, strictness| {
            cilium_policy(PolicyKind::CiliumNetworkPolicy, document, strictness)
        },
    },
    PolicyKindInfo {
        kind: PolicyKind::CiliumClusterwideNetworkPolicy,
        group: "cilium.io",
        version: "v2",
        plural: "ciliumclusterwidenetworkpolicies",
        namespaced: false,
        optional: true,
        compile: |document, strictness| {
            cilium_policy(
                PolicyKind::CiliumClusterwideNetworkPolicy,
                document,
                strictness,
            )
        },
    },
];

impl PolicyKind {
    /// This kind's row of [`POLICY_KINDS`].
    #[must_use]
    pub fn info(self) -> &'static PolicyKindInfo {
        &POLICY_KINDS[self.index()]
    }
}

/// The policy kind an object of `kind` and `api_version` is (`None` for any other object). An
/// object without `apiVersion` is taken at its `kind` alone.
#[must_use]
pub fn find(kind: &str, api_version: Option<&str>) -> Option<&'static PolicyKindInfo> {
    POLICY_KINDS
        .iter()
        .find(|row| row.kind.as_str() == kind && api_version.is_none_or(|v| v == row.api_version()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_follow_the_kinds() {
        assert_eq!(POLICY_KINDS.len(), PolicyKind::ALL.len());
        for (i, kind) in PolicyKind::ALL.into_iter().enumerate() {
            assert_eq!(kind.index(), i, "{kind} is at its place in ALL");
            assert_eq!(kind.info().kind, kind, "row of {kind}");
            let row = find(kind.as_str(), Some(&kind.info().api_version()));
            assert_eq!(row.map(|r| r.kind), Some(kind));
        }
        assert!(find("NetworkPolicy", Some("crd.projectcalico.org/v1")).is_none());
        assert!(find("Pod", Some("v1")).is_none());
    }

    #[test]
    fn strict_rejects_and_lenient_keeps_unknown_fields() {
        let text = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
                    metadata: {name: a, namespace: n}\n\
                    spec:\n  podSelector: {}\n  ingress:\n  - from: [{podSelector: {}}]\n    \
                    newPeerKind: {x: 1}\n  newSpecField: true\n";
        let row = PolicyKind::NetworkPolicy.info();
        let err = row
            .compile(Document::Yaml(text), Strictness::Strict)
            .err()
            .unwrap_or_else(|| panic!("strict accepted unknown fields"));
        assert!(
            err.to_string().contains("spec.ingress[0].newPeerKind"),
            "{err}"
        );
        let policy = row
            .compile(Document::Yaml(text), Strictness::Lenient)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            policy.unknown,
            ["spec.ingress[0].newPeerKind", "spec.newSpecField"]
        );
        // The rule with the unknown field is never matched by itself.
        assert!(
            matches!(&policy.rules[0].peers, super::super::ir::Peers::List(p)
                if matches!(p.as_slice(), [super::super::ir::Peer::Unjudgeable(_)])),
            "{:?}",
            policy.rules[0].peers
        );
    }
}
