//! The attach manager: puts the TC program on ingress and egress of every interface whose name
//! matches the configured globs, first in the TCX chain (falling back to a clsact filter), takes it
//! off when the interface goes, and on start-up removes clsact filters a crashed instance left.
//!
//! Two kinds of interface: pod interfaces (`cali*`, `lxc*`, ...) get the pod programs, uplinks
//! (the node's native and tunnel devices, by glob or as the default route's device, followed as
//! the default route moves) the uplink programs, whose hook kind is a constant of their own.
//! Where a CNI delivers packets into pods past the pod interface's egress hook (Cilium's BPF
//! host routing and tunnels hand them over with `bpf_redirect_peer` from the uplink's TC
//! ingress), the uplink's ingress is the only place such a packet is seen; where it does not,
//! the program counts a packet seen at both once.
//!
//! What survives a crash: TCX links are held only by our file descriptors (we never pin them), so
//! the kernel detaches them when the process dies, however it dies; `attach_churn` verifies it.
//! clsact filters are netlink objects that outlive the process, hence [`Attacher::remove_stale`],
//! which deletes the filters named after our programs on every matching interface. The clsact
//! qdisc itself is left in place: a CNI may share it.
//!
//! Every kernel call here acts on the network namespace of the calling thread. The attacher
//! remembers the namespace it was created in and refuses to act from any other, so a tokio worker
//! that happens to sit in another namespace can never touch that namespace's interfaces.

use std::{collections::BTreeMap, fmt, io, os::unix::fs::MetadataExt as _};

use aya::{
    programs::{
        Link as _, LinkOrder, ProgramError, SchedClassifier, TcAttachType,
        links::LinkError,
        tc::{self, NlOptions, SchedClassifierLink, TcAttach, TcError},
    },
    sys::SyscallError,
};
use serde::{Deserialize, Serialize};

use super::netlink::{Link, LinkChange};

/// Which interfaces to attach to and how.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AttachConfig {
    /// Interface name globs (`*` any run of characters, `?` one character). The defaults cover
    /// Calico, Cilium and generic veth CNIs.
    pub interfaces: Vec<String>,
    /// The node's uplinks: native and tunnel devices, by glob, or [`DEFAULT_ROUTE`] for the
    /// device(s) of the default routes. Attached at ingress and egress with the uplink
    /// programs: packets delivered into pods past their interface's egress hook, hostNetwork
    /// and external traffic.
    pub uplinks: Vec<String>,
    /// TCX when the kernel has it (6.6+), else clsact; or force one of them.
    pub mode: AttachMode,
}

impl Default for AttachConfig {
    fn default() -> Self {
        Self {
            interfaces: ["cali*", "lxc*", "veth*"].map(String::from).to_vec(),
            uplinks: Vec::new(),
            mode: AttachMode::Auto,
        }
    }
}

/// The entry of [`AttachConfig::uplinks`] that names the device(s) of the namespace's default
/// routes rather than a name: `:` is not allowed in interface names, so no interface is called
/// this.
pub const DEFAULT_ROUTE: &str = ":default-route";

/// The uplinks of Cilium (its tunnel devices, and the default route's device, where its BPF host
/// routing delivers packets from other nodes and the world).
pub const CILIUM_UPLINKS: [&str; 4] =
    ["cilium_vxlan", "cilium_geneve", "cilium_wg0", DEFAULT_ROUTE];

/// How to hook the program in, as configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum AttachMode {
    /// TCX, first in the chain; clsact where TCX fails for another reason than a vanished
    /// interface (kernels before 6.6).
    #[default]
    Auto,
    Tcx,
    Clsact,
}

/// How the program is hooked in on one interface, as reported in health data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HookMode {
    Tcx,
    Clsact,
}

impl HookMode {
    pub const ALL: [Self; 2] = [Self::Tcx, Self::Clsact];

    /// Its place in [`HookMode::ALL`]: for per-mode arrays.
    #[must_use]
    pub const fn index(self) -> usize {
        self as usize
    }

    /// The `mode` label value of the attached-interfaces metric.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Tcx => "tcx",
            Self::Clsact => "clsact",
        }
    }
}

impl fmt::Display for HookMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One interface the program is attached to (both directions).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachedInterface {
    pub name: String,
    pub ifindex: u32,
    pub mode: HookMode,
    pub role: Role,
}

