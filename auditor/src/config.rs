//! The `--config FILE` YAML: what the cluster's objects cannot tell (the `ingress` entity's
//! addresses, which CNI's ipBlock reading to use, the answer timeout). Unknown keys are errors,
//! so a typo is not silently ignored; every error names the file and line.

use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Deserializer};

use crate::audit::ClusterConfig;
use crate::datapath::attach::AttachMode;
use crate::policy::model::IpBlockReading;

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct Config {
    /// `calico` (default): an ipBlock matches any address; `cilium`: CIDR rules never match pod
    /// or node addresses (SPEC 4.1).
    pub ip_block_reading: IpBlockReading,
    /// Addresses of entities the cluster's objects do not reveal.
    pub entities: Entities,
    /// How long a flow may wait for an answer before it is `unanswered` ("5s", "500ms", "1m").
    #[serde(deserialize_with = "duration")]
    pub answer_timeout: Duration,
    /// `auto` (default: TCX on kernels 6.6+, else clsact), `tcx` or `clsact`.
    pub attach_mode: AttachMode,
    /// `true`: the TC program logs its rare paths (headers it could not read, flows its table
    /// would not take) into the agent's log, target `auditor_ebpf`. Default `false`; `--kernel-log`
    /// turns it on too.
    pub kernel_log: bool,
    /// A flow without packets for this long leaves the flow table ("300s" by default); the
    /// agent remembers it was counted, so a connection resuming later is not counted again.
    #[serde(deserialize_with = "duration")]
    pub idle_timeout: Duration,
    /// Where the flow tables and the map of counted flows are pinned in bpffs, so they survive
    /// agent restarts (default `/sys/fs/bpf/flow-auditor`; the maps go in a subdirectory named
    /// after their layout). `none`: not pinned (a restart forgets every flow).
    pub pin_dir: PinDir,
    /// The node's uplinks (native and tunnel devices; `":default-route"` for the default routes'
    /// devices), as `--uplink` takes them; `--uplink` replaces this list. Default none.
    pub uplinks: Vec<String>,
    /// WireGuard's UDP port on the uplinks, whose packets are encapsulation, not flows (Calico
    /// 51820, the default; Cilium 51871). 0 turns the check off.
    pub wireguard_port: u16,
}

/// Where the flow tables are pinned, or not at all.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PinDir {
    /// Pinned under this directory of a bpffs mount.
    At(PathBuf),
    /// Not pinned.
    Off,
}

/// The default pin directory: the `DaemonSet` mounts the host's `/sys/fs/bpf`.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/flow-auditor";

impl Default for PinDir {
    fn default() -> Self {
        Self::At(PathBuf::from(DEFAULT_PIN_DIR))
    }
}

impl PinDir {
    /// `none`, or an absolute path.
    ///
    /// # Errors
    /// A relative path or an empty one.
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        if text == "none" {
            return Ok(Self::Off);
        }
        let path = PathBuf::from(text);
        if path.is_absolute() {
            Ok(Self::At(path))
        } else {
            Err(format!(
                "{text:?} is not an absolute path in a bpffs mount, nor `none`"
            ))
        }
    }

    /// The directory, when pinning.
    #[must_use]
    pub fn path(&self) -> Option<&Path> {
        match self {
            Self::At(path) => Some(path),
            Self::Off => None,
        }
    }
}

impl<'de> Deserialize<'de> for PinDir {
    fn deserialize<D: Deserializer<'de>>(de: D) -> Result<Self, D::Error> {
        let text = String::deserialize(de)?;
        Self::parse(&text).map_err(serde::de::Error::custom)
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            ip_block_reading: IpBlockReading::Calico,
            entities: Entities::default(),
            // SPEC 2: the default answer timeout.
            answer_timeout: Duration::from_secs(5),
            attach_mode: AttachMode::Auto,
            kernel_log: false,
            idle_timeout: crate::flows::FlowsConfig::default().idle_timeout,
            pin_dir: PinDir::default(),
            uplinks: Vec::new(),
            wireguard_port: auditor_ebpf::DEFAULT_WIREGUARD_PORT,
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Entities {
    /// Cilium's `ingress` entity: the addresses its ingress / Gateway proxy uses.
    pub ingress: Vec<IpNet>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{}: cannot read: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}:{line}: {message}", path.display())]
    Invalid {
        path: PathBuf,
        line: usize,
        message: String,
    },
}

/// Parses a bare number of seconds ("1.5") or a duration in `humantime`'s syntax: "5s",
/// "250ms", "2m", "1h", also "1.5m" or "1h 30m".
pub fn parse_duration(text: &str) -> Option<Duration> {
    let text = text.trim();
    if text.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return Duration::try_from_secs_f64(text.parse().ok()?).ok();
    }
    humantime::parse_duration(text).ok().or_else(|| {
        // humantime wants a digit on each side of a decimal point; ".5s" and "1.s" were
        // always accepted here.
        let split = text.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
        let (number, unit) = text.split_at(split);
        let lead = if number.starts_with('.') { "0" } else { "" };
        let trail = if number.ends_with('.') { "0" } else { "" };
        humantime::parse_duration(&format!("{lead}{number}{trail}{unit}")).ok()
    })
}

