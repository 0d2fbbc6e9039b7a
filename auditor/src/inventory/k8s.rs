//! Kubernetes objects (k8s-openapi types) turned into inventory facts. Pure: shared by the file
//! loader and the API watcher. A field the model needs that holds nonsense is an error naming
//! the object and the field, never a silent skip.

use std::net::IpAddr;

use ipnet::IpNet;
use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::discovery::v1 as discovery;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{
    Endpoint, EndpointPort, EndpointSlice, Namespace, Node, Pod, Service, ServicePort, TargetPort,
    Workload,
};
use crate::vocab::{CILIUM_SERVICE_ACCOUNT_LABEL, ContainerPort, Labels, Protocol};

/// A Kubernetes object whose content the model cannot use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind} {object}: {field}: {reason}")]
pub struct ObjectError {
    pub kind: &'static str,
    /// `namespace/name` or `name`.
    pub object: String,
    pub field: String,
    pub reason: String,
}

fn object_name(meta: &ObjectMeta) -> String {
    let name = meta.name.as_deref().unwrap_or("<unnamed>");
    match meta.namespace.as_deref() {
        Some(ns) if !ns.is_empty() => format!("{ns}/{name}"),
        _ => name.to_owned(),
    }
}

struct Ctx<'a> {
    kind: &'static str,
    meta: &'a ObjectMeta,
}

impl Ctx<'_> {
    fn err(&self, field: impl Into<String>, reason: impl Into<String>) -> ObjectError {
        ObjectError {
            kind: self.kind,
            object: object_name(self.meta),
            field: field.into(),
            reason: reason.into(),
        }
    }

    fn name(&self) -> Result<String, ObjectError> {
        match self.meta.name.as_deref() {
            Some(n) if !n.is_empty() => Ok(n.to_owned()),
            _ => Err(self.err("metadata.name", "missing")),
        }
    }

    /// Objects from `kubectl get -o yaml` always carry a namespace; hand-written ones may not,
    /// and `kubectl apply` would put them in `default`.
    fn namespace(&self) -> String {
        match self.meta.namespace.as_deref() {
            Some(ns) if !ns.is_empty() => ns.to_owned(),
            _ => "default".to_owned(),
        }
    }

    fn ip(&self, field: impl Into<String>, text: &str) -> Result<IpAddr, ObjectError> {
        text.trim()
            .parse()
            .map_err(|_| self.err(field, format!("{text:?} is not an IP address")))
    }

    fn port(&self, field: impl Into<String>, value: i32) -> Result<u16, ObjectError> {
        u16::try_from(value)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| self.err(field, format!("port {value} is not in 1-65535")))
    }

    fn protocol(
        &self,
        field: impl Into<String>,
        value: Option<&str>,
    ) -> Result<Protocol, ObjectError> {
        match value {
            None => Ok(Protocol::Tcp),
            Some(p) => match p {
                "TCP" => Ok(Protocol::Tcp),
                "UDP" => Ok(Protocol::Udp),
                "SCTP" => Ok(Protocol::Sctp),
                other => Err(self.err(field, format!("unknown protocol {other:?}"))),
            },
        }
    }
}

fn labels(meta: &ObjectMeta) -> Labels {
    meta.labels
        .iter()
        .flatten()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect()
}

pub fn namespace(object: &core::Namespace) -> Result<Namespace, ObjectError> {
    let ctx = Ctx {
        kind: "Namespace",
        meta: &object.metadata,
    };
    Ok(Namespace {
        name: ctx.name()?,
        labels: labels(&object.metadata),
    })
}

/// Strips the pod-template-hash a Deployment appends to its `ReplicaSets`' names.
fn deployment_of_replicaset(replicaset: &str, pod_labels: &Labels) -> Option<String> {
    if let Some(hash) = pod_labels.get("pod-template-hash") {
        return replicaset
            .strip_suffix(hash)
            .and_then(|s| s.strip_suffix('-'))
            .map(str::to_owned);
    }
    // Without the label, a trailing hash segment of ReplicaSet-like shape is the best evidence.
    let (base, suffix) = replicaset.rsplit_once('-')?;
    let hashlike = (5..=10).contains(&suffix.len())
        && suffix
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    hashlike.then(|| base.to_owned())
}

