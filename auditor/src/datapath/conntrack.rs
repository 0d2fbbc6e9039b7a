//! The node's netfilter connection tracking, asked over ctnetlink (`NETLINK_NETFILTER`,
//! `IPCTNL_MSG_CT_GET`) who opened a connection: the ORIGINAL tuple's source. Calico's
//! iptables/nftables dataplane and kube-proxy track every pod connection there; Cilium's eBPF
//! dataplane does not (the answer is then "no entry"), which is fine: it is one piece of
//! evidence among several for flows first seen mid-stream.
//!
//! Address translation makes the tuple seen at an interface differ from the entry's ORIGINAL
//! one. A connection to a Service (DNAT, `ClusterIP` -> backend) is seen at the backend as
//! client -> backend, the inverse of the entry's REPLY tuple (backend -> client); one leaving
//! through a masquerade (SNAT) is seen after it as node -> server, again the inverse of the
//! REPLY (server -> node). So both orientations of the observed pair are asked, once by
//! ORIGINAL and once by REPLY tuple (the kernel finds an entry by either of its tuples,
//! whichever attribute carries it). The answer is mapped back onto the observed pair: the
//! ORIGINAL source when it is one of the pair (no translation of the originator: plain, DNAT,
//! or SNAT seen before the translation), else the REPLY destination, which is the originator
//! as translated (SNAT seen after it: the node's address and the port it chose).
//!
//! At most two requests and answers per flow asked about, and only flows first seen mid-stream
//! are asked about: rare, but for the UDP and SCTP flows of an agent's join window (the idle
//! timeout after a start without adopted tables, see `FlowTracker::open_join_window`), each of
//! which is asked about once. Raw netlink with `libc`, as the link watcher in [`super::netlink`].

use std::{
    io,
    net::{IpAddr, SocketAddr},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
};

const NLMSG_HDR_LEN: usize = 16;
const NFGENMSG_LEN: usize = 4;
const NLA_HDR_LEN: usize = 4;
const NLA_F_NESTED: u16 = 0x8000;
const NLA_TYPE_MASK: u16 = 0x3fff;
const NLM_F_REQUEST: u16 = 0x1;
const NLMSG_ERROR: u16 = 2;
/// `NFNL_SUBSYS_CTNETLINK << 8 | IPCTNL_MSG_CT_GET` and the answer's `IPCTNL_MSG_CT_NEW`.
const CT_GET: u16 = 1 << 8 | 1;
const CT_NEW: u16 = 1 << 8;
const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_REPLY: u16 = 2;
const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V4_DST: u16 = 2;
const CTA_IP_V6_SRC: u16 = 3;
const CTA_IP_V6_DST: u16 = 4;
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_SRC_PORT: u16 = 2;
const CTA_PROTO_DST_PORT: u16 = 3;
/// Answer timeout in microseconds (200 ms): conntrack answers in microseconds; a stuck kernel must not stall the audit.
const RECV_TIMEOUT_US: u32 = 200_000;

