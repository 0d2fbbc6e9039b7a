//! Interface discovery over rtnetlink: a dump of the links that exist now, and a stream of link
//! notifications afterwards (and, when asked, of default-route changes). Both sockets live in
//! the network namespace of the thread that opens them, which is what keeps the attach manager
//! inside its own namespace.
//!
//! Raw netlink with `libc` rather than a crate: we need two message types and one attribute, and the
//! parsing below is bounded and checked, so a dependency would bring more surface than it saves.

use std::{
    io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
};

// The sizes and address family of the C types the kernel declares: all small, so the casts to
// those types cannot truncate.
#[expect(clippy::cast_possible_truncation, reason = "an int is 4 bytes")]
const SOCKLEN_INT: libc::socklen_t = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
#[expect(clippy::cast_possible_truncation, reason = "a sockaddr_nl is 12 bytes")]
const SOCKLEN_NL: libc::socklen_t = std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t;
#[expect(clippy::cast_possible_truncation, reason = "AF_NETLINK is 16")]
const AF_NETLINK_FAMILY: libc::sa_family_t = libc::AF_NETLINK as libc::sa_family_t;

use tokio::io::{Interest, unix::AsyncFd};

const NLMSG_HDR_LEN: usize = 16;
const IFINFOMSG_LEN: usize = 16;
const RTA_HDR_LEN: usize = 4;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_DUMP: u16 = 0x300;
const IFLA_IFNAME: u16 = 3;
const RTMSG_LEN: usize = 12;
const RTA_OIF: u16 = 4;
const RTA_MULTIPATH: u16 = 9;
const RTA_TABLE: u16 = 15;
const RTNEXTHOP_LEN: usize = 8;
const RT_TABLE_MAIN: u32 = 254;
const RTN_UNICAST: u8 = 1;
/// Large enough for a burst of a few thousand link notifications; an overrun is still handled
/// (ENOBUFS -> full resync), this only makes it rare.
const RECV_BUFFER_BYTES: libc::c_int = 4 << 20;
/// One datagram never exceeds this (the kernel sizes dump messages to the page size, and link
/// notifications are a few KiB).
const DATAGRAM_BYTES: usize = 64 << 10;

/// Errors of interface discovery.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("rtnetlink {op} failed: {source}")]
    Io {
        op: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("rtnetlink answered the link dump with error {errno}")]
    Nack { errno: i32 },
    #[error("malformed rtnetlink message: {reason}")]
    Malformed { reason: &'static str },
}

/// An interface as netlink names it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Link {
    pub ifindex: u32,
    pub name: String,
}

/// What happened to the set of interfaces since the last call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkChange {
    /// The interface exists (new, or changed: a rename arrives like this too).
    Present(Link),
    /// The interface is gone.
    Removed { ifindex: u32 },
    /// Notifications were lost (socket overrun): this is the complete list now, and anything not
    /// in it is gone.
    Resync(Vec<Link>),
    /// A default route of the main table was added, replaced or removed: the devices the
    /// default routes use may have changed (see [`default_route_ifindexes`]). Only from a
    /// watcher opened with [`LinkWatcher::open_with_routes`].
    DefaultRoutes,
}

/// Lists the interfaces of the calling thread's network namespace.
///
/// # Errors
/// When the socket cannot be opened or the kernel's answer cannot be read.
pub fn dump_links() -> Result<Vec<Link>, NetlinkError> {
    let mut links = Vec::new();
    // ifinfomsg: all zero = every family, every interface.
    dump(libc::RTM_GETLINK, &[0u8; IFINFOMSG_LEN], |kind, payload| {
        if kind == libc::RTM_NEWLINK
            && let Some(link) = parse_link(payload)?
        {
            links.push(link);
        }
        Ok(())
    })?;
    Ok(links)
}

