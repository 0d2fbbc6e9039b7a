//! Label selectors: matching label sets, and reading Kubernetes' `LabelSelector` into the IR.
//! Shared by every compiler, so `matchExpressions` mean the same in `NetworkPolicy` and Cilium.

use k8s_openapi::apimachinery::pkg::apis::meta::v1 as meta;

use super::ir::{CompileError, LabelSelector, NamespaceScope, Operator, Requirement, Subject};
use crate::vocab::Labels;

impl Requirement {
    pub fn matches(&self, labels: &Labels) -> bool {
        let value = labels.get(&self.key);
        match &self.operator {
            Operator::In(values) => value.is_some_and(|v| values.iter().any(|x| x == v)),
            Operator::NotIn(values) => value.is_none_or(|v| values.iter().all(|x| x != v)),
            Operator::Exists => value.is_some(),
            Operator::DoesNotExist => value.is_none(),
        }
    }
}

impl LabelSelector {
    /// The selector that selects everything.
    pub fn everything() -> Self {
        Self::default()
    }

    pub fn matches(&self, labels: &Labels) -> bool {
        self.requirements.iter().all(|r| r.matches(labels))
    }

    /// `matchLabels` and `matchExpressions` as requirements; `field` prefixes error paths.
    pub fn from_k8s(selector: &meta::LabelSelector, field: &str) -> Result<Self, CompileError> {
        let mut requirements = Vec::new();
        for (key, value) in selector.match_labels.iter().flatten() {
            requirements.push(Requirement {
                key: key.clone(),
                operator: Operator::In(vec![value.clone()]),
            });
        }
        for (i, expr) in selector.match_expressions.iter().flatten().enumerate() {
            let at = format!("{field}.matchExpressions[{i}]");
            let values = expr.values.clone().unwrap_or_default();
            let operator = match expr.operator.as_str() {
                "In" | "NotIn" if values.is_empty() => {
                    return Err(CompileError {
                        field: format!("{at}.values"),
                        reason: format!("operator {} needs at least one value", expr.operator),
                    });
                }
                "In" => Operator::In(values),
                "NotIn" => Operator::NotIn(values),
                "Exists" | "DoesNotExist" if !values.is_empty() => {
                    return Err(CompileError {
                        field: format!("{at}.values"),
                        reason: format!("operator {} takes no values", expr.operator),
                    });
                }
                "Exists" => Operator::Exists,
                "DoesNotExist" => Operator::DoesNotExist,
                other => {
                    return Err(CompileError {
                        field: format!("{at}.operator"),
                        reason: format!(
                            "unknown operator {other:?} (In, NotIn, Exists, DoesNotExist)"
                        ),
                    });
                }
            };
            requirements.push(Requirement {
                key: expr.key.clone(),
                operator,
            });
        }
        // Policies are kept for as long as they exist; most selectors have one requirement.
        requirements.shrink_to_fit();
        Ok(Self { requirements })
    }
}

impl NamespaceScope {
    /// `labels` are the namespace's labels (with its name label).
    pub fn matches(&self, namespace: &str, labels: &Labels) -> bool {
        match self {
            Self::All => true,
            Self::Named(name) => name == namespace,
            Self::Selector(selector) => selector.matches(labels),
            Self::NamedAndSelector(name, selector) => name == namespace && selector.matches(labels),
        }
    }
}

impl Subject {
    pub fn matches(&self, namespace: &str, namespace_labels: &Labels, pod_labels: &Labels) -> bool {
        self.namespaces.matches(namespace, namespace_labels) && self.pods.matches(pod_labels)
    }
}