/// What an interface is to the auditor, which decides the programs it gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// A pod's host-side interface.
    Pod,
    /// A native or tunnel device of the node.
    Uplink,
}

/// Errors of the attach manager.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("cannot identify the network namespace of the calling thread: {source}")]
    Namespace {
        #[source]
        source: io::Error,
    },
    #[error(
        "the attacher was created in network namespace {expected} but is called from {actual}; \
         refusing to touch another namespace's interfaces"
    )]
    WrongNamespace { expected: u64, actual: u64 },
    #[error("attaching to {interface} (ifindex {ifindex}) {hook} via {mode} failed: {source}")]
    Attach {
        interface: String,
        ifindex: u32,
        hook: &'static str,
        mode: HookMode,
        #[source]
        source: Box<ProgramError>,
    },
    #[error("adding the clsact qdisc to {interface} (ifindex {ifindex}) failed: {source}")]
    Clsact {
        interface: String,
        ifindex: u32,
        #[source]
        source: Box<TcError>,
    },
    #[error("invalid interface glob {glob:?}: {reason}")]
    Glob { glob: String, reason: &'static str },
}

/// Why an interface was not attached although it matched; not an error of the attacher.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attached {
    /// Now attached (or already was).
    Yes,
    /// The name does not match the configuration (or no longer, after a rename).
    NotMatching,
    /// The interface disappeared while we attached: its removal notification follows.
    Vanished,
}

struct Attachment {
    name: String,
    mode: HookMode,
    role: Role,
    // Dropping a link detaches it (TCX: closes the link fd; clsact: deletes the filter).
    ingress: SchedClassifierLink,
    egress: SchedClassifierLink,
}

/// The loaded TC programs, one per hook and kind of interface (see
/// `auditor_ebpf::PROGRAM_INGRESS`, `auditor_ebpf::PROGRAM_UPLINK_INGRESS`).
#[derive(Debug)]
pub struct TcPrograms<'a> {
    pub ingress: &'a mut SchedClassifier,
    pub egress: &'a mut SchedClassifier,
    pub uplink_ingress: &'a mut SchedClassifier,
    pub uplink_egress: &'a mut SchedClassifier,
}

impl TcPrograms<'_> {
    /// The (ingress, egress) programs of interfaces of `role`.
    fn of(&mut self, role: Role) -> (&mut SchedClassifier, &mut SchedClassifier) {
        match role {
            Role::Pod => (self.ingress, self.egress),
            Role::Uplink => (self.uplink_ingress, self.uplink_egress),
        }
    }
}

/// Attaches the TC programs to matching interfaces and detaches them again.
pub struct Attacher {
    config: AttachConfig,
    netns: u64,
    attached: BTreeMap<u32, Attachment>,
    /// Set after TCX failed once in `Auto` mode, so we stop trying it on every new interface.
    tcx_unavailable: bool,
    /// The interfaces of the default routes, when [`DEFAULT_ROUTE`] is an uplink: looked up
    /// again when a default route changes ([`LinkChange::DefaultRoutes`]), on every resync and
    /// whenever an interface matches nothing else.
    default_route: Vec<u32>,
}

impl fmt::Debug for Attacher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Attacher")
            .field("netns", &self.netns)
            .field("attached", &self.attached())
            .finish_non_exhaustive()
    }
}

impl Attacher {
    /// An attacher bound to the calling thread's network namespace.
    ///
    /// # Errors
    /// When a glob is invalid or the namespace cannot be identified.
    pub fn new(config: AttachConfig) -> Result<Self, AttachError> {
        validate(&config)?;
        Ok(Self {
            config,
            netns: current_netns()?,
            attached: BTreeMap::new(),
            tcx_unavailable: false,
            default_route: Vec::new(),
        })
    }

    /// The network namespace (inode of `/proc/thread-self/ns/net`) this attacher acts on.
    #[must_use]
    pub const fn netns(&self) -> u64 {
        self.netns
    }

    /// Whether an interface of this name is one we attach to (by name only: the default
    /// route's device is known by [`Attacher::role`]).
    #[must_use]
    pub fn matches(&self, name: &str) -> bool {
        self.role_by_name(name).is_some()
    }