fn workload(meta: &ObjectMeta, pod_name: &str, pod_labels: &Labels) -> Workload {
    let owner = meta
        .owner_references
        .as_deref()
        .unwrap_or_default()
        .iter()
        .find(|o| o.controller == Some(true))
        .or_else(|| meta.owner_references.as_deref().unwrap_or_default().first());
    match owner {
        Some(o) if o.kind == "ReplicaSet" => match deployment_of_replicaset(&o.name, pod_labels) {
            Some(deployment) => Workload {
                kind: "Deployment".to_owned(),
                name: deployment,
            },
            None => Workload {
                kind: "ReplicaSet".to_owned(),
                name: o.name.clone(),
            },
        },
        Some(o) if o.kind == "Job" => {
            // CronJob jobs are named `<cronjob>-<schedule time>`; the time suffix is unbounded.
            match o.name.rsplit_once('-') {
                Some((base, t)) if t.len() >= 8 && t.chars().all(|c| c.is_ascii_digit()) => {
                    Workload {
                        kind: "CronJob".to_owned(),
                        name: base.to_owned(),
                    }
                }
                _ => Workload {
                    kind: "Job".to_owned(),
                    name: o.name.clone(),
                },
            }
        }
        Some(o) => Workload {
            kind: o.kind.clone(),
            name: o.name.clone(),
        },
        None => Workload {
            kind: "Pod".to_owned(),
            name: pod_name.to_owned(),
        },
    }
}

pub fn pod(object: &core::Pod) -> Result<Pod, ObjectError> {
    let ctx = Ctx {
        kind: "Pod",
        meta: &object.metadata,
    };
    let name = ctx.name()?;
    let pod_labels = labels(&object.metadata);
    let spec = object.spec.as_ref();
    let mut ports = Vec::new();
    if let Some(spec) = spec {
        // Sidecars (restartable init containers) can serve ports too.
        let containers = spec.containers.iter().map(|c| ("containers", c)).chain(
            spec.init_containers
                .as_deref()
                .unwrap_or_default()
                .iter()
                .map(|c| ("initContainers", c)),
        );
        for (ci, (list, container)) in containers.enumerate() {
            for (pi, port) in container
                .ports
                .as_deref()
                .unwrap_or_default()
                .iter()
                .enumerate()
            {
                let field = format!("spec.{list}[{ci}].ports[{pi}]");
                ports.push(ContainerPort {
                    name: port.name.clone(),
                    port: ctx.port(format!("{field}.containerPort"), port.container_port)?,
                    protocol: ctx
                        .protocol(format!("{field}.protocol"), port.protocol.as_deref())?,
                });
            }
        }
    }
    ports.sort();
    ports.dedup();
    let mut ips = Vec::new();
    if let Some(status) = &object.status {
        if let Some(list) = &status.pod_ips {
            for (i, ip) in list.iter().enumerate() {
                ips.push(ctx.ip(format!("status.podIPs[{i}].ip"), &ip.ip)?);
            }
        }
        if let Some(ip) = &status.pod_ip {
            let ip = ctx.ip("status.podIP", ip)?;
            if !ips.contains(&ip) {
                ips.insert(0, ip);
            }
        }
    }
    let workload = workload(&object.metadata, &name, &pod_labels);
    let mut pod_labels = pod_labels;
    let service_account = spec
        .and_then(|s| s.service_account_name.as_deref())
        .filter(|sa| !sa.is_empty())
        .unwrap_or("default");
    pod_labels.insert(CILIUM_SERVICE_ACCOUNT_LABEL, service_account);
    Ok(Pod {
        namespace: ctx.namespace(),
        workload,
        name,
        labels: pod_labels,
        node: spec.and_then(|s| s.node_name.clone()),
        host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
        // Kept for the pod's life; most pods have one address and a port or two.
        ips: shrunk(ips),
        ports: shrunk(ports),
    })
}

