//! The node's conntrack asked who opened translated connections, against the real kernel: a
//! client, a router (the "node": its nftables translates, and its conntrack is asked) and a
//! server, each in a network namespace of the test's own, wired by veth pairs.
//! - DNAT (what kube-proxy and Calico do for a Service): the client connects to a virtual
//!   address, translated to the server. Seen at the server's side as client -> server, the
//!   inverse of the entry's REPLY tuple; the originator is the client.
//! - SNAT (masquerade on the way to the server): seen before the translation as client ->
//!   server, the originator is the client; seen after it as router -> server, it is the
//!   router's address and the port it chose.
//!
//! Asked either way round: the flow's first packet seen may have been either side's.

#[path = "common/netns.rs"]
mod netns;

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    time::Duration,
};

use auditor::datapath::conntrack::Conntrack;
use netns::{Netns, require_root};

const CLIENT: &str = "198.18.1.2";
const ROUTER_CLIENT_SIDE: &str = "198.18.1.1";
const ROUTER_SERVER_SIDE: &str = "198.18.2.1";
const SERVER: &str = "198.18.2.2";
/// The virtual address (a Service's `ClusterIP`, say) DNAT'd to the server.
const VIP: &str = "198.18.100.1";

/// Client <-> router <-> server, with `nft` (a script) loaded in the router.
struct Lab {
    client: Netns,
    router: Netns,
    server: Netns,
}

impl Lab {
    fn new(tag: &str, nft: &str) -> Self {
        let client = Netns::new(&format!("{tag}-cli"));
        let router = Netns::new(&format!("{tag}-rtr"));
        let server = Netns::new(&format!("{tag}-srv"));
        netns::veth(&router, "toclient", &client, "eth0");
        netns::veth(&router, "toserver", &server, "eth0");
        router.ip(&[
            "addr",
            "add",
            &format!("{ROUTER_CLIENT_SIDE}/24"),
            "dev",
            "toclient",
        ]);
        router.ip(&[
            "addr",
            "add",
            &format!("{ROUTER_SERVER_SIDE}/24"),
            "dev",
            "toserver",
        ]);
        router.sysctl("net.ipv4.ip_forward", "1");
        for (ns, addr, gateway) in [
            (&client, CLIENT, ROUTER_CLIENT_SIDE),
            (&server, SERVER, ROUTER_SERVER_SIDE),
        ] {
            ns.ip(&["addr", "add", &format!("{addr}/24"), "dev", "eth0"]);
            ns.ip(&["route", "add", "default", "via", gateway]);
        }
        router.output(&["nft", nft]);
        Self {
            client,
            router,
            server,
        }
    }

    /// A TCP connection from the client to `to`, accepted by the server's `listener`, data
    /// exchanged both ways (established). Returns (the client's socket, the server's).
    fn connect(&self, listener: &TcpListener, to: SocketAddr) -> (TcpStream, TcpStream) {
        let mut client = self.client.run(|| {
            TcpStream::connect_timeout(&to, Duration::from_secs(5))
                .unwrap_or_else(|e| panic!("connect -> {to}: {e}"))
        });
        let (mut server, _) = listener.accept().unwrap_or_else(|e| panic!("accept: {e}"));
        let mut buf = [0u8; 4];
        for s in [&client, &server] {
            s.set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap_or_else(|e| panic!("{e}"));
        }
        client.write_all(b"ping").unwrap_or_else(|e| panic!("{e}"));
        server
            .read_exact(&mut buf)
            .unwrap_or_else(|e| panic!("{e}"));
        server.write_all(b"pong").unwrap_or_else(|e| panic!("{e}"));
        client
            .read_exact(&mut buf)
            .unwrap_or_else(|e| panic!("{e}"));
        (client, server)
    }

    /// What the router's conntrack says opened the TCP connection observed between `a` and
    /// `b`.
    fn originator(&self, a: SocketAddr, b: SocketAddr) -> Option<SocketAddr> {
        self.router.run(|| {
            let mut ct = Conntrack::open().unwrap_or_else(|e| panic!("open: {e}"));
            ct.originator(6, a, b)
                .unwrap_or_else(|e| panic!("ask about {a} <-> {b}: {e}"))
        })
    }

    fn listen(&self, port: u16) -> TcpListener {
        self.server
            .run(|| TcpListener::bind(addr(SERVER, port)).unwrap_or_else(|e| panic!("bind: {e}")))
    }
}

fn addr(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().unwrap_or_else(|e| panic!("{ip}: {e}")), port)
}

fn local(s: &TcpStream) -> SocketAddr {
    s.local_addr().unwrap_or_else(|e| panic!("{e}"))
}

fn peer(s: &TcpStream) -> SocketAddr {
    s.peer_addr().unwrap_or_else(|e| panic!("{e}"))
}

#[test]
#[ignore = "needs root and the kernel; run by cargo xtask test"]
fn the_originator_of_a_dnat_connection_seen_at_its_backend_is_the_client() {
    require_root();
    let lab = Lab::new(
        "orient-dnat",
        &format!(
            "add table ip orient; \
             add chain ip orient pre {{ type nat hook prerouting priority -100; policy accept; }}; \
             add rule ip orient pre ip daddr {VIP} tcp dport 80 dnat to {SERVER}:8080"
        ),
    );
    let listener = lab.listen(8080);
    let (client, server) = lab.connect(&listener, addr(VIP, 80));
    // Translated: the client talks to the virtual address, the server to the client itself.
    assert_eq!(peer(&client), addr(VIP, 80));
    assert_eq!(peer(&server), local(&client));
    let (client_end, backend) = (local(&client), local(&server));
    assert_eq!(backend, addr(SERVER, 8080));
    // As seen at the backend's interface, whichever side spoke first.
    assert_eq!(lab.originator(client_end, backend), Some(client_end));
    assert_eq!(lab.originator(backend, client_end), Some(client_end));
    // And before the translation (at the client's interface).
    assert_eq!(lab.originator(addr(VIP, 80), client_end), Some(client_end));
    // Another connection of the same pair that does not exist: no entry.
    let other = SocketAddr::new(client_end.ip(), client_end.port() ^ 1);
    assert_eq!(lab.originator(other, backend), None);
}

#[test]
#[ignore = "needs root and the kernel; run by cargo xtask test"]
fn the_originator_of_a_masqueraded_connection_is_its_client_side() {
    require_root();
    let lab = Lab::new(
        "orient-snat",
        "add table ip orient; \
         add chain ip orient post { type nat hook postrouting priority 100; policy accept; }; \
         add rule ip orient post oifname \"toserver\" masquerade",
    );
    let listener = lab.listen(9090);
    let (client, server) = lab.connect(&listener, addr(SERVER, 9090));
    let (client_end, server_end) = (local(&client), local(&server));
    // Translated: the server sees the router's address.
    let translated = peer(&server);
    assert_eq!(translated.ip(), addr(ROUTER_SERVER_SIDE, 0).ip());
    // Before the translation (the client's interface): the client.
    assert_eq!(lab.originator(client_end, server_end), Some(client_end));
    assert_eq!(lab.originator(server_end, client_end), Some(client_end));
    // After it (the router's uplink): the router's side, as translated.
    assert_eq!(lab.originator(server_end, translated), Some(translated));
    assert_eq!(lab.originator(translated, server_end), Some(translated));
}