/// The interfaces the calling thread's namespace routes its default routes through (IPv4 and
/// IPv6, main table, multipath next hops included), sorted, without repeats: the node's native
/// device(s), however they are named.
///
/// # Errors
/// When the socket cannot be opened or the kernel's answer cannot be read.
pub fn default_route_ifindexes() -> Result<Vec<u32>, NetlinkError> {
    let mut out = Vec::new();
    // rtmsg: all zero = every family, every table.
    dump(libc::RTM_GETROUTE, &[0u8; RTMSG_LEN], |kind, payload| {
        if kind == libc::RTM_NEWROUTE {
            out.extend(parse_default_route(payload)?);
        }
        Ok(())
    })?;
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

/// Sends a dump request of `kind` with `body` and hands every answer's kind and payload to
/// `each` until the kernel says it is done.
fn dump(
    kind: u16,
    body: &[u8],
    mut each: impl FnMut(u16, &[u8]) -> Result<(), NetlinkError>,
) -> Result<(), NetlinkError> {
    let fd = open_socket(0)?;
    let seq: u32 = 1;
    let mut request = vec![0u8; NLMSG_HDR_LEN + body.len()];
    let len = u32::try_from(request.len()).map_err(|_| NetlinkError::Malformed {
        reason: "request length",
    })?;
    request[0..4].copy_from_slice(&len.to_ne_bytes());
    request[4..6].copy_from_slice(&kind.to_ne_bytes());
    request[6..8].copy_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    request[8..12].copy_from_slice(&seq.to_ne_bytes());
    request[NLMSG_HDR_LEN..].copy_from_slice(body);
    // SAFETY: the buffer is valid for its length; the fd is an open netlink socket.
    let sent = unsafe { libc::send(fd.as_raw_fd(), request.as_ptr().cast(), request.len(), 0) };
    if sent < 0 {
        return Err(NetlinkError::Io {
            op: "send dump request",
            source: io::Error::last_os_error(),
        });
    }
    let mut buf = vec![0u8; DATAGRAM_BYTES];
    // A dump of N objects takes at most N datagrams; the bound guards against a kernel that
    // never sends NLMSG_DONE.
    for _ in 0..1_000_000 {
        let n = recv_blocking(&fd, &mut buf)?;
        for msg in Messages::new(&buf[..n]) {
            let msg = msg?;
            if msg.seq != seq {
                continue;
            }
            match msg.kind {
                NLMSG_DONE => return Ok(()),
                NLMSG_ERROR => {
                    let errno = error_code(msg.payload)?;
                    if errno != 0 {
                        return Err(NetlinkError::Nack { errno });
                    }
                }
                other => each(other, msg.payload)?,
            }
        }
    }
    Err(NetlinkError::Malformed {
        reason: "dump never ended",
    })
}

/// Link notifications of the namespace the watcher was opened in.
#[derive(Debug)]
pub struct LinkWatcher {
    fd: AsyncFd<OwnedFd>,
    buf: Vec<u8>,
}

impl LinkWatcher {
    /// Subscribes to link notifications of the calling thread's network namespace. Open it before
    /// [`dump_links`] so that no change falls between the dump and the first notification.
    ///
    /// # Errors
    /// When the socket cannot be opened or registered with the tokio reactor (call it inside a
    /// runtime).
    pub fn open() -> Result<Self, NetlinkError> {
        Self::open_groups(libc::RTMGRP_LINK as u32)
    }

    /// [`LinkWatcher::open`], also subscribed to the IPv4 and IPv6 route notifications, of
    /// which it reports default-route changes ([`LinkChange::DefaultRoutes`]; other routes, such
    /// as a CNI's per-pod host routes, are read and ignored).
    ///
    /// # Errors
    /// As [`LinkWatcher::open`].
    pub fn open_with_routes() -> Result<Self, NetlinkError> {
        Self::open_groups(
            (libc::RTMGRP_LINK | libc::RTMGRP_IPV4_ROUTE | libc::RTMGRP_IPV6_ROUTE) as u32,
        )
    }

    fn open_groups(groups: u32) -> Result<Self, NetlinkError> {
        let fd = open_socket(groups)?;
        // Best effort: FORCE needs CAP_NET_ADMIN, the plain option is capped by rmem_max.
        for opt in [libc::SO_RCVBUFFORCE, libc::SO_RCVBUF] {
            // SAFETY: a valid c_int option value on an open socket.
            let rc = unsafe {
                libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    opt,
                    std::ptr::from_ref(&RECV_BUFFER_BYTES).cast(),
                    SOCKLEN_INT,
                )
            };
            if rc == 0 {
                break;
            }
        }
        // SAFETY: an OwnedFd stays open and refers to the same socket for as long as the AsyncFd
        // owns it.
        let fd =
            unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }.map_err(|e| {
                NetlinkError::Io {
                    op: "register with tokio",
                    source: e.into_parts().1,
                }
            })?;
        Ok(Self {
            fd,
            buf: vec![0u8; DATAGRAM_BYTES],
        })
    }

    /// Waits for the next batch of changes (never empty).
    ///
    /// # Errors
    /// When reading the socket fails for another reason than an overrun, or a resync dump fails.
    pub async fn next(&mut self) -> Result<Vec<LinkChange>, NetlinkError> {
        loop {
            let mut guard = self
                .fd
                .readable()
                .await
                .map_err(|source| NetlinkError::Io { op: "poll", source })?;
            let buf = &mut self.buf;
            let received = guard.try_io(|fd| recv_nonblocking(fd.get_ref(), buf));
            let n = match received {
                Err(_would_block) => continue,
                Ok(Ok(n)) => n,
                Ok(Err(e)) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                    tracing::warn!("link notifications overran the socket buffer; resyncing");
                    return Ok(vec![LinkChange::Resync(dump_links()?)]);
                }
                Ok(Err(source)) => {
                    return Err(NetlinkError::Io {
                        op: "recv notification",
                        source,
                    });
                }
            };
            let mut changes = Vec::new();
            for msg in Messages::new(&self.buf[..n]) {
                let msg = msg?;
                match msg.kind {
                    libc::RTM_NEWLINK => {
                        if let Some(link) = parse_link(msg.payload)? {
                            changes.push(LinkChange::Present(link));
                        }
                    }
                    libc::RTM_DELLINK => {
                        let ifindex = ifindex_of(msg.payload)?;
                        changes.push(LinkChange::Removed { ifindex });
                    }
                    // A route message that cannot be read might be a default route: looking
                    // them up again costs a dump, missing one an uplink.
                    libc::RTM_NEWROUTE | libc::RTM_DELROUTE
                        if parse_default_route(msg.payload).map_or(true, |d| !d.is_empty())
                            && !changes.contains(&LinkChange::DefaultRoutes) =>
                    {
                        changes.push(LinkChange::DefaultRoutes);
                    }
                    _ => {}
                }
            }
            if !changes.is_empty() {
                return Ok(changes);
            }
        }
    }
}