fn shrunk<T>(mut items: Vec<T>) -> Vec<T> {
    items.shrink_to_fit();
    items
}

pub fn node(object: &core::Node) -> Result<Node, ObjectError> {
    let ctx = Ctx {
        kind: "Node",
        meta: &object.metadata,
    };
    let mut addresses = Vec::new();
    if let Some(list) = object.status.as_ref().and_then(|s| s.addresses.as_ref()) {
        for (i, a) in list.iter().enumerate() {
            if a.type_ == "InternalIP" || a.type_ == "ExternalIP" {
                addresses.push(ctx.ip(format!("status.addresses[{i}].address"), &a.address)?);
            }
        }
    }
    let mut pod_cidrs = Vec::new();
    if let Some(spec) = &object.spec {
        let listed = spec.pod_cidrs.as_deref().unwrap_or_default();
        for (i, c) in listed.iter().enumerate() {
            pod_cidrs.push(parse_cidr(&ctx, format!("spec.podCIDRs[{i}]"), c)?);
        }
        if let Some(c) = &spec.pod_cidr {
            let net = parse_cidr(&ctx, "spec.podCIDR", c)?;
            if !pod_cidrs.contains(&net) {
                pod_cidrs.push(net);
            }
        }
    }
    Ok(Node {
        name: ctx.name()?,
        addresses,
        pod_cidrs,
    })
}

fn parse_cidr(ctx: &Ctx<'_>, field: impl Into<String>, text: &str) -> Result<IpNet, ObjectError> {
    text.trim()
        .parse()
        .map_err(|_| ctx.err(field, format!("{text:?} is not a CIDR")))
}

pub fn service(object: &core::Service) -> Result<Service, ObjectError> {
    let ctx = Ctx {
        kind: "Service",
        meta: &object.metadata,
    };
    let mut cluster_ips = Vec::new();
    let mut ports = Vec::new();
    let mut selector = None;
    if let Some(spec) = &object.spec {
        let listed = spec.cluster_ips.iter().flatten().map(String::as_str);
        for (i, text) in spec
            .cluster_ip
            .as_deref()
            .into_iter()
            .chain(listed)
            .enumerate()
        {
            // "None" marks a headless Service; "" one that has no address yet.
            if text.is_empty() || text == "None" {
                continue;
            }
            let field = if i == 0 {
                "spec.clusterIP".to_owned()
            } else {
                format!("spec.clusterIPs[{}]", i - 1)
            };
            let ip = ctx.ip(field, text)?;
            if !cluster_ips.contains(&ip) {
                cluster_ips.push(ip);
            }
        }
        for (i, p) in spec.ports.as_deref().unwrap_or_default().iter().enumerate() {
            let field = format!("spec.ports[{i}]");
            let port = ctx.port(format!("{field}.port"), p.port)?;
            let target = match &p.target_port {
                None => TargetPort::Number(port),
                Some(IntOrString::Int(n)) => {
                    TargetPort::Number(ctx.port(format!("{field}.targetPort"), *n)?)
                }
                Some(IntOrString::String(s)) => match s.parse::<i32>() {
                    Ok(n) => TargetPort::Number(ctx.port(format!("{field}.targetPort"), n)?),
                    Err(_) => TargetPort::Name(s.clone()),
                },
            };
            ports.push(ServicePort {
                name: p.name.clone(),
                port,
                protocol: ctx.protocol(format!("{field}.protocol"), p.protocol.as_deref())?,
                target,
            });
        }
        selector = spec
            .selector
            .clone()
            .filter(|s| !s.is_empty())
            .map(Labels::from);
    }
    Ok(Service {
        namespace: ctx.namespace(),
        name: ctx.name()?,
        cluster_ips,
        ports,
        selector,
    })
}

