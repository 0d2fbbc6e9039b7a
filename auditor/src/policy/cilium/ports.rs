//! The ports of a Cilium rule entry: `toPorts` (numbers, names, ranges, protocols incl. `ANY`,
//! L7 rules kept apart) and `icmps`.

use super::{IcmpField, IcmpRule, IcmpType, L7Rules, PortProtocol, PortRule, error};
use crate::policy::ir::{Action, CompileError, PortMatch, PortSpec};
use crate::vocab::Protocol;

/// The protocols Cilium's `ANY` stands for (ICMP is only matched by ICMP rules).
/// The ports of one ingress/egress entry: plain ports and the ports that carry L7 rules are
/// kept apart so only the latter are flagged as "L7 not judged".
pub(super) struct EntryPorts {
    /// `None`: the entry has neither `toPorts` nor `icmps`, so it matches every port.
    pub(super) plain: Option<Vec<PortMatch>>,
    pub(super) l7: Vec<PortMatch>,
}

const ANY_PROTOCOLS: [Protocol; 3] = [Protocol::Tcp, Protocol::Udp, Protocol::Sctp];

pub(super) fn ports_of(
    to_ports: Option<&[PortRule]>,
    icmps: Option<&[IcmpRule]>,
    action: Action,
    field: &str,
) -> Result<EntryPorts, CompileError> {
    let to_ports = to_ports.unwrap_or_default();
    let icmps = icmps.unwrap_or_default();
    if to_ports.is_empty() && icmps.is_empty() {
        return Ok(EntryPorts {
            plain: None,
            l7: Vec::new(),
        });
    }
    let mut plain = Vec::new();
    let mut l7 = Vec::new();
    for (index, port_rule) in to_ports.iter().enumerate() {
        let path = format!("{field}.toPorts[{index}]");
        let PortRule {
            ports,
            rules,
            terminating_tls,
            originating_tls,
            server_names,
            listener,
        } = port_rule;
        let l7_kinds = rules.as_ref().map(L7Rules::kinds).unwrap_or_default();
        let proxied = !l7_kinds.is_empty()
            || terminating_tls.is_some()
            || originating_tls.is_some()
            || server_names.as_ref().is_some_and(|names| !names.is_empty())
            || listener.is_some();
        if action == Action::Deny && (proxied || rules.is_some()) {
            return Err(error(
                path,
                "deny rules take only `ports` (no L7 rules, TLS, serverNames or listener)",
            ));
        }
        let target = if proxied { &mut l7 } else { &mut plain };
        match ports.as_deref() {
            // No ports: every port of every protocol `ANY` covers.
            None | Some([]) => target.extend(ANY_PROTOCOLS.iter().map(|&protocol| PortMatch {
                protocol: Some(protocol),
                port: PortSpec::Any,
            })),
            Some(ports) => {
                for (port_index, port) in ports.iter().enumerate() {
                    let path = format!("{path}.ports[{port_index}]");
                    target.extend(port_matches(port, &path)?);
                }
            }
        }
    }
    for (index, icmp) in icmps.iter().enumerate() {
        let IcmpRule { fields } = icmp;
        for (field_index, icmp_field) in fields.iter().flatten().enumerate() {
            let path = format!("{field}.icmps[{index}].fields[{field_index}]");
            // Flows carry no ICMP type: an ICMP conversation the auditor sees is an echo
            // exchange, so only the echo-request type can match one; other types are checked
            // for validity and then match nothing.
            if icmp_is_echo_request(icmp_field, &path)? {
                plain.push(PortMatch {
                    protocol: Some(Protocol::Icmp),
                    port: PortSpec::Any,
                });
            }
        }
    }
    Ok(EntryPorts {
        plain: Some(plain),
        l7,
    })
}

/// Cilium port names follow IANA service names: lower-case letters, digits and single inner
/// hyphens, at least one letter, at most 15 characters. Cilium compares them case-insensitively.
fn is_port_name(text: &str) -> bool {
    let lower = text.to_ascii_lowercase();
    !lower.is_empty()
        && lower.len() <= 15
        && lower
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && lower.bytes().any(|b| b.is_ascii_lowercase())
        && !lower.starts_with('-')
        && !lower.ends_with('-')
        && !lower.contains("--")
}