/// Failures of asking conntrack (no entry is not one).
#[derive(Debug, thiserror::Error)]
pub enum ConntrackError {
    #[error("ctnetlink {op}: {source}")]
    Io {
        op: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("ctnetlink answered with error {errno}")]
    Nack { errno: i32 },
    #[error("malformed ctnetlink answer: {0}")]
    Malformed(&'static str),
}

/// A ctnetlink socket of the calling thread's network namespace.
#[derive(Debug)]
pub struct Conntrack {
    fd: OwnedFd,
    seq: u32,
}

impl Conntrack {
    /// Opens the socket. Needs `CAP_NET_ADMIN`.
    ///
    /// # Errors
    /// When the socket cannot be opened (no netfilter netlink in this kernel, or no capability).
    pub fn open() -> Result<Self, ConntrackError> {
        // SAFETY: plain syscall; the result is checked before use.
        let raw = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_NETFILTER,
            )
        };
        if raw < 0 {
            return Err(ConntrackError::Io {
                op: "socket",
                source: io::Error::last_os_error(),
            });
        }
        // SAFETY: `raw` is a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let timeout = libc::timeval {
            tv_sec: 0,
            tv_usec: RECV_TIMEOUT_US.into(),
        };
        #[expect(clippy::cast_possible_truncation, reason = "a timeval is 16 bytes")]
        let len = std::mem::size_of::<libc::timeval>() as libc::socklen_t;
        // SAFETY: a valid timeval of the given size.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                std::ptr::from_ref(&timeout).cast(),
                len,
            )
        };
        if rc < 0 {
            return Err(ConntrackError::Io {
                op: "setsockopt SO_RCVTIMEO",
                source: io::Error::last_os_error(),
            });
        }
        Ok(Self { fd, seq: 0 })
    }

    /// Who opened the connection between `a` and `b` (either way round, as observed at an
    /// interface) over `protocol` (an IP protocol number), by the node's conntrack entry, as one
    /// of `a` and `b`: see the [module docs](self) for translated connections. `None` when
    /// conntrack has no such entry.
    ///
    /// # Errors
    /// When the socket fails or the answer cannot be read.
    pub fn originator(
        &mut self,
        protocol: u8,
        a: SocketAddr,
        b: SocketAddr,
    ) -> Result<Option<SocketAddr>, ConntrackError> {
        // a -> b is the ORIGINAL tuple of an untranslated connection a opened, or the REPLY
        // tuple of one b opened (a DNAT'd one seen at its backend a, a masqueraded one seen
        // after the translation to b). b -> a covers the other two.
        for (kind, src, dst) in [(CTA_TUPLE_ORIG, a, b), (CTA_TUPLE_REPLY, b, a)] {
            if let Some(entry) = self.get(kind, protocol, src, dst)? {
                return Ok(entry.originator_among(a, b));
            }
        }
        Ok(None)
    }

    /// The entry whose tuple `kind` is `src -> dst`, if any.
    fn get(
        &mut self,
        kind: u16,
        protocol: u8,
        src: SocketAddr,
        dst: SocketAddr,
    ) -> Result<Option<Entry>, ConntrackError> {
        self.seq = self.seq.wrapping_add(1);
        let Some(request) = request(self.seq, kind, protocol, src, dst) else {
            return Ok(None);
        };
        // SAFETY: the buffer is valid for its length; the fd is an open netlink socket (to the
        // kernel: no address needed).
        let sent = unsafe {
            libc::send(
                self.fd.as_raw_fd(),
                request.as_ptr().cast(),
                request.len(),
                0,
            )
        };
        if sent < 0 {
            return Err(ConntrackError::Io {
                op: "send IPCTNL_MSG_CT_GET",
                source: io::Error::last_os_error(),
            });
        }
        let mut buf = vec![0u8; 8192];
        // Answers to earlier, timed-out requests may still arrive: skip them, bounded.
        for _ in 0..16 {
            // SAFETY: the buffer is valid for writes of its length.
            let n =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            let Ok(n) = usize::try_from(n) else {
                let error = io::Error::last_os_error();
                if error.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(ConntrackError::Io {
                    op: "recv",
                    source: error,
                });
            };
            match answer(&buf[..n], self.seq)? {
                Reply::NotOurs => {}
                Reply::NoEntry => return Ok(None),
                Reply::Entry(entry) => return Ok(Some(entry)),
            }
        }
        Err(ConntrackError::Malformed("no answer to our request"))
    }
}

/// What an entry says about who opened it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    /// The ORIGINAL tuple's source: the originator before any translation.
    original_src: SocketAddr,
    /// The REPLY tuple's destination: the originator after source translation (the same as
    /// `original_src` without SNAT).
    reply_dst: SocketAddr,
}

impl Entry {
    /// The originator as one of the observed endpoints `a` and `b`; `None` when neither is
    /// (not an entry of this pair).
    fn originator_among(self, a: SocketAddr, b: SocketAddr) -> Option<SocketAddr> {
        [self.original_src, self.reply_dst]
            .into_iter()
            .find(|end| *end == a || *end == b)
    }
}