pub fn endpoint_slice(object: &discovery::EndpointSlice) -> Result<EndpointSlice, ObjectError> {
    let ctx = Ctx {
        kind: "EndpointSlice",
        meta: &object.metadata,
    };
    let service = object
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get("kubernetes.io/service-name"))
        .cloned()
        .ok_or_else(|| {
            ctx.err(
                "metadata.labels",
                "no kubernetes.io/service-name label: which Service is this for?",
            )
        })?;
    let mut ports = Vec::new();
    for (i, p) in object
        .ports
        .as_deref()
        .unwrap_or_default()
        .iter()
        .enumerate()
    {
        let field = format!("ports[{i}]");
        // A port without a number means "all ports" and is only used by headless Services.
        let Some(number) = p.port else { continue };
        ports.push(EndpointPort {
            name: p.name.clone().filter(|n| !n.is_empty()),
            port: ctx.port(format!("{field}.port"), number)?,
            protocol: ctx.protocol(format!("{field}.protocol"), p.protocol.as_deref())?,
        });
    }
    let mut endpoints = Vec::new();
    // FQDN slices carry names, not addresses: nothing to judge by address.
    if object.address_type != "FQDN" {
        for (i, e) in object.endpoints.iter().enumerate() {
            let mut addresses = Vec::new();
            for (j, a) in e.addresses.iter().enumerate() {
                addresses.push(ctx.ip(format!("endpoints[{i}].addresses[{j}]"), a)?);
            }
            // The API's rule: a missing `ready` condition means ready.
            let ready = e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true);
            endpoints.push(Endpoint { addresses, ready });
        }
    }
    Ok(EndpointSlice {
        namespace: ctx.namespace(),
        name: ctx.name()?,
        service,
        ports,
        endpoints,
    })
}