    /// What `link` is to us, if we attach to it: an uplink by name first (an uplink glob is the
    /// more specific configuration), else a pod interface, else the default route's device.
    #[must_use]
    pub fn role(&self, link: &Link) -> Option<Role> {
        self.role_by_name(&link.name).or_else(|| {
            self.default_route
                .contains(&link.ifindex)
                .then_some(Role::Uplink)
        })
    }

    fn role_by_name(&self, name: &str) -> Option<Role> {
        let any = |globs: &[String]| {
            globs
                .iter()
                .any(|g| g != DEFAULT_ROUTE && glob_match(g.as_bytes(), name.as_bytes()))
        };
        if any(&self.config.uplinks) {
            Some(Role::Uplink)
        } else if any(&self.config.interfaces) {
            Some(Role::Pod)
        } else {
            None
        }
    }

    /// Looks the default routes' devices up again, when they are uplinks.
    fn refresh_default_route(&mut self) {
        if !self.config.uplinks.iter().any(|u| u == DEFAULT_ROUTE) {
            return;
        }
        match super::netlink::default_route_ifindexes() {
            Ok(ifindexes) => self.default_route = ifindexes,
            Err(e) => tracing::warn!(error = %e, "could not read the default routes"),
        }
    }

    /// The name of an attached interface (looked up once per flow record).
    #[must_use]
    pub fn name_of(&self, ifindex: u32) -> Option<&str> {
        self.attached.get(&ifindex).map(|a| a.name.as_str())
    }

    /// The interfaces attached now, by ifindex.
    #[must_use]
    pub fn attached(&self) -> Vec<AttachedInterface> {
        self.attached
            .iter()
            .map(|(ifindex, a)| AttachedInterface {
                name: a.name.clone(),
                ifindex: *ifindex,
                mode: a.mode,
                role: a.role,
            })
            .collect()
    }

    /// Deletes clsact filters named after our program from every matching interface in `links`:
    /// what an instance that crashed in clsact mode left behind. Returns how many interfaces had
    /// some. Failures are logged, not returned: a leftover filter must not keep us from starting.
    ///
    /// # Errors
    /// Only when called from another namespace than the attacher's.
    pub fn remove_stale(&mut self, links: &[Link]) -> Result<usize, AttachError> {
        self.check_netns()?;
        self.refresh_default_route();
        let mut cleaned = 0;
        for link in links.iter().filter(|l| self.role(l).is_some()) {
            let mut found = false;
            for (attach_type, name) in [
                (TcAttachType::Ingress, auditor_ebpf::PROGRAM_INGRESS),
                (TcAttachType::Egress, auditor_ebpf::PROGRAM_EGRESS),
                (TcAttachType::Ingress, auditor_ebpf::PROGRAM_UPLINK_INGRESS),
                (TcAttachType::Egress, auditor_ebpf::PROGRAM_UPLINK_EGRESS),
            ] {
                match tc::qdisc_detach_program(link.ifindex, attach_type.into(), name) {
                    Ok(()) => found = true,
                    Err(TcError::IoError(e)) if e.kind() == io::ErrorKind::NotFound => {}
                    // No clsact qdisc at all: nothing of ours either.
                    Err(TcError::NetlinkError(e))
                        if matches!(
                            e.raw_os_error(),
                            Some(libc::EINVAL | libc::ENOENT | libc::ENODEV)
                        ) => {}
                    Err(e) => tracing::warn!(
                        interface = %link.name, error = %e, "could not remove a stale clsact filter"
                    ),
                }
            }
            if found {
                tracing::info!(interface = %link.name, "removed clsact filters left by an earlier instance");
                cleaned += 1;
            }
        }
        Ok(cleaned)
    }

    /// Applies one change reported by the link watcher.
    ///
    /// # Errors
    /// When attaching fails for another reason than the interface vanishing.
    pub fn apply(
        &mut self,
        programs: &mut TcPrograms<'_>,
        change: &LinkChange,
    ) -> Result<(), AttachError> {
        match change {
            LinkChange::Present(link) => self.attach(programs, link).map(drop),
            LinkChange::Removed { ifindex } => {
                self.check_netns()?;
                self.detach(*ifindex);
                Ok(())
            }
            LinkChange::Resync(links) => self.sync(programs, links),
            LinkChange::DefaultRoutes => self.follow_default_route(programs),
        }
    }

