//! Which pods back a Service: the ready endpoints (address, translated port) of each Service
//! port, from its `EndpointSlices`, or from its selector and the pods' container ports when it has
//! none (snapshots often carry no slices). Kept per Service and rebuilt after a change, since
//! every flow to a `ClusterIP` needs them.

use std::borrow::Cow;
use std::net::IpAddr;

use rustc_hash::FxHashMap;

use super::{Inventory, Service, ServiceId, ServicePort, TargetPort};
use crate::vocab::ObjectKey;

/// Ready endpoints per Service port (in the Service's port order), valid until the next change.
#[derive(Clone, Debug, Default)]
pub struct ServiceEndpoints {
    per_service: FxHashMap<ServiceId, Vec<Vec<(IpAddr, u16)>>>,
    stale: bool,
}

impl ServiceEndpoints {
    pub(super) fn mark_stale(&mut self) {
        self.stale = true;
    }
}

impl Inventory {
    /// Rebuilds what changes left stale; until then, [`Inventory::service_endpoints`] computes
    /// on every call.
    pub fn refresh(&mut self) {
        if !self.endpoints.stale {
            return;
        }
        let mut per_service = FxHashMap::default();
        for (id, service) in self.services() {
            let per_port = service
                .ports
                .iter()
                .map(|p| self.compute_endpoints(service, p))
                .collect();
            per_service.insert(id, per_port);
        }
        self.endpoints = ServiceEndpoints {
            per_service,
            stale: false,
        };
    }

    /// The ready endpoints of the Service's port number `index` (its place in `ports`).
    #[must_use]
    pub fn service_endpoints(&self, id: ServiceId, index: usize) -> Cow<'_, [(IpAddr, u16)]> {
        if !self.endpoints.stale
            && let Some(per_port) = self.endpoints.per_service.get(&id)
        {
            return Cow::Borrowed(per_port.get(index).map_or(&[], Vec::as_slice));
        }
        match self
            .service(id)
            .and_then(|s| Some((s, s.ports.get(index)?)))
        {
            Some((service, port)) => Cow::Owned(self.compute_endpoints(service, port)),
            None => Cow::Borrowed(&[]),
        }
    }

    fn compute_endpoints(&self, service: &Service, port: &ServicePort) -> Vec<(IpAddr, u16)> {
        let mut out = Vec::new();
        if let Some(slices) = self.endpoint_slices(&service.key()) {
            for slice in slices {
                let slice_port = slice.ports.iter().find(|p| {
                    p.protocol == port.protocol
                        && match (&p.name, &port.name) {
                            (Some(a), Some(b)) => a == b,
                            (None, None) => true,
                            // A single unnamed Service port may meet a slice port named "".
                            (a, b) => a.as_deref().unwrap_or("") == b.as_deref().unwrap_or(""),
                        }
                });
                let Some(slice_port) = slice_port else {
                    continue;
                };
                for e in slice.endpoints.iter().filter(|e| e.ready) {
                    for &ip in &e.addresses {
                        out.push((ip, slice_port.port));
                    }
                }
            }
        } else if let Some(selector) = &service.selector {
            for (_, pod) in self.pods_in_namespace(&service.namespace) {
                if !pod.labels.contains_all(selector.iter()) {
                    continue;
                }
                let target = match &port.target {
                    TargetPort::Number(n) => Some(*n),
                    TargetPort::Name(name) => pod
                        .ports
                        .iter()
                        .find(|c| c.name.as_deref() == Some(name) && c.protocol == port.protocol)
                        .map(|c| c.port),
                };
                if let Some(target) = target {
                    for &ip in &pod.ips {
                        out.push((ip, target));
                    }
                }
            }
        }
        out.sort_unstable();
        out.dedup();
        out
    }

    /// Whether `ip` is a ready endpoint address of the Service `key`: the endpoint a `ClusterIP`
    /// flow was translated to, when both records are seen.
    #[must_use]
    pub fn is_endpoint_of(&self, key: &ObjectKey, ip: IpAddr) -> bool {
        if let Some(slices) = self.endpoint_slices(key) {
            return slices
                .iter()
                .flat_map(|s| s.endpoints.iter())
                .any(|e| e.ready && e.addresses.contains(&ip));
        }
        // No slices (a snapshot without them): the Service's selector picks its pods.
        let Some(selector) = self
            .service_id(key)
            .and_then(|id| self.service(id))
            .and_then(|s| s.selector.as_ref())
        else {
            return false;
        };
        self.pods_in_namespace(&key.namespace)
            .any(|(_, pod)| pod.ips.contains(&ip) && pod.labels.contains_all(selector.iter()))
    }

    /// The one workload every ready endpoint of a Service runs, if there is exactly one (so a
    /// `ClusterIP` flow's series matches the one its translated flow gets).
    #[must_use]
    pub fn endpoint_workload(&self, key: &ObjectKey) -> Option<&str> {
        let slices = self.endpoint_slices(key)?;
        let mut workload: Option<&str> = None;
        for ip in slices
            .iter()
            .flat_map(|s| s.endpoints.iter())
            .filter(|e| e.ready)
            .flat_map(|e| e.addresses.iter())
        {
            let Some(super::Owner::Pod(id)) = self.owner(*ip) else {
                return None;
            };
            let this = self.pod(id)?.workload.name.as_str();
            match workload {
                Some(w) if w != this => return None,
                _ => workload = Some(this),
            }
        }
        workload
    }
}