/// A legacy Endpoints object as one `EndpointSlice` per subset (named `<service>.endpoints-<i>`
/// so it never collides with a real slice).
pub fn endpoints(object: &core::Endpoints) -> Result<Vec<EndpointSlice>, ObjectError> {
    let ctx = Ctx {
        kind: "Endpoints",
        meta: &object.metadata,
    };
    let service = ctx.name()?;
    let mut out = Vec::new();
    for (i, subset) in object
        .subsets
        .as_deref()
        .unwrap_or_default()
        .iter()
        .enumerate()
    {
        let mut ports = Vec::new();
        for (j, p) in subset
            .ports
            .as_deref()
            .unwrap_or_default()
            .iter()
            .enumerate()
        {
            let field = format!("subsets[{i}].ports[{j}]");
            ports.push(EndpointPort {
                name: p.name.clone().filter(|n| !n.is_empty()),
                port: ctx.port(format!("{field}.port"), p.port)?,
                protocol: ctx.protocol(format!("{field}.protocol"), p.protocol.as_deref())?,
            });
        }
        let mut endpoints = Vec::new();
        for (list, ready) in [
            (subset.addresses.as_deref(), true),
            (subset.not_ready_addresses.as_deref(), false),
        ] {
            for (j, a) in list.unwrap_or_default().iter().enumerate() {
                let field = if ready {
                    "addresses"
                } else {
                    "notReadyAddresses"
                };
                let ip = ctx.ip(format!("subsets[{i}].{field}[{j}].ip"), &a.ip)?;
                endpoints.push(Endpoint {
                    addresses: vec![ip],
                    ready,
                });
            }
        }
        out.push(EndpointSlice {
            namespace: ctx.namespace(),
            name: format!("{service}.endpoints-{i}"),
            service: service.clone(),
            ports,
            endpoints,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod_with_owner(name: &str, labels: &[(&str, &str)], owner: Option<(&str, &str)>) -> Pod {
        let owner = owner.map(|(kind, name)| {
            serde_json::json!([{"apiVersion": "apps/v1", "kind": kind, "name": name,
                                "uid": "u", "controller": true}])
        });
        let labels: serde_json::Map<String, serde_json::Value> = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), serde_json::Value::from(*v)))
            .collect();
        let object: core::Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": "ns", "labels": labels,
                         "ownerReferences": owner},
            "spec": {"containers": [{"name": "c", "ports": [
                {"name": "http", "containerPort": 8080}, {"containerPort": 53, "protocol": "UDP"}]}]},
            "status": {"podIP": "10.0.0.1", "podIPs": [{"ip": "10.0.0.1"}, {"ip": "fd00::1"}]}
        }))
        .unwrap_or_else(|e| panic!("fixture: {e}"));
        pod(&object).unwrap_or_else(|e| panic!("conversion: {e}"))
    }

    fn workload_of(p: &Pod) -> (&str, &str) {
        (p.workload.kind.as_str(), p.workload.name.as_str())
    }

    #[test]
    fn workloads_from_owner_references() {
        let p = pod_with_owner(
            "web-7d9c6b5f4-abcde",
            &[("pod-template-hash", "7d9c6b5f4")],
            Some(("ReplicaSet", "web-7d9c6b5f4")),
        );
        assert_eq!(workload_of(&p), ("Deployment", "web"));
        // Without the hash label a hash-shaped suffix is still stripped ...
        let p = pod_with_owner("api-x", &[], Some(("ReplicaSet", "api-server-5f6d7c8b9")));
        assert_eq!(workload_of(&p), ("Deployment", "api-server"));
        // ... but a ReplicaSet of its own keeps its name.
        let p = pod_with_owner("rs-x", &[], Some(("ReplicaSet", "legacy-Frontend")));
        assert_eq!(workload_of(&p), ("ReplicaSet", "legacy-Frontend"));
        let p = pod_with_owner("db-0", &[], Some(("StatefulSet", "db")));
        assert_eq!(workload_of(&p), ("StatefulSet", "db"));
        let p = pod_with_owner("backup-29000000-xyz", &[], Some(("Job", "backup-29000000")));
        assert_eq!(workload_of(&p), ("CronJob", "backup"));
        let p = pod_with_owner("migrate-abc", &[], Some(("Job", "migrate")));
        assert_eq!(workload_of(&p), ("Job", "migrate"));
        let p = pod_with_owner("debug", &[], None);
        assert_eq!(workload_of(&p), ("Pod", "debug"));
    }

    #[test]
    fn pod_addresses_and_ports() {
        let p = pod_with_owner("p", &[], None);
        assert_eq!(p.ips.len(), 2, "{:?}", p.ips);
        assert!(p.ips.iter().any(IpAddr::is_ipv6));
        assert!(p.ports.contains(&ContainerPort {
            name: Some("http".to_owned()),
            port: 8080,
            protocol: Protocol::Tcp,
        }));
        assert!(
            p.ports
                .iter()
                .any(|c| c.port == 53 && c.protocol == Protocol::Udp)
        );
    }

    #[test]
    fn bad_addresses_name_the_field() {
        let object: core::Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "namespace": "ns"},
            "status": {"podIP": "10.0.0.300"}
        }))
        .unwrap_or_else(|e| panic!("fixture: {e}"));
        let err = pod(&object)
            .err()
            .unwrap_or_else(|| panic!("accepted a bad IP"));
        assert_eq!(err.field, "status.podIP");
        assert_eq!(err.object, "ns/p");
        let slice: discovery::EndpointSlice = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "s", "namespace": "ns"},
            "addressType": "IPv4", "endpoints": []
        }))
        .unwrap_or_else(|e| panic!("fixture: {e}"));
        let err = endpoint_slice(&slice)
            .err()
            .unwrap_or_else(|| panic!("accepted a slice without its Service"));
        assert_eq!(err.field, "metadata.labels");
    }
}