    /// After a default route changed: looks its devices up again and attaches a new one as an
    /// uplink, and detaches one it no longer uses unless something else makes it an
    /// interface of ours (an uplink or pod glob). Keeps going past a failing interface and
    /// returns the first error.
    ///
    /// # Errors
    /// The first attach failure.
    fn follow_default_route(&mut self, programs: &mut TcPrograms<'_>) -> Result<(), AttachError> {
        self.check_netns()?;
        let before = self.default_route.clone();
        self.refresh_default_route();
        if self.default_route == before {
            return Ok(());
        }
        tracing::info!(before = ?before, now = ?self.default_route, "the default routes' devices changed");
        let mut changed: Vec<u32> = before
            .iter()
            .chain(&self.default_route)
            .copied()
            .filter(|i| before.contains(i) != self.default_route.contains(i))
            .collect();
        changed.sort_unstable();
        changed.dedup();
        let mut first_error = None;
        for ifindex in changed {
            let name = match self.attached.get(&ifindex) {
                Some(a) => Some(a.name.clone()),
                None => interface_name(ifindex),
            };
            // Gone meanwhile: its removal notification follows.
            let Some(name) = name else { continue };
            if let Err(e) = self.attach(programs, &Link { ifindex, name }) {
                tracing::error!(error = %e, "attach failed");
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Makes the attachments match `links`, the complete list of interfaces: attaches to new
    /// matching ones and detaches from those gone. Keeps going past a failing interface and
    /// returns the first error.
    ///
    /// # Errors
    /// The first attach failure.
    pub fn sync(
        &mut self,
        programs: &mut TcPrograms<'_>,
        links: &[Link],
    ) -> Result<(), AttachError> {
        self.check_netns()?;
        self.refresh_default_route();
        let gone: Vec<u32> = self
            .attached
            .keys()
            .filter(|ifindex| !links.iter().any(|l| l.ifindex == **ifindex))
            .copied()
            .collect();
        for ifindex in gone {
            self.detach(ifindex);
        }
        let mut first_error = None;
        for link in links {
            if let Err(e) = self.attach(programs, link) {
                tracing::error!(error = %e, "attach failed");
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Attaches to `link` if its name matches (detaching if a rename made it stop matching).
    ///
    /// # Errors
    /// When attaching fails for another reason than the interface vanishing.
    pub fn attach(
        &mut self,
        programs: &mut TcPrograms<'_>,
        link: &Link,
    ) -> Result<Attached, AttachError> {
        self.check_netns()?;
        if self.role_by_name(&link.name).is_none() && !self.attached.contains_key(&link.ifindex) {
            // Perhaps the default route's device (or it moved to this one).
            self.refresh_default_route();
        }
        let Some(role) = self.role(link) else {
            self.detach(link.ifindex);
            return Ok(Attached::NotMatching);
        };
        if let Some(existing) = self.attached.get_mut(&link.ifindex) {
            if existing.role == role {
                existing.name.clone_from(&link.name);
                return Ok(Attached::Yes);
            }
            // Renamed into the other kind: its programs change.
            self.detach(link.ifindex);
        }
        let use_tcx = match self.config.mode {
            AttachMode::Tcx => true,
            AttachMode::Clsact => false,
            AttachMode::Auto => !self.tcx_unavailable,
        };
        let result = if use_tcx {
            match attach_tcx(programs, link, role) {
                Err(e) if self.config.mode == AttachMode::Auto && !vanished(&e) => {
                    tracing::warn!(
                        error = %e,
                        "TCX attach failed; using clsact filters from now on (kernel before 6.6?)"
                    );
                    self.tcx_unavailable = true;
                    attach_clsact(programs, link, role)
                }
                other => other,
            }
        } else {
            attach_clsact(programs, link, role)
        };
        match result {
            Ok(attachment) => {
                if role == Role::Uplink {
                    // Few, and what decides whether a CNI's redirected packets are seen.
                    tracing::info!(interface = %link.name, ifindex = link.ifindex, mode = %attachment.mode, "uplink attached");
                } else {
                    tracing::debug!(interface = %link.name, ifindex = link.ifindex, mode = %attachment.mode, "attached");
                }
                self.attached.insert(link.ifindex, attachment);
                Ok(Attached::Yes)
            }
            Err(e) if vanished(&e) => {
                tracing::debug!(interface = %link.name, "interface vanished while attaching");
                Ok(Attached::Vanished)
            }
            Err(e) => Err(e),
        }
    }

    /// Detaches from one interface; a no-op when not attached. An interface that is already gone
    /// took its TCX links and clsact filters with it; we only close our handles then.
    pub fn detach(&mut self, ifindex: u32) {
        if let Some(attachment) = self.attached.remove(&ifindex) {
            release(ifindex, attachment);
        }
    }

    /// Detaches from every interface. Also what dropping the attacher does, without the
    /// namespace check: call this on shutdown from the attacher's own namespace.
    ///
    /// # Errors
    /// When called from another namespace (nothing is detached then: the handles stay for Drop).
    pub fn shutdown(&mut self) -> Result<(), AttachError> {
        self.check_netns()?;
        release_all(std::mem::take(&mut self.attached));
        Ok(())
    }

    fn check_netns(&self) -> Result<(), AttachError> {
        let actual = current_netns()?;
        if actual == self.netns {
            Ok(())
        } else {
            Err(AttachError::WrongNamespace {
                expected: self.netns,
                actual,
            })
        }
    }
}

impl Drop for Attacher {
    fn drop(&mut self) {
        // TCX links go with their fds wherever we are; a clsact filter deleted by ifindex from
        // another namespace could hit an unrelated interface, so those are only logged.
        if !self.attached.is_empty() && self.check_netns().is_err() {
            for (ifindex, a) in std::mem::take(&mut self.attached) {
                let Attachment {
                    name,
                    mode,
                    ingress,
                    egress,
                    ..
                } = a;
                if mode == HookMode::Clsact {
                    tracing::error!(interface = %name, ifindex, "dropped outside its namespace; clsact filter left");
                    std::mem::forget(ingress);
                    std::mem::forget(egress);
                }
            }
            return;
        }
        release_all(std::mem::take(&mut self.attached));
    }
}

/// Detaches one interface's programs (dropping a link detaches it too; this logs failures).
fn release(ifindex: u32, attachment: Attachment) {
    let Attachment {
        name,
        mode,
        ingress,
        egress,
        ..
    } = attachment;
    for (direction, link) in [("ingress", ingress), ("egress", egress)] {
        if let Err(e) = link.detach()
            && !vanished_errno(program_errno(&e))
        {
            tracing::warn!(interface = %name, direction, %mode, error = %e, "detach failed");
        }
    }
    tracing::debug!(interface = %name, ifindex, "detached");
}

/// Detaches everything. Sequential on purpose: each TCX attach or detach waits for an RCU grace
/// period under the kernel's RTNL lock (about 12 ms each on this machine), so threads would only
/// queue on that lock. 110 pods (the kubelet's default maximum) take about 2.6 s, within the
/// SIGTERM budget of 5 s; clsact filters go in well under a millisecond each.
fn release_all(attached: BTreeMap<u32, Attachment>) {
    let total = attached.len();
    for (ifindex, attachment) in attached {
        release(ifindex, attachment);
    }
    if total > 0 {
        tracing::debug!(interfaces = total, "detached everywhere");
    }
}

fn attach_tcx(
    programs: &mut TcPrograms<'_>,
    link: &Link,
    role: Role,
) -> Result<Attachment, AttachError> {
    let attach = |program: &mut SchedClassifier, attach_type| {
        let id = program
            .attach(
                link.ifindex,
                TcAttach::Tcx {
                    attach_type,
                    // First, so we see packets before a CNI program drops or redirects them.
                    order: LinkOrder::first(),
                },
            )
            .and_then(|id| program.take_link(id))
            .map_err(|source| attach_error(link, attach_type, HookMode::Tcx, source))?;
        Ok::<_, AttachError>(id)
    };
    let (ingress_program, egress_program) = programs.of(role);
    let ingress = attach(ingress_program, TcAttachType::Ingress)?;
    let egress = attach(egress_program, TcAttachType::Egress)?;
    Ok(Attachment {
        name: link.name.clone(),
        mode: HookMode::Tcx,
        role,
        ingress,
        egress,
    })
}

fn attach_clsact(
    programs: &mut TcPrograms<'_>,
    link: &Link,
    role: Role,
) -> Result<Attachment, AttachError> {
    match tc::qdisc_add_clsact(link.ifindex) {
        // The qdisc was already there: ours from before, or the CNI's.
        Ok(()) | Err(TcError::AlreadyAttached) => {}
        Err(TcError::NetlinkError(e)) if e.raw_os_error() == Some(libc::EEXIST) => {}
        Err(source) => {
            return Err(AttachError::Clsact {
                interface: link.name.clone(),
                ifindex: link.ifindex,
                source: Box::new(source),
            });
        }
    }
    let attach = |program: &mut SchedClassifier, attach_type: TcAttachType| {
        program
            .attach(
                link.ifindex,
                TcAttach::Netlink {
                    parent: attach_type.into(),
                    // Priority 0 lets the kernel pick one ahead of the filters already there.
                    options: NlOptions::default(),
                },
            )
            .and_then(|id| program.take_link(id))
            .map_err(|source| attach_error(link, attach_type, HookMode::Clsact, source))
    };
    let (ingress_program, egress_program) = programs.of(role);
    let ingress = attach(ingress_program, TcAttachType::Ingress)?;
    let egress = attach(egress_program, TcAttachType::Egress)?;
    Ok(Attachment {
        name: link.name.clone(),
        mode: HookMode::Clsact,
        role,
        ingress,
        egress,
    })
}

fn attach_error(
    link: &Link,
    attach_type: TcAttachType,
    mode: HookMode,
    source: ProgramError,
) -> AttachError {
    AttachError::Attach {
        interface: link.name.clone(),
        ifindex: link.ifindex,
        hook: match attach_type {
            TcAttachType::Ingress => "ingress",
            TcAttachType::Egress => "egress",
        },
        mode,
        source: Box::new(source),
    }
}

/// Whether an attach failed only because the interface no longer exists.
fn vanished(e: &AttachError) -> bool {
    match e {
        AttachError::Attach { source, .. } => vanished_errno(program_errno(source)),
        AttachError::Clsact { source, .. } => vanished_errno(tc_errno(source)),
        AttachError::Namespace { .. }
        | AttachError::WrongNamespace { .. }
        | AttachError::Glob { .. } => false,
    }
}

const fn vanished_errno(errno: Option<i32>) -> bool {
    matches!(errno, Some(libc::ENODEV | libc::ENXIO))
}

fn program_errno(e: &ProgramError) -> Option<i32> {
    match e {
        ProgramError::SyscallError(SyscallError { io_error, .. })
        | ProgramError::IOError(io_error) => io_error.raw_os_error(),
        ProgramError::UnknownInterface { .. } => Some(libc::ENODEV),
        ProgramError::TcError(e) => tc_errno(e),
        ProgramError::NetlinkError(e) => e.raw_os_error(),
        ProgramError::LinkError(LinkError::SyscallError(SyscallError { io_error, .. })) => {
            io_error.raw_os_error()
        }
        _ => None,
    }
}

fn tc_errno(e: &TcError) -> Option<i32> {
    match e {
        TcError::NetlinkError(e) => e.raw_os_error(),
        TcError::IoError(e) => e.raw_os_error(),
        _ => None,
    }
}

/// The name of interface `ifindex` in the calling thread's namespace; `None` when there is no
/// such interface.
fn interface_name(ifindex: u32) -> Option<String> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: the buffer holds IF_NAMESIZE bytes, as if_indextoname requires.
    let name = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr()) };
    if name.is_null() {
        return None;
    }
    // SAFETY: on success the buffer holds a NUL-terminated name.
    let name = unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) };
    Some(name.to_string_lossy().into_owned())
}

/// Inode of the calling thread's network namespace: unique per namespace while it exists.
fn current_netns() -> Result<u64, AttachError> {
    std::fs::metadata("/proc/thread-self/ns/net")
        .map(|m| m.ino())
        .map_err(|source| AttachError::Namespace { source })
}

/// Checks every glob of `config` (the [`DEFAULT_ROUTE`] entry is no glob).
///
/// # Errors
/// The first invalid glob.
pub fn validate(config: &AttachConfig) -> Result<(), AttachError> {
    for glob in config
        .interfaces
        .iter()
        .chain(config.uplinks.iter().filter(|u| *u != DEFAULT_ROUTE))
    {
        validate_glob(glob)?;
    }
    Ok(())
}

fn validate_glob(glob: &str) -> Result<(), AttachError> {
    let reason = if glob.is_empty() {
        Some("empty")
    } else if glob.len() > 64 {
        Some("longer than 64 bytes")
    } else if glob.contains(['/', ' ', '\0', ':']) {
        Some(
            "interface names cannot contain '/', ':', spaces or NUL (the default route's device is \":default-route\")",
        )
    } else {
        None
    };
    reason.map_or(Ok(()), |reason| {
        Err(AttachError::Glob {
            glob: glob.to_owned(),
            reason,
        })
    })
}

/// `*` matches any run of bytes, `?` exactly one; everything else itself. Iterative with one
/// backtrack point, so linear in practice and never recursive.
fn glob_match(pattern: &[u8], name: &[u8]) -> bool {
    let (mut p, mut n) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while n < name.len() {
        match pattern.get(p) {
            Some(b'*') => {
                star = Some((p, n));
                p += 1;
            }
            Some(&c) if c == b'?' || c == name[n] => {
                p += 1;
                n += 1;
            }
            _ => match star {
                Some((sp, sn)) => {
                    p = sp + 1;
                    n = sn + 1;
                    star = Some((sp, sn + 1));
                }
                None => return false,
            },
        }
    }
    pattern[p..].iter().all(|c| *c == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        let m = |p: &str, n: &str| glob_match(p.as_bytes(), n.as_bytes());
        assert!(m("cali*", "cali12ab34"));
        assert!(m("cali*", "cali"));
        assert!(!m("cali*", "xcali1"));
        assert!(m("*", ""));
        assert!(m("v?th*", "veth0"));
        assert!(!m("v?th*", "vth0"));
        assert!(m("*a*b", "xxaxxb"));
        assert!(!m("*a*b", "xxaxxbc"));
        assert!(m("eth0", "eth0"));
        assert!(!m("eth0", "eth01"));
    }

    #[test]
    fn matching_uses_globs_and_the_uplinks() {
        let mut a = Attacher::new(AttachConfig {
            uplinks: vec!["eth0".into(), "cilium_*".into(), DEFAULT_ROUTE.into()],
            ..AttachConfig::default()
        })
        .unwrap();
        for name in ["cali0", "lxc12", "veth9", "eth0", "cilium_vxlan"] {
            assert!(a.matches(name), "{name} should match");
        }
        for name in ["eth1", "lo", "tunl0", "wg0"] {
            assert!(!a.matches(name), "{name} should not match");
        }
        let link = |ifindex, name: &str| Link {
            ifindex,
            name: name.into(),
        };
        assert_eq!(a.role(&link(5, "lxc12")), Some(Role::Pod));
        assert_eq!(a.role(&link(6, "cilium_geneve")), Some(Role::Uplink));
        assert_eq!(a.role(&link(7, "enp1s0")), None);
        // The default route's device is an uplink whatever its name.
        a.default_route = vec![7];
        assert_eq!(a.role(&link(7, "enp1s0")), Some(Role::Uplink));
        assert_eq!(a.role(&link(8, "enp2s0")), None);
    }

    #[test]
    fn the_default_route_entry_is_no_glob_and_no_interface_name() {
        // `:` is not allowed in interface names, so the entry can never name one by accident.
        assert!(DEFAULT_ROUTE.contains(':'));
        let a = Attacher::new(AttachConfig {
            uplinks: CILIUM_UPLINKS.map(String::from).to_vec(),
            ..AttachConfig::default()
        })
        .unwrap();
        assert!(!a.matches(DEFAULT_ROUTE));
        assert!(a.matches("cilium_wg0"));
    }

    #[test]
    fn bad_globs_are_rejected() {
        for glob in ["", "a b", "x/y"] {
            let config = AttachConfig {
                interfaces: vec![glob.into()],
                ..AttachConfig::default()
            };
            assert!(Attacher::new(config).is_err(), "glob {glob:?} accepted");
        }
    }

    #[test]
    fn refuses_another_namespace() {
        let a = Attacher::new(AttachConfig::default()).unwrap();
        // Same thread, same namespace: fine. (Other namespaces are covered by attach_churn.)
        a.check_netns().unwrap();
        assert_eq!(a.netns(), current_netns().unwrap());
    }
}