/// The `IPCTNL_MSG_CT_GET` request for the tuple `a -> b`, carried as the tuple `kind`
/// (ORIGINAL or REPLY); `None` for a mix of families, and for protocols without ports (ICMP's
/// tuple is its type, code and identifier, and an ICMP flow is oriented by its message types
/// anyway: a request or an echo reply says who asked).
fn request(seq: u32, kind: u16, protocol: u8, a: SocketAddr, b: SocketAddr) -> Option<Vec<u8>> {
    /// TCP, UDP, SCTP: the protocols whose conntrack tuples carry ports.
    const WITH_PORTS: [u8; 3] = [6, 17, 132];
    if !WITH_PORTS.contains(&protocol) {
        return None;
    }
    let (family, ip) = match (a.ip(), b.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let mut ip = attr(CTA_IP_V4_SRC, &s.octets());
            ip.extend(attr(CTA_IP_V4_DST, &d.octets()));
            (libc::AF_INET, ip)
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let mut ip = attr(CTA_IP_V6_SRC, &s.octets());
            ip.extend(attr(CTA_IP_V6_DST, &d.octets()));
            (libc::AF_INET6, ip)
        }
        _ => return None,
    };
    let mut proto = attr(CTA_PROTO_NUM, &[protocol]);
    proto.extend(attr(CTA_PROTO_SRC_PORT, &a.port().to_be_bytes()));
    proto.extend(attr(CTA_PROTO_DST_PORT, &b.port().to_be_bytes()));
    let mut tuple = attr(CTA_TUPLE_IP | NLA_F_NESTED, &ip);
    tuple.extend(attr(CTA_TUPLE_PROTO | NLA_F_NESTED, &proto));
    let body = attr(kind | NLA_F_NESTED, &tuple);
    let len = NLMSG_HDR_LEN + NFGENMSG_LEN + body.len();
    let mut out = Vec::with_capacity(len);
    out.extend_from_slice(&u32::try_from(len).ok()?.to_ne_bytes());
    out.extend_from_slice(&CT_GET.to_ne_bytes());
    out.extend_from_slice(&NLM_F_REQUEST.to_ne_bytes());
    out.extend_from_slice(&seq.to_ne_bytes());
    out.extend_from_slice(&0u32.to_ne_bytes());
    // nfgenmsg: family, NFNETLINK_V0, res_id 0.
    out.push(u8::try_from(family).ok()?);
    out.extend_from_slice(&[0, 0, 0]);
    out.extend_from_slice(&body);
    Some(out)
}