fn port_matches(port: &PortProtocol, field: &str) -> Result<Vec<PortMatch>, CompileError> {
    let PortProtocol {
        port,
        end_port,
        protocol,
    } = port;
    let protocols: Vec<Protocol> = match protocol.as_deref().map(str::to_ascii_uppercase).as_deref()
    {
        None | Some("" | "ANY") => ANY_PROTOCOLS.to_vec(),
        Some("TCP") => vec![Protocol::Tcp],
        Some("UDP") => vec![Protocol::Udp],
        Some("SCTP") => vec![Protocol::Sctp],
        Some("ICMP" | "ICMPV6") => vec![Protocol::Icmp],
        // Valid in Cilium, but no flow the auditor judges carries them.
        Some("VRRP" | "IGMP") => Vec::new(),
        Some(other) => {
            return Err(error(
                format!("{field}.protocol"),
                format!(
                    "unknown protocol `{other}` (expected TCP, UDP, SCTP, ICMP, ICMPv6 or ANY)"
                ),
            ));
        }
    };
    let text = port.as_deref().unwrap_or("0");
    let spec = if text.is_empty() {
        PortSpec::Any
    } else if text.bytes().all(|b| b.is_ascii_digit()) {
        let number: u16 = text.parse().map_err(|_| {
            error(
                format!("{field}.port"),
                format!("port `{text}` is out of range"),
            )
        })?;
        match end_port {
            _ if number == 0 => PortSpec::Any,
            Some(end) if *end > i32::from(number) => {
                let end = u16::try_from(*end).map_err(|_| {
                    error(
                        format!("{field}.endPort"),
                        format!("endPort {end} is out of range"),
                    )
                })?;
                PortSpec::Range(number, end)
            }
            _ => PortSpec::Range(number, number),
        }
    } else if is_port_name(text) {
        PortSpec::Named(text.to_ascii_lowercase())
    } else {
        return Err(error(
            format!("{field}.port"),
            format!("`{text}` is neither a port number nor a port name"),
        ));
    };
    // For ICMP the "port" is the ICMP type; flows carry none, and an ICMP conversation is an
    // echo exchange, so only "any type" and echo request can match one (as with `icmps`).
    let icmp_spec = match &spec {
        PortSpec::Any | PortSpec::Range(8 | 128, _) => Some(PortSpec::Any),
        PortSpec::Range(..) | PortSpec::Named(_) => None,
    };
    Ok(protocols
        .into_iter()
        .filter_map(|protocol| {
            let port = if protocol == Protocol::Icmp {
                icmp_spec.clone()?
            } else {
                spec.clone()
            };
            Some(PortMatch {
                protocol: Some(protocol),
                port,
            })
        })
        .collect())
}

fn icmp_is_echo_request(field: &IcmpField, path: &str) -> Result<bool, CompileError> {
    let IcmpField { family, icmp_type } = field;
    let v6 = match family.as_deref() {
        None | Some("" | "IPv4") => false,
        Some("IPv6") => true,
        Some(other) => {
            return Err(error(
                format!("{path}.family"),
                format!("unknown family `{other}` (expected IPv4 or IPv6)"),
            ));
        }
    };
    let number = match icmp_type {
        IcmpType::Number(number) => *number,
        IcmpType::Name(name) => icmp_type_by_name(name, v6).ok_or_else(|| {
            error(
                format!("{path}.type"),
                format!("unknown ICMP type name `{name}`"),
            )
        })?,
    };
    Ok(number == if v6 { 128 } else { 8 })
}

/// The ICMP type names Cilium accepts, per family.
fn icmp_type_by_name(name: &str, v6: bool) -> Option<u8> {
    let v4 = [
        ("EchoReply", 0),
        ("DestinationUnreachable", 3),
        ("Redirect", 5),
        ("Echo", 8),
        ("EchoRequest", 8),
        ("RouterAdvertisement", 9),
        ("RouterSelection", 10),
        ("TimeExceeded", 11),
        ("ParameterProblem", 12),
        ("Timestamp", 13),
        ("TimestampReply", 14),
        ("Photuris", 40),
        ("ExtendedEchoRequest", 42),
        ("ExtendedEchoReply", 43),
    ];
    let v6_names = [
        ("DestinationUnreachable", 1),
        ("PacketTooBig", 2),
        ("TimeExceeded", 3),
        ("ParameterProblem", 4),
        ("EchoRequest", 128),
        ("EchoReply", 129),
        ("MulticastListenerQuery", 130),
        ("MulticastListenerReport", 131),
        ("MulticastListenerDone", 132),
        ("RouterSolicitation", 133),
        ("RouterAdvertisement", 134),
        ("NeighborSolicitation", 135),
        ("NeighborAdvertisement", 136),
        ("RedirectMessage", 137),
        ("RouterRenumbering", 138),
        ("ICMPNodeInformationQuery", 139),
        ("ICMPNodeInformationResponse", 140),
        ("InverseNeighborDiscoverySolicitation", 141),
        ("InverseNeighborDiscoveryAdvertisement", 142),
        ("HomeAgentAddressDiscoveryRequest", 144),
        ("HomeAgentAddressDiscoveryReply", 145),
        ("MobilePrefixSolicitation", 146),
        ("MobilePrefixAdvertisement", 147),
        ("DuplicateAddressRequestCodeSuffix", 157),
        ("DuplicateAddressConfirmationCodeSuffix", 158),
        ("ExtendedEchoRequest", 160),
        ("ExtendedEchoReply", 161),
    ];
    let table: &[(&str, u8)] = if v6 { &v6_names } else { &v4 };
    table
        .iter()
        .find(|(known, _)| *known == name)
        .map(|&(_, number)| number)
}