fn duration<'de, D: Deserializer<'de>>(de: D) -> Result<Duration, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Seconds(u64),
        Text(String),
    }
    match Raw::deserialize(de)? {
        Raw::Seconds(s) => Ok(Duration::from_secs(s)),
        Raw::Text(t) => parse_duration(&t).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "{t:?} is not a duration (e.g. \"5s\", \"500ms\", \"1m\")"
            ))
        }),
    }
}

impl Config {
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_text(path, &text)
    }

    pub fn from_text(path: &Path, text: &str) -> Result<Self, ConfigError> {
        if text.lines().all(|l| {
            let l = l.trim();
            l.is_empty() || l.starts_with('#')
        }) {
            return Ok(Self::default());
        }
        // The YAML crate's messages already name the field path.
        serde_yaml_ng::from_str(text).map_err(|e| {
            let line = e.location().map_or(1, |l| l.line());
            let text = e.to_string();
            let message = text
                .find(" at line ")
                .map_or(text.clone(), |i| text[..i].to_owned());
            ConfigError::Invalid {
                path: path.to_path_buf(),
                line,
                message,
            }
        })
    }

    /// What judging needs from the configuration.
    #[must_use]
    pub fn cluster_config(&self) -> ClusterConfig {
        ClusterConfig {
            ipblock: self.ip_block_reading,
            ingress: self.entities.ingress.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_timeout_and_pin_dir() {
        let path = Path::new("c.yaml");
        let d = Config::from_text(path, "# nothing\n").unwrap();
        assert_eq!(d.idle_timeout, Duration::from_secs(300));
        assert_eq!(d.pin_dir.path(), Some(Path::new(DEFAULT_PIN_DIR)));
        let c = Config::from_text(path, "idleTimeout: 3s\npinDir: /sys/fs/bpf/x\n").unwrap();
        assert_eq!(c.idle_timeout, Duration::from_secs(3));
        assert_eq!(c.pin_dir.path(), Some(Path::new("/sys/fs/bpf/x")));
        let off = Config::from_text(path, "pinDir: none\n").unwrap();
        assert_eq!(off.pin_dir, PinDir::Off);
        let err = Config::from_text(path, "pinDir: relative/dir\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("c.yaml:1:") && err.contains("absolute path"),
            "{err}"
        );
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("5s"), Some(Duration::from_secs(5)));
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Some(Duration::from_secs(120)));
        assert_eq!(parse_duration("1.5"), Some(Duration::from_millis(1500)));
        assert_eq!(parse_duration("5 parsecs"), None);
        assert_eq!(parse_duration(""), None);
    }

    #[test]
    fn durations_humantime_reads_and_what_was_always_accepted() {
        let ms = |n| Some(Duration::from_millis(n));
        assert_eq!(parse_duration("1h"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_duration(" 5 s "), ms(5_000));
        assert_eq!(parse_duration("1.5m"), ms(90_000));
        assert_eq!(parse_duration(".5s"), ms(500));
        assert_eq!(parse_duration("2.h"), ms(7_200_000));
        assert_eq!(parse_duration("2."), ms(2_000));
        assert_eq!(parse_duration("1h 30m"), ms(5_400_000));
        assert_eq!(parse_duration("-1s"), None);
        assert_eq!(parse_duration("."), None);
        assert_eq!(parse_duration("s"), None);
    }

    #[test]
    fn defaults_and_overrides() {
        let path = Path::new("config.yaml");
        let empty = Config::from_text(path, "# nothing\n").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(empty, Config::default());
        assert_eq!(empty.answer_timeout, Duration::from_secs(5));
        let c = Config::from_text(
            path,
            "ipBlockReading: cilium\nentities: {ingress: [10.0.0.0/24, \"fd00::/64\"]}\nanswerTimeout: 750ms\n",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.ip_block_reading, IpBlockReading::Cilium);
        assert_eq!(c.entities.ingress.len(), 2);
        assert_eq!(c.answer_timeout, Duration::from_millis(750));
        assert_eq!(c.cluster_config().ingress, c.entities.ingress);
        assert!(!c.kernel_log, "kernel logging is off unless asked for");
        let c = Config::from_text(path, "kernelLog: true\n").unwrap_or_else(|e| panic!("{e}"));
        assert!(c.kernel_log);
        assert!(c.uplinks.is_empty(), "no uplinks unless configured");
        assert_eq!(c.wireguard_port, 51820);
        let c = Config::from_text(
            path,
            "uplinks: [cilium_vxlan, \":default-route\"]\nwireguardPort: 51871\n",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.uplinks, ["cilium_vxlan", ":default-route"]);
        assert_eq!(c.wireguard_port, 51871);
        assert!(Config::from_text(path, "wireguardPort: 70000\n").is_err());
    }

    #[test]
    fn errors_name_the_line() {
        let path = Path::new("config.yaml");
        let err = Config::from_text(path, "entities:\n  ingress: [not-a-cidr]\n")
            .err()
            .unwrap_or_else(|| panic!("accepted a bad CIDR"));
        assert!(err.to_string().starts_with("config.yaml:2:"), "{err}");
        let err = Config::from_text(path, "answerTimeout: soon\n")
            .err()
            .unwrap_or_else(|| panic!("accepted a bad duration"));
        assert!(err.to_string().contains("not a duration"), "{err}");
    }
}
