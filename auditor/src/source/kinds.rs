//! How an object of each kind becomes changes, for every source alike: inventory kinds through
//! [`crate::inventory::k8s`], policy kinds through the policy store's kind table
//! ([`crate::policy::kinds`]). The file loader and the Kubernetes watch both come here, so an
//! object means the same whichever source brought it.

use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::discovery::v1 as discovery;
use serde::de::DeserializeOwned;

use super::Change;
use crate::decode::{self, Document, Strictness};
use crate::inventory::k8s::{self, ObjectError};
use crate::policy::kinds::{self as policy_kinds, PolicyKindInfo};
use crate::vocab::ObjectKey;

/// A Kubernetes object the inventory is made of.
pub trait InventoryObject: DeserializeOwned {
    /// The changes this object stands for.
    ///
    /// # Errors
    /// When a field the inventory needs holds nonsense (the error names the field).
    fn changes(&self) -> Result<Vec<Change>, ObjectError>;
}

impl InventoryObject for core::Namespace {
    fn changes(&self) -> Result<Vec<Change>, ObjectError> {
        Ok(vec![Change::Namespace(k8s::namespace(self)?)])
    }
}

impl InventoryObject for core::Node {
    fn changes(&self) -> Result<Vec<Change>, ObjectError> {
        Ok(vec![Change::Node(k8s::node(self)?)])
    }
}

impl InventoryObject for core::Pod {
    fn changes(&self) -> Result<Vec<Change>, ObjectError> {
        // A finished pod's address goes back to the pool and may already belong to a new pod.
        let phase = self.status.as_ref().and_then(|s| s.phase.as_deref());
        if matches!(phase, Some("Succeeded" | "Failed")) {
            let meta = &self.metadata;
            return Ok(vec![Change::PodRemoved(ObjectKey::new(
                meta.namespace
                    .as_deref()
                    .filter(|ns| !ns.is_empty())
                    .unwrap_or("default"),
                meta.name.as_deref().unwrap_or_default(),
            ))]);
        }
        Ok(vec![Change::Pod(k8s::pod(self)?)])
    }
}

impl InventoryObject for core::Service {
    fn changes(&self) -> Result<Vec<Change>, ObjectError> {
        Ok(vec![Change::Service(k8s::service(self)?)])
    }
}

impl InventoryObject for discovery::EndpointSlice {
    fn changes(&self) -> Result<Vec<Change>, ObjectError> {
        Ok(vec![Change::EndpointSlice(k8s::endpoint_slice(self)?)])
    }
}

/// Legacy Endpoints objects (snapshots of older clusters) become `EndpointSlices`.
impl InventoryObject for core::Endpoints {
    fn changes(&self) -> Result<Vec<Change>, ObjectError> {
        Ok(k8s::endpoints(self)?
            .into_iter()
            .map(Change::EndpointSlice)
            .collect())
    }
}

/// What is wrong with one object: where in its document (when known) and what.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectProblem {
    /// 1-based line within the document.
    pub line: Option<usize>,
    /// Starts with the field at fault when there is one.
    pub message: String,
}

type Read = fn(Document<'_>, Strictness) -> Result<Vec<Change>, ObjectProblem>;

fn read<T: InventoryObject>(
    document: Document<'_>,
    _strictness: Strictness,
) -> Result<Vec<Change>, ObjectProblem> {
    // Inventory objects are read leniently everywhere: a field this build does not know cannot
    // widen a policy, and `kubectl get -o yaml` of a newer cluster has plenty.
    let decoded =
        decode::decode::<T>(document, Strictness::Lenient, &[]).map_err(|e| ObjectProblem {
            line: e.line,
            message: e.message,
        })?;
    decoded.object.changes().map_err(|e| ObjectProblem {
        line: None,
        message: format!("{}: {}", e.field, e.reason),
    })
}

/// The inventory kinds a document may be, with their `apiVersion`.
const INVENTORY_KINDS: &[(&str, &str, Read)] = &[
    ("Namespace", "v1", read::<core::Namespace>),
    ("Node", "v1", read::<core::Node>),
    ("Pod", "v1", read::<core::Pod>),
    ("Service", "v1", read::<core::Service>),
    ("Endpoints", "v1", read::<core::Endpoints>),
    (
        "EndpointSlice",
        "discovery.k8s.io/v1",
        read::<discovery::EndpointSlice>,
    ),
];

/// How to read a document of some kind.
#[derive(Clone, Copy, Debug)]
pub enum Reader {
    Inventory {
        api_version: &'static str,
        read: Read,
    },
    Policy(&'static PolicyKindInfo),
}

impl Reader {
    /// The `apiVersion` of the kind (what list items may leave out).
    #[must_use]
    pub fn api_version(&self) -> String {
        match self {
            Self::Inventory { api_version, .. } => (*api_version).to_owned(),
            Self::Policy(info) => info.api_version(),
        }
    }

    #[must_use]
    pub const fn is_policy(&self) -> bool {
        matches!(self, Self::Policy(_))
    }

    /// The changes one document stands for.
    ///
    /// # Errors
    /// When it is not the object it says, or its content cannot be used.
    pub fn read(
        &self,
        document: Document<'_>,
        strictness: Strictness,
    ) -> Result<Vec<Change>, ObjectProblem> {
        match self {
            Self::Inventory { read, .. } => read(document, strictness),
            Self::Policy(info) => info
                .compile(document, strictness)
                .map(|policy| vec![Change::Policy(policy)])
                .map_err(|e| ObjectProblem {
                    line: e.line(),
                    message: e.to_string(),
                }),
        }
    }
}

/// The reader for an object of `kind` and `api_version` (`None`: a kind no store uses, or the
/// same kind name in another API group). Without `apiVersion`, the kind alone decides.
#[must_use]
pub fn reader(kind: &str, api_version: Option<&str>) -> Option<Reader> {
    if let Some(info) = policy_kinds::find(kind, api_version) {
        return Some(Reader::Policy(info));
    }
    INVENTORY_KINDS
        .iter()
        .find(|(k, v, _)| *k == kind && api_version.is_none_or(|a| a == *v))
        .map(|&(_, api_version, read)| Reader::Inventory { api_version, read })
}