/// One netlink attribute, padded to 4 bytes.
fn attr(kind: u16, value: &[u8]) -> Vec<u8> {
    let len = NLA_HDR_LEN + value.len();
    let mut out = Vec::with_capacity(align4(len));
    out.extend_from_slice(&u16::try_from(len).unwrap_or(u16::MAX).to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(value);
    out.resize(align4(len), 0);
    out
}

const fn align4(len: usize) -> usize {
    (len + 3) & !3
}

/// What one datagram says about request `seq`.
#[derive(Debug, PartialEq, Eq)]
enum Reply {
    /// It answers another request.
    NotOurs,
    /// Conntrack has no such entry.
    NoEntry,
    /// The entry.
    Entry(Entry),
}

/// The answer to request `seq` in one datagram.
fn answer(datagram: &[u8], seq: u32) -> Result<Reply, ConntrackError> {
    let mut rest = datagram;
    while rest.len() >= NLMSG_HDR_LEN {
        let len = read_u32(rest, 0) as usize;
        if len < NLMSG_HDR_LEN || len > rest.len() {
            return Err(ConntrackError::Malformed("message length out of bounds"));
        }
        let kind = read_u16(rest, 4);
        let msg_seq = read_u32(rest, 8);
        let payload = &rest[NLMSG_HDR_LEN..len];
        rest = rest.get(align4(len)..).unwrap_or(&[]);
        if msg_seq != seq {
            continue;
        }
        match kind {
            NLMSG_ERROR => {
                let code = payload
                    .get(0..4)
                    .ok_or(ConntrackError::Malformed("short NLMSG_ERROR"))?;
                let errno = -i32::from_ne_bytes([code[0], code[1], code[2], code[3]]);
                return match errno {
                    0 | libc::ENOENT => Ok(Reply::NoEntry),
                    errno => Err(ConntrackError::Nack { errno }),
                };
            }
            CT_NEW => {
                let attrs = payload
                    .get(NFGENMSG_LEN..)
                    .ok_or(ConntrackError::Malformed("short nfgenmsg"))?;
                return Ok(Reply::Entry(Entry {
                    original_src: endpoint(attrs, CTA_TUPLE_ORIG, End::Source)?,
                    reply_dst: endpoint(attrs, CTA_TUPLE_REPLY, End::Destination)?,
                }));
            }
            _ => {}
        }
    }
    Ok(Reply::NotOurs)
}

/// One end of a tuple.
#[derive(Clone, Copy)]
enum End {
    Source,
    Destination,
}

/// The `end` of the tuple `kind` (ORIGINAL or REPLY) in a conntrack entry's attributes.
fn endpoint(attrs: &[u8], kind: u16, end: End) -> Result<SocketAddr, ConntrackError> {
    let (v4, v6, port) = match end {
        End::Source => (CTA_IP_V4_SRC, CTA_IP_V6_SRC, CTA_PROTO_SRC_PORT),
        End::Destination => (CTA_IP_V4_DST, CTA_IP_V6_DST, CTA_PROTO_DST_PORT),
    };
    let tuple = find(attrs, kind)?.ok_or(ConntrackError::Malformed("no tuple"))?;
    let ip = find(tuple, CTA_TUPLE_IP)?.ok_or(ConntrackError::Malformed("no tuple address"))?;
    let proto = find(tuple, CTA_TUPLE_PROTO)?.ok_or(ConntrackError::Malformed("no tuple ports"))?;
    let addr = if let Some(v4) = find(ip, v4)? {
        let octets: [u8; 4] = v4
            .try_into()
            .map_err(|_| ConntrackError::Malformed("IPv4 address length"))?;
        IpAddr::from(octets)
    } else if let Some(v6) = find(ip, v6)? {
        let octets: [u8; 16] = v6
            .try_into()
            .map_err(|_| ConntrackError::Malformed("IPv6 address length"))?;
        IpAddr::from(octets)
    } else {
        return Err(ConntrackError::Malformed("no tuple address"));
    };
    // ICMP tuples carry an identifier instead of ports; the flow's "ports" are that identifier.
    let port = match find(proto, port)? {
        Some(p) if p.len() == 2 => u16::from_be_bytes([p[0], p[1]]),
        Some(_) => return Err(ConntrackError::Malformed("port length")),
        None => 0,
    };
    Ok(SocketAddr::new(addr, port))
}

/// The value of the first attribute of `kind` (nested flag ignored) in `attrs`.
fn find(mut attrs: &[u8], kind: u16) -> Result<Option<&[u8]>, ConntrackError> {
    while attrs.len() >= NLA_HDR_LEN {
        let len = usize::from(read_u16(attrs, 0));
        if len < NLA_HDR_LEN || len > attrs.len() {
            return Err(ConntrackError::Malformed("attribute length out of bounds"));
        }
        if read_u16(attrs, 2) & NLA_TYPE_MASK == kind {
            return Ok(Some(&attrs[NLA_HDR_LEN..len]));
        }
        attrs = attrs.get(align4(len)..).unwrap_or(&[]);
    }
    Ok(None)
}

/// Callers check bounds first.
fn read_u32(buf: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]])
}