fn open_socket(groups: u32) -> Result<OwnedFd, NetlinkError> {
    // SAFETY: plain syscall; the result is checked before use.
    let raw = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC | if groups == 0 { 0 } else { libc::SOCK_NONBLOCK },
            libc::NETLINK_ROUTE,
        )
    };
    if raw < 0 {
        return Err(NetlinkError::Io {
            op: "socket",
            source: io::Error::last_os_error(),
        });
    }
    // SAFETY: `raw` is a fresh descriptor we own.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: sockaddr_nl is plain data; all-zero is a valid value.
    let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    addr.nl_family = AF_NETLINK_FAMILY;
    addr.nl_groups = groups;
    // SAFETY: addr is a valid sockaddr_nl of the given size.
    let rc = unsafe { libc::bind(fd.as_raw_fd(), std::ptr::from_ref(&addr).cast(), SOCKLEN_NL) };
    if rc < 0 {
        return Err(NetlinkError::Io {
            op: "bind",
            source: io::Error::last_os_error(),
        });
    }
    Ok(fd)
}

fn recv_blocking(fd: &OwnedFd, buf: &mut [u8]) -> Result<usize, NetlinkError> {
    loop {
        match recv_nonblocking(fd, buf) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(source) => {
                return Err(NetlinkError::Io {
                    op: "recv dump",
                    source,
                });
            }
            Ok(n) => return Ok(n),
        }
    }
}

fn recv_nonblocking(fd: &OwnedFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: the buffer is valid for writes of its length.
    let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

struct Message<'a> {
    kind: u16,
    seq: u32,
    payload: &'a [u8],
}