fn read_u16(buf: &[u8], at: usize) -> u16 {
    u16::from_ne_bytes([buf[at], buf[at + 1]])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sock(text: &str) -> SocketAddr {
        text.parse().unwrap_or_else(|e| panic!("{text}: {e}"))
    }

    /// The body of a request: exactly one nested tuple of `kind`.
    fn tuple(kind: u16, (src, dst): (SocketAddr, SocketAddr)) -> Vec<u8> {
        let r = request(0, kind, 6, src, dst).unwrap_or_else(|| panic!("same family"));
        r[NLMSG_HDR_LEN + NFGENMSG_LEN..].to_vec()
    }

    /// A `CT_NEW` answer with these ORIGINAL and REPLY tuples, as the kernel writes it (REPLY
    /// after ORIGINAL, a status attribute after both).
    fn entry_of(
        seq: u32,
        original: (SocketAddr, SocketAddr),
        reply: (SocketAddr, SocketAddr),
    ) -> Vec<u8> {
        let mut attrs = tuple(CTA_TUPLE_ORIG, original);
        attrs.extend(tuple(CTA_TUPLE_REPLY, reply));
        attrs.extend(attr(3, &8u32.to_be_bytes()));
        let len = NLMSG_HDR_LEN + NFGENMSG_LEN + attrs.len();
        let mut out = Vec::new();
        out.extend_from_slice(&u32::try_from(len).unwrap().to_ne_bytes());
        out.extend_from_slice(&CT_NEW.to_ne_bytes());
        out.extend_from_slice(&0u16.to_ne_bytes());
        out.extend_from_slice(&seq.to_ne_bytes());
        out.extend_from_slice(&0u32.to_ne_bytes());
        out.extend_from_slice(&[2, 0, 0, 0]);
        out.extend_from_slice(&attrs);
        out
    }

    /// The entry of an untranslated connection `src -> dst`.
    fn entry(seq: u32, src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
        entry_of(seq, (src, dst), (dst, src))
    }

    fn error(seq: u32, errno: i32) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&36u32.to_ne_bytes());
        out.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
        out.extend_from_slice(&0u16.to_ne_bytes());
        out.extend_from_slice(&seq.to_ne_bytes());
        out.extend_from_slice(&0u32.to_ne_bytes());
        out.extend_from_slice(&(-errno).to_ne_bytes());
        out.extend_from_slice(&[0; 16]);
        out
    }

    fn parsed(datagram: &[u8], seq: u32) -> Entry {
        match answer(datagram, seq) {
            Ok(Reply::Entry(entry)) => entry,
            other => panic!("not an entry: {other:?}"),
        }
    }

    #[test]
    fn the_originator_is_the_original_tuple_s_source() {
        let (client, server) = (sock("192.0.2.10:41000"), sock("192.0.2.20:8080"));
        let e = parsed(&entry(7, client, server), 7);
        assert_eq!(
            e,
            Entry {
                original_src: client,
                reply_dst: client
            }
        );
        assert_eq!(e.originator_among(client, server), Some(client));
        assert_eq!(e.originator_among(server, client), Some(client));
        let (c6, s6) = (sock("[2001:db8::10]:41000"), sock("[2001:db8::20]:443"));
        let e6 = parsed(&entry(8, c6, s6), 8);
        assert_eq!(e6.originator_among(s6, c6), Some(c6));
        // Another request's answer is skipped.
        assert_eq!(
            answer(&entry(6, client, server), 7).unwrap(),
            Reply::NotOurs
        );
        assert_eq!(answer(&error(7, libc::ENOENT), 7).unwrap(), Reply::NoEntry);
        assert!(matches!(
            answer(&error(7, libc::EPERM), 7),
            Err(ConntrackError::Nack { errno }) if errno == libc::EPERM
        ));
        let mut cut = entry(7, client, server);
        cut.truncate(cut.len() - 10);
        assert!(answer(&cut, 7).is_err(), "a truncated answer is an error");
    }

    /// Translated connections, mapped back onto the pair an interface saw.
    #[test]
    fn the_originator_of_a_translated_connection_is_one_of_the_observed_pair() {
        let client = sock("10.0.1.2:41000");
        let (vip, backend) = (sock("10.96.0.10:80"), sock("10.0.2.2:8080"));
        // DNAT: ORIGINAL client -> ClusterIP, REPLY backend -> client. Seen at the backend.
        let dnat = parsed(&entry_of(1, (client, vip), (backend, client)), 1);
        assert_eq!(dnat.originator_among(backend, client), Some(client));
        assert_eq!(dnat.originator_among(client, backend), Some(client));
        // SNAT (masquerade to the node's 10.0.2.1:61000): ORIGINAL client -> server, REPLY
        // server -> node. Seen before the translation, the client; after it, the node's port.
        let (server, node) = (sock("10.0.2.2:9090"), sock("10.0.2.1:61000"));
        let snat = parsed(&entry_of(2, (client, server), (server, node)), 2);
        assert_eq!(snat.originator_among(server, client), Some(client));
        assert_eq!(snat.originator_among(server, node), Some(node));
        assert_eq!(snat.originator_among(node, server), Some(node));
        // Not this pair's entry at all.
        assert_eq!(
            snat.originator_among(sock("10.0.9.9:1"), sock("10.0.9.8:2")),
            None
        );
    }

    #[test]
    fn the_request_is_a_nested_tuple_of_the_asked_kind() {
        let r = request(
            3,
            CTA_TUPLE_ORIG,
            17,
            sock("10.0.0.1:5353"),
            sock("10.0.0.2:53"),
        )
        .unwrap();
        assert_eq!(read_u32(&r, 0) as usize, r.len());
        assert_eq!(read_u16(&r, 4), CT_GET);
        assert_eq!(r[NLMSG_HDR_LEN], u8::try_from(libc::AF_INET).unwrap());
        let body = &r[NLMSG_HDR_LEN + NFGENMSG_LEN..];
        assert_eq!(read_u16(body, 2), CTA_TUPLE_ORIG | NLA_F_NESTED);
        assert_eq!(
            endpoint(body, CTA_TUPLE_ORIG, End::Source).unwrap(),
            sock("10.0.0.1:5353")
        );
        assert_eq!(
            endpoint(body, CTA_TUPLE_ORIG, End::Destination).unwrap(),
            sock("10.0.0.2:53")
        );
        let r = request(
            4,
            CTA_TUPLE_REPLY,
            6,
            sock("10.0.0.2:80"),
            sock("10.0.0.1:40000"),
        )
        .unwrap();
        let body = &r[NLMSG_HDR_LEN + NFGENMSG_LEN..];
        assert_eq!(read_u16(body, 2), CTA_TUPLE_REPLY | NLA_F_NESTED);
        assert_eq!(
            endpoint(body, CTA_TUPLE_REPLY, End::Destination).unwrap(),
            sock("10.0.0.1:40000")
        );
        assert!(request(1, CTA_TUPLE_ORIG, 6, sock("10.0.0.1:1"), sock("[::1]:2")).is_none());
        // ICMP and ICMPv6 have no ports to ask by: not asked.
        for icmp in [1, 58] {
            assert!(
                request(
                    1,
                    CTA_TUPLE_ORIG,
                    icmp,
                    sock("10.0.0.1:7"),
                    sock("10.0.0.2:7")
                )
                .is_none()
            );
        }
        assert!(
            request(
                1,
                CTA_TUPLE_ORIG,
                132,
                sock("10.0.0.1:1"),
                sock("10.0.0.2:2")
            )
            .is_some()
        );
    }

    /// Conntrack has no entry for a made-up tuple (documentation addresses): "none", not an
    /// error. Root only (the socket needs `CAP_NET_ADMIN`).
    #[test]
    #[ignore = "needs root; run by cargo xtask test"]
    fn an_unknown_connection_has_no_entry() {
        let mut ct = Conntrack::open().unwrap_or_else(|e| panic!("open: {e}"));
        let got = ct
            .originator(6, sock("192.0.2.1:40000"), sock("192.0.2.2:9"))
            .unwrap_or_else(|e| panic!("ask: {e}"));
        assert_eq!(got, None);
    }
}