/// The netlink messages of one datagram, each checked against the datagram's bounds.
struct Messages<'a> {
    rest: &'a [u8],
}

impl<'a> Messages<'a> {
    const fn new(datagram: &'a [u8]) -> Self {
        Self { rest: datagram }
    }
}

impl<'a> Iterator for Messages<'a> {
    type Item = Result<Message<'a>, NetlinkError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.len() < NLMSG_HDR_LEN {
            return None;
        }
        let len = read_u32(self.rest, 0) as usize;
        if len < NLMSG_HDR_LEN || len > self.rest.len() {
            self.rest = &[];
            return Some(Err(NetlinkError::Malformed {
                reason: "message length out of bounds",
            }));
        }
        let msg = Message {
            kind: read_u16(self.rest, 4),
            seq: read_u32(self.rest, 8),
            payload: &self.rest[NLMSG_HDR_LEN..len],
        };
        self.rest = self.rest.get(align4(len)..).unwrap_or(&[]);
        Some(Ok(msg))
    }
}

fn ifindex_of(payload: &[u8]) -> Result<u32, NetlinkError> {
    if payload.len() < IFINFOMSG_LEN {
        return Err(NetlinkError::Malformed {
            reason: "short ifinfomsg",
        });
    }
    Ok(read_u32(payload, 4))
}

/// The interface of an `RTM_NEWLINK` payload; `None` when it carries no name (never seen in
/// practice, but then there is nothing to match a glob against).
fn parse_link(payload: &[u8]) -> Result<Option<Link>, NetlinkError> {
    let ifindex = ifindex_of(payload)?;
    let mut attrs = &payload[IFINFOMSG_LEN..];
    while attrs.len() >= RTA_HDR_LEN {
        let len = usize::from(read_u16(attrs, 0));
        let kind = read_u16(attrs, 2) & 0x3fff;
        if len < RTA_HDR_LEN || len > attrs.len() {
            return Err(NetlinkError::Malformed {
                reason: "attribute length out of bounds",
            });
        }
        if kind == IFLA_IFNAME {
            let value = &attrs[RTA_HDR_LEN..len];
            let value = value.split(|b| *b == 0).next().unwrap_or_default();
            let name = String::from_utf8_lossy(value).into_owned();
            return Ok(Some(Link { ifindex, name }));
        }
        attrs = attrs.get(align4(len)..).unwrap_or(&[]);
    }
    Ok(None)
}

/// The attributes of a netlink payload after its fixed header of `skip` bytes, as (kind,
/// value), each checked against the payload's bounds.
fn attributes(payload: &[u8], skip: usize) -> Result<Vec<(u16, &[u8])>, NetlinkError> {
    let mut attrs = payload.get(skip..).ok_or(NetlinkError::Malformed {
        reason: "short fixed header",
    })?;
    let mut out = Vec::new();
    while attrs.len() >= RTA_HDR_LEN {
        let len = usize::from(read_u16(attrs, 0));
        let kind = read_u16(attrs, 2) & 0x3fff;
        if len < RTA_HDR_LEN || len > attrs.len() {
            return Err(NetlinkError::Malformed {
                reason: "attribute length out of bounds",
            });
        }
        out.push((kind, &attrs[RTA_HDR_LEN..len]));
        attrs = attrs.get(align4(len)..).unwrap_or(&[]);
    }
    Ok(out)
}

/// The output interfaces of an `RTM_NEWROUTE` payload if it is a default route of the main
/// table (destination length 0, unicast), else none.
fn parse_default_route(payload: &[u8]) -> Result<Vec<u32>, NetlinkError> {
    let header = payload.get(..RTMSG_LEN).ok_or(NetlinkError::Malformed {
        reason: "short rtmsg",
    })?;
    let (dst_len, header_table, kind) = (header[1], u32::from(header[4]), header[7]);
    if dst_len != 0 || kind != RTN_UNICAST {
        return Ok(Vec::new());
    }
    let attrs = attributes(payload, RTMSG_LEN)?;
    let table = attrs
        .iter()
        .find(|(k, v)| *k == RTA_TABLE && v.len() >= 4)
        .map_or(header_table, |(_, v)| read_u32(v, 0));
    if table != RT_TABLE_MAIN {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for (k, v) in attrs {
        match k {
            RTA_OIF if v.len() >= 4 => out.push(read_u32(v, 0)),
            RTA_MULTIPATH => {
                // struct rtnexthop { u16 len; u8 flags; u8 hops; i32 ifindex; } then attributes.
                let mut rest = v;
                while rest.len() >= RTNEXTHOP_LEN {
                    let len = usize::from(read_u16(rest, 0));
                    if len < RTNEXTHOP_LEN || len > rest.len() {
                        return Err(NetlinkError::Malformed {
                            reason: "next hop length out of bounds",
                        });
                    }
                    out.push(read_u32(rest, 4));
                    rest = rest.get(align4(len)..).unwrap_or(&[]);
                }
            }
            _ => {}
        }
    }
    Ok(out)
}

/// The (negative) errno of an `NLMSG_ERROR` payload, as a positive number; 0 is an ACK.
fn error_code(payload: &[u8]) -> Result<i32, NetlinkError> {
    let bytes = payload.get(0..4).ok_or(NetlinkError::Malformed {
        reason: "short NLMSG_ERROR",
    })?;
    let mut raw = [0u8; 4];
    raw.copy_from_slice(bytes);
    Ok(-i32::from_ne_bytes(raw))
}

const fn align4(len: usize) -> usize {
    (len + 3) & !3
}

/// Callers check bounds first.
fn read_u32(buf: &[u8], at: usize) -> u32 {
    let mut raw = [0u8; 4];
    raw.copy_from_slice(&buf[at..at + 4]);
    u32::from_ne_bytes(raw)
}

fn read_u16(buf: &[u8], at: usize) -> u16 {
    let mut raw = [0u8; 2];
    raw.copy_from_slice(&buf[at..at + 2]);
    u16::from_ne_bytes(raw)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(kind: u16, seq: u32, payload: &[u8]) -> Vec<u8> {
        let len = NLMSG_HDR_LEN + payload.len();
        let mut out = Vec::new();
        out.extend_from_slice(&u32::try_from(len).unwrap().to_ne_bytes());
        out.extend_from_slice(&kind.to_ne_bytes());
        out.extend_from_slice(&0u16.to_ne_bytes());
        out.extend_from_slice(&seq.to_ne_bytes());
        out.extend_from_slice(&0u32.to_ne_bytes());
        out.extend_from_slice(payload);
        out.resize(align4(out.len()), 0);
        out
    }

    fn link_payload(ifindex: u32, attrs: &[(u16, &[u8])]) -> Vec<u8> {
        let mut out = vec![0u8; IFINFOMSG_LEN];
        out[4..8].copy_from_slice(&ifindex.to_ne_bytes());
        for (kind, value) in attrs {
            let len = u16::try_from(RTA_HDR_LEN + value.len()).unwrap();
            out.extend_from_slice(&len.to_ne_bytes());
            out.extend_from_slice(&kind.to_ne_bytes());
            out.extend_from_slice(value);
            out.resize(align4(out.len()), 0);
        }
        out
    }

    #[test]
    fn parses_name_after_other_attributes() {
        let payload = link_payload(
            7,
            &[(4, &1500u32.to_ne_bytes()), (IFLA_IFNAME, b"cali1234\0")],
        );
        let datagram = message(libc::RTM_NEWLINK, 0, &payload);
        let msgs: Vec<_> = Messages::new(&datagram).collect::<Result<_, _>>().unwrap();
        assert_eq!(msgs.len(), 1);
        let link = parse_link(msgs[0].payload).unwrap();
        assert_eq!(
            link,
            Some(Link {
                ifindex: 7,
                name: "cali1234".into()
            })
        );
    }

    #[test]
    fn several_messages_in_one_datagram() {
        let mut datagram = message(
            libc::RTM_NEWLINK,
            0,
            &link_payload(2, &[(IFLA_IFNAME, b"veth0\0")]),
        );
        datagram.extend(message(libc::RTM_DELLINK, 0, &link_payload(3, &[])));
        let msgs: Vec<_> = Messages::new(&datagram).collect::<Result<_, _>>().unwrap();
        assert_eq!(msgs.len(), 2);
        assert_eq!(msgs[1].kind, libc::RTM_DELLINK);
        assert_eq!(ifindex_of(msgs[1].payload).unwrap(), 3);
    }

    fn route_payload(dst_len: u8, table: u8, attrs: &[(u16, &[u8])]) -> Vec<u8> {
        let mut p = vec![0u8; RTMSG_LEN];
        p[0] = 2;
        p[1] = dst_len;
        p[4] = table;
        p[7] = RTN_UNICAST;
        for (kind, value) in attrs {
            let len = u16::try_from(RTA_HDR_LEN + value.len()).unwrap();
            p.extend_from_slice(&len.to_ne_bytes());
            p.extend_from_slice(&kind.to_ne_bytes());
            p.extend_from_slice(value);
            while !p.len().is_multiple_of(4) {
                p.push(0);
            }
        }
        p
    }

    #[test]
    fn default_routes_of_the_main_table_name_their_devices() {
        let oif = 7u32.to_ne_bytes();
        let main = 254u32.to_ne_bytes();
        let local = 255u32.to_ne_bytes();
        assert_eq!(
            parse_default_route(&route_payload(0, 254, &[(RTA_OIF, &oif)])).unwrap(),
            vec![7]
        );
        // The table attribute wins over the header's byte (tables above 255 exist).
        assert_eq!(
            parse_default_route(&route_payload(0, 0, &[(RTA_TABLE, &main), (RTA_OIF, &oif)]))
                .unwrap(),
            vec![7]
        );
        assert!(
            parse_default_route(&route_payload(
                0,
                0,
                &[(RTA_TABLE, &local), (RTA_OIF, &oif)]
            ))
            .unwrap()
            .is_empty()
        );
        assert!(
            parse_default_route(&route_payload(24, 254, &[(RTA_OIF, &oif)]))
                .unwrap()
                .is_empty(),
            "a /24 is not a default route"
        );
        // Two next hops: struct rtnexthop is 8 bytes each, with no attributes of their own.
        let mut hops = Vec::new();
        for ifindex in [3u32, 9] {
            hops.extend_from_slice(&8u16.to_ne_bytes());
            hops.extend_from_slice(&[0, 0]);
            hops.extend_from_slice(&ifindex.to_ne_bytes());
        }
        assert_eq!(
            parse_default_route(&route_payload(0, 254, &[(RTA_MULTIPATH, &hops)])).unwrap(),
            vec![3, 9]
        );
        let mut bad = hops.clone();
        bad[0] = 64;
        assert!(parse_default_route(&route_payload(0, 254, &[(RTA_MULTIPATH, &bad)])).is_err());
    }

    #[test]
    fn rejects_lengths_past_the_datagram() {
        let mut datagram = message(
            libc::RTM_NEWLINK,
            0,
            &link_payload(2, &[(IFLA_IFNAME, b"veth0\0")]),
        );
        datagram[0..4].copy_from_slice(&1000u32.to_ne_bytes());
        let first = Messages::new(&datagram).next().unwrap();
        assert!(
            first.is_err(),
            "a message longer than its datagram must be rejected"
        );

        let mut payload = link_payload(2, &[(IFLA_IFNAME, b"veth0\0")]);
        payload[IFINFOMSG_LEN..IFINFOMSG_LEN + 2].copy_from_slice(&200u16.to_ne_bytes());
        assert!(
            parse_link(&payload).is_err(),
            "an attribute past the message must be rejected"
        );
        assert!(
            ifindex_of(&[0u8; 8]).is_err(),
            "a short ifinfomsg must be rejected"
        );
    }

    #[test]
    fn dump_lists_loopback() {
        // Every network namespace has `lo`; the dump needs no privilege.
        let links = dump_links().unwrap();
        assert!(
            links.iter().any(|l| l.name == "lo"),
            "no lo in the link dump: {links:?}"
        );
    }
}
