//! Loads the TC program object: sizes its maps and sets its sampling and its log records from
//! configuration (no recompiling), has the kernel verify both hook programs, and hands out a
//! typed [`Datapath`] through which the attach manager reaches the programs and the reader
//! reaches the maps and the program's log.

use std::{
    borrow::{Borrow, BorrowMut},
    io,
    os::fd::AsFd as _,
    path::{Path, PathBuf},
};

use auditor_ebpf::{
    COUNTERS_MAP, DEFAULT_EVENTS_BYTES, DEFAULT_FLOW_TABLE_ENTRIES, DEFAULT_WIREGUARD_PORT,
    EVENTS_MAP, FLOWS_MAP, FLOWS4_MAP, FLOWS4_TCP_MAP, KERNEL_LOG_MAP, PROGRAM_EGRESS,
    PROGRAM_INGRESS, PROGRAM_NOOP, PROGRAM_UPLINK_EGRESS, PROGRAM_UPLINK_INGRESS, REPORTED_MAP,
    SAMPLE_EVERY_GLOBAL, WIREGUARD_PORT_GLOBAL,
    flow::{Counter, FLOW_LAYOUT, FlowKey, FlowKey4, FlowKeyTcp4, FlowState},
};
use aya::{
    Ebpf, EbpfError, EbpfLoader,
    maps::{HashMap, Map, MapData, MapError, PerCpuArray, RingBuf},
    programs::{ProgramError, SchedClassifier},
};
use serde::{Deserialize, Serialize};

use super::{EBPF_OBJECT, attach::TcPrograms, kernel_log::KernelLog};

/// What can be tuned in the datapath without recompiling the program.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DatapathConfig {
    /// Capacity of each of the three flow tables, IPv4 TCP flows, other IPv4 flows and all
    /// others (LRU: the least recently used flow makes room for a new one). Each entry costs
    /// about 170 bytes of kernel memory (145 in the IPv4 tables) with the hash table's own
    /// overhead, allocated up front.
    pub flow_table_entries: u32,
    /// Event ring buffer size in bytes; rounded up to a power of two of at least one page, as the
    /// kernel requires (so a multiple of the page size: 4 KiB here, 16 KiB on the Raspberry Pi 5).
    pub events_bytes: u32,
    /// Keep one in this many packets of answered flows that carry no state change (no SYN, FIN,
    /// RST); 0 or 1 keeps all. Skipped packets are counted in [`Counter::SampledOut`] and are
    /// missing from the flow's packet and byte counts.
    pub sample_every: u32,
    /// Have the program write a log record (aya-log) on its rare paths: headers it could not
    /// read, a flow the table would not take. Off, the verifier removes the records, so the
    /// program runs as if they did not exist. [`Datapath::take_kernel_log`] hands out the reader
    /// that turns them into `tracing` events.
    pub kernel_log: bool,
    /// The UDP port WireGuard uses on this node's uplinks: packets to or from it there are
    /// encapsulation, not flows (counted as `encapsulated`). 0 turns the check off.
    pub wireguard_port: u16,
}

impl Default for DatapathConfig {
    fn default() -> Self {
        Self {
            flow_table_entries: DEFAULT_FLOW_TABLE_ENTRIES,
            events_bytes: DEFAULT_EVENTS_BYTES,
            sample_every: 1,
            kernel_log: false,
            wireguard_port: DEFAULT_WIREGUARD_PORT,
        }
    }
}

/// The TC programs of the object, by the hook each serves: the agent attaches all four.
pub const HOOK_PROGRAMS: [&str; 4] = [
    PROGRAM_INGRESS,
    PROGRAM_EGRESS,
    PROGRAM_UPLINK_INGRESS,
    PROGRAM_UPLINK_EGRESS,
];

/// Failures of loading the datapath, with what was being done.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("datapath configuration: {field} = {value}: {reason}")]
    InvalidConfig {
        field: &'static str,
        value: u64,
        reason: &'static str,
    },
    #[error("reading the kernel's page size")]
    PageSize(#[source] io::Error),
    #[error("loading the eBPF object (maps and relocations)")]
    Object(#[source] EbpfError),
    #[error("the eBPF object has no program {name}")]
    MissingProgram { name: &'static str },
    #[error("program {name}: {op}")]
    Program {
        name: &'static str,
        op: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("the eBPF object has no map {name}")]
    MissingMap { name: &'static str },
    #[error("opening the program's log records")]
    KernelLog(#[source] aya_log::Error),
    #[error("reading the flow tables")]
    Walk(#[source] io::Error),
    #[error("pinning the flow tables in {path}: {op}")]
    Pins {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("map {name}: {op}")]
    Map {
        name: &'static str,
        op: &'static str,
        #[source]
        source: MapError,
    },
}

/// The flow tables, borrowed from the [`Datapath`] or taken from it: IPv4 TCP flows under the
/// 12-byte [`FlowKeyTcp4`], other IPv4 flows under the 16-byte [`FlowKey4`] (short keys cost the
/// kernel less to hash per packet), all others under the [`FlowKey`]. Callers see [`FlowKey`]s
/// only; each flow is in exactly one table.
pub struct FlowTables<T> {
    tcp4: HashMap<T, FlowKeyTcp4, FlowState>,
    v4: HashMap<T, FlowKey4, FlowState>,
    other: HashMap<T, FlowKey, FlowState>,
}

/// Which table a flow is kept in, under which key.
enum Slot {
    Tcp4(FlowKeyTcp4),
    V4(FlowKey4),
    Other,
}

/// The table of `key`: the program's choice (`TableKey` in `auditor-ebpf`).
fn slot(key: &FlowKey) -> Slot {
    match key.narrow() {
        Some(key4) => key4.tcp().map_or(Slot::V4(key4), Slot::Tcp4),
        None => Slot::Other,
    }
}

/// The index of `key`'s table in [`TABLES`] order (IPv4 TCP, other IPv4, the rest), for
/// per-table counts.
#[must_use]
pub fn table_index(key: &FlowKey) -> usize {
    match slot(key) {
        Slot::Tcp4(_) => 0,
        Slot::V4(_) => 1,
        Slot::Other => 2,
    }
}

/// The flow tables' map names, in [`table_index`] order.
pub const TABLES: [&str; 3] = [FLOWS4_TCP_MAP, FLOWS4_MAP, FLOWS_MAP];

/// Every map pinned in the layout directory: the flow tables and the map of the flows counted
/// ([`REPORTED_MAP`]), adopted, replaced and removed together.
pub const PINNED: [&str; 4] = [FLOWS4_TCP_MAP, FLOWS4_MAP, FLOWS_MAP, REPORTED_MAP];

impl<T> FlowTables<T> {
    /// The tables from their maps (owned, borrowed or mutably borrowed), in [`TABLES`] order.
    fn from_maps<M>([tcp4, v4, other]: [M; 3]) -> Result<Self, LoadError>
    where
        HashMap<T, FlowKeyTcp4, FlowState>: TryFrom<M, Error = MapError>,
        HashMap<T, FlowKey4, FlowState>: TryFrom<M, Error = MapError>,
        HashMap<T, FlowKey, FlowState>: TryFrom<M, Error = MapError>,
    {
        let [tcp4_name, v4_name, other_name] = TABLES;
        Ok(Self {
            tcp4: HashMap::try_from(tcp4).map_err(|e| map_error(tcp4_name, e))?,
            v4: HashMap::try_from(v4).map_err(|e| map_error(v4_name, e))?,
            other: HashMap::try_from(other).map_err(|e| map_error(other_name, e))?,
        })
    }
}

impl<T: Borrow<MapData>> FlowTables<T> {
    /// The entry of `key`, read from the table it belongs in.
    ///
    /// # Errors
    /// [`MapError::KeyNotFound`] when the flow is in none of the tables, or the read's failure.
    pub fn get(&self, key: &FlowKey) -> Result<FlowState, MapError> {
        match slot(key) {
            Slot::Tcp4(tcp) => self.tcp4.get(&tcp, 0),
            Slot::V4(key4) => self.v4.get(&key4, 0),
            Slot::Other => self.other.get(key, 0),
        }
    }

    /// Every entry of every table, narrow keys widened back to [`FlowKey`]s.
    pub fn iter(&self) -> impl Iterator<Item = Result<(FlowKey, FlowState), MapError>> + '_ {
        let tcp4 = self
            .tcp4
            .iter()
            .map(|entry| entry.map(|(tcp, state)| (tcp.widen(), state)));
        let v4 = self
            .v4
            .iter()
            .map(|entry| entry.map(|(key4, state)| (key4.widen(), state)));
        tcp4.chain(v4).chain(self.other.iter())
    }
}

impl<T: BorrowMut<MapData>> FlowTables<T> {
    /// Deletes the entry of `key` from the table it belongs in.
    ///
    /// # Errors
    /// [`MapError::KeyNotFound`] when it is in none of them, or the deletion's failure.
    pub fn remove(&mut self, key: &FlowKey) -> Result<(), MapError> {
        match slot(key) {
            Slot::Tcp4(tcp) => self.tcp4.remove(&tcp),
            Slot::V4(key4) => self.v4.remove(&key4),
            Slot::Other => self.other.remove(key),
        }
    }
}

/// The directory the flow tables of this build's layout are pinned in, under `base`:
/// `base/v<FLOW_LAYOUT in hex>`. Another layout has another directory, so an agent never adopts
/// tables whose bytes mean something else.
#[must_use]
pub fn pin_dir(base: &Path) -> PathBuf {
    base.join(format!("v{FLOW_LAYOUT:08x}"))
}

/// What loading found in the pin directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pinned {
    /// Where the flow tables are pinned.
    pub dir: PathBuf,
    /// The tables were already pinned there (a predecessor's, now adopted with their flows).
    pub adopted: bool,
    /// Pin directories of other layouts, removed.
    pub removed_layouts: Vec<PathBuf>,
}

/// Creates `base` and this layout's directory in it, and removes the pins of other layouts
/// (directories named `v...` besides ours; anything else in `base` is left alone).
fn prepare_pins(base: &Path) -> Result<(PathBuf, Vec<PathBuf>), LoadError> {
    let dir = pin_dir(base);
    let pins_error = |path: &Path, op, source| LoadError::Pins {
        path: path.to_path_buf(),
        op,
        source,
    };
    std::fs::create_dir_all(&dir).map_err(|e| pins_error(&dir, "create the directory", e))?;
    if !is_bpffs(&dir)? {
        // Not a bpffs: the directory was made on another filesystem; leave nothing behind.
        let _ = std::fs::remove_dir(&dir);
        let _ = std::fs::remove_dir(base);
        return Err(pins_error(
            base,
            "is not in a bpffs mount (mount -t bpf bpf /sys/fs/bpf, or the DaemonSet's hostPath)",
            io::Error::from(io::ErrorKind::Unsupported),
        ));
    }
    let mut removed = Vec::new();
    let entries = std::fs::read_dir(base).map_err(|e| pins_error(base, "list", e))?;
    for entry in entries {
        let entry = entry.map_err(|e| pins_error(base, "list", e))?;
        let path = entry.path();
        let is_layout = is_layout_name(&entry.file_name().to_string_lossy())
            && entry.file_type().is_ok_and(|t| t.is_dir());
        if is_layout && path != dir {
            remove_pins(&path)?;
            // Only the tables are ours: a directory holding anything else is left as it is.
            match std::fs::remove_dir(&path) {
                Ok(()) => removed.push(path),
                Err(e) => tracing::warn!(
                    path = %path.display(),
                    error = %e,
                    "another layout's pin directory holds more than its flow tables; left there"
                ),
            }
        }
    }
    Ok((dir, removed))
}

/// Whether `name` is a layout directory's name: `v` and the layout as 8 lower-case hex digits,
/// as [`pin_dir`] writes it. Nothing else in the base directory is touched.
fn is_layout_name(name: &str) -> bool {
    name.len() == 9
        && name.starts_with('v')
        && name[1..]
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Whether `path` lies in a bpffs mount.
fn is_bpffs(path: &Path) -> Result<bool, LoadError> {
    use std::os::unix::ffi::OsStrExt as _;
    /// `BPF_FS_MAGIC` from uapi/linux/magic.h.
    const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
    let pins_error = |source| LoadError::Pins {
        path: path.to_path_buf(),
        op: "statfs",
        source,
    };
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|e| pins_error(io::Error::new(io::ErrorKind::InvalidInput, e)))?;
    // SAFETY: statfs is plain data; all-zero is a valid value to be overwritten.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated path and a statfs to write to.
    if unsafe { libc::statfs(c_path.as_ptr(), &raw mut stat) } != 0 {
        return Err(pins_error(io::Error::last_os_error()));
    }
    #[allow(
        clippy::unnecessary_cast,
        clippy::useless_conversion,
        reason = "f_type's width differs between architectures and C libraries"
    )]
    let kind = i64::from(stat.f_type as i64);
    Ok(kind == BPF_FS_MAGIC)
}

/// Unpins the maps pinned in `dir` ([`PINNED`]: the flow tables and the counted flows; the maps
/// go once nothing else holds them); nothing else in `dir` is touched.
fn remove_pins(dir: &Path) -> Result<(), LoadError> {
    let pins_error = |op, source| LoadError::Pins {
        path: dir.to_path_buf(),
        op,
        source,
    };
    for name in PINNED {
        let path = dir.join(name);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(pins_error("unpin", e)),
        }
    }
    Ok(())
}

/// The loaded and verified datapath: programs ready to attach, maps ready to read.
pub struct Datapath {
    ebpf: Ebpf,
    effective: DatapathConfig,
    /// The reader of the program's log records, until taken (empty with `kernel_log` off).
    kernel_log: Option<KernelLog>,
    /// Where the flow tables are pinned, when they are.
    pinned: Option<Pinned>,
}

impl std::fmt::Debug for Datapath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Datapath")
            .field("effective", &self.effective)
            .finish_non_exhaustive()
    }
}

impl Datapath {
    /// Loads the object embedded at build time with `config` and has the kernel verify the
    /// ingress and egress programs. Needs `CAP_BPF` and `CAP_NET_ADMIN` (or root).
    ///
    /// # Errors
    /// On an invalid configuration, or when the kernel refuses a map or program (the verifier's
    /// log is in the error's source chain).
    pub fn load(config: &DatapathConfig) -> Result<Self, LoadError> {
        Self::load_pinned(config, None)
    }

    /// [`Datapath::load`] with the flow tables and the map of counted flows ([`PINNED`]) pinned
    /// under `pin_base` (a directory in a bpffs mount, see [`pin_dir`]): maps already pinned
    /// there by a predecessor of the same layout and size are adopted with their flows, so they
    /// survive agent restarts; otherwise new ones are created and pinned. Pins of other layouts
    /// are removed, and so are this layout's when the size of one of them no longer matches the
    /// configuration (all four are replaced together: the flows in them are lost, once). The
    /// ring buffer and the counters are not pinned: they are per agent.
    ///
    /// # Errors
    /// As [`Datapath::load`], and when the pin directory cannot be prepared.
    pub fn load_pinned(
        config: &DatapathConfig,
        pin_base: Option<&Path>,
    ) -> Result<Self, LoadError> {
        let Some(base) = pin_base else {
            return Self::load_with(config, None);
        };
        let (dir, removed_layouts) = prepare_pins(base)?;
        let adopted = TABLES.iter().all(|name| dir.join(name).exists());
        let pinned = Pinned {
            dir,
            adopted,
            removed_layouts,
        };
        match Self::load_with(config, Some(pinned.clone())) {
            Err(LoadError::Object(EbpfError::MapError(MapError::IncompatiblePinnedMap {
                name,
                property,
                expected,
                actual,
            }))) => {
                tracing::warn!(
                    map = name,
                    property,
                    expected,
                    actual,
                    dir = %pinned.dir.display(),
                    "the pinned flow maps do not match the configuration; replacing them (their flows are counted again as they are seen)"
                );
                remove_pins(&pinned.dir)?;
                Self::load_with(
                    config,
                    Some(Pinned {
                        adopted: false,
                        ..pinned
                    }),
                )
            }
            other => other,
        }
    }

    fn load_with(config: &DatapathConfig, pinned: Option<Pinned>) -> Result<Self, LoadError> {
        let page = page_size()?;
        let effective = effective_config(config, page)?;
        let DatapathConfig {
            flow_table_entries,
            events_bytes,
            sample_every,
            kernel_log,
            wireguard_port,
        } = effective;
        let log_level = kernel_log_level(kernel_log);
        let mut loader = EbpfLoader::new();
        loader
            .map_max_entries(FLOWS_MAP, flow_table_entries)
            .map_max_entries(FLOWS4_MAP, flow_table_entries)
            .map_max_entries(FLOWS4_TCP_MAP, flow_table_entries)
            .map_max_entries(REPORTED_MAP, reported_entries(flow_table_entries)?)
            .map_max_entries(EVENTS_MAP, events_bytes)
            .override_global(SAMPLE_EVERY_GLOBAL, &sample_every, true)
            .override_global(WIREGUARD_PORT_GLOBAL, &wireguard_port, true)
            // aya-log's level global: every record's level is compared with it, and, in
            // `.rodata`, it is a constant to the verifier, which prunes the records it disables.
            .override_global(aya_log::LEVEL, &log_level, true);
        if !kernel_log {
            // The programs still name the record ring buffer; unused, it need not be 128 KiB.
            loader.map_max_entries(KERNEL_LOG_MAP, page);
        }
        if let Some(pinned) = &pinned {
            for name in PINNED {
                loader.map_pin_path(name, pinned.dir.join(name));
            }
        }
        let mut ebpf = loader.load(EBPF_OBJECT).map_err(LoadError::Object)?;
        for name in HOOK_PROGRAMS {
            let program = classifier_mut(&mut ebpf, name)?;
            program.load().map_err(|source| LoadError::Program {
                name,
                op: "verify and load",
                source,
            })?;
            // What the verifier processed (`verified_insns`, kernel 5.16+): how close this
            // kernel's verifier is to its limit; `cargo xtask test-kernels` reports it per kernel.
            let info = program.info().ok();
            tracing::info!(
                program = name,
                id = info.as_ref().map(aya::programs::ProgramInfo::id),
                verified_instructions = info
                    .as_ref()
                    .and_then(aya::programs::ProgramInfo::verified_instruction_count),
                "program verified and loaded"
            );
        }
        // Taken with logging off too: an empty reader shows the records really are off.
        let kernel_log = Some(KernelLog::take(&mut ebpf).map_err(LoadError::KernelLog)?);
        Ok(Self {
            ebpf,
            effective,
            kernel_log,
            pinned,
        })
    }

    /// Where the flow tables are pinned and whether a predecessor's were adopted; `None` when
    /// they are not pinned.
    #[must_use]
    pub const fn pinned(&self) -> Option<&Pinned> {
        self.pinned.as_ref()
    }

    /// The map of counted flows ([`REPORTED_MAP`]), borrowed.
    ///
    /// # Errors
    /// Only if the map was taken or has the wrong type.
    pub fn reported(&self) -> Result<HashMap<&MapData, FlowKey, u64>, LoadError> {
        let map = self
            .ebpf
            .map(REPORTED_MAP)
            .ok_or(LoadError::MissingMap { name: REPORTED_MAP })?;
        HashMap::try_from(map).map_err(|source| map_error(REPORTED_MAP, source))
    }

    fn reported_mut(&mut self) -> Result<HashMap<&mut MapData, FlowKey, u64>, LoadError> {
        let map = self
            .ebpf
            .map_mut(REPORTED_MAP)
            .ok_or(LoadError::MissingMap { name: REPORTED_MAP })?;
        HashMap::try_from(map).map_err(|source| map_error(REPORTED_MAP, source))
    }

    /// Records that this agent counted the flow of `key` whose table entry was first seen at
    /// `first_seen_ns` ([`FlowState::first_seen_ns`]), in [`REPORTED_MAP`]: a successor adopting
    /// the pinned maps does not count it again, and does count an entry recreated under the same
    /// key later (another `first_seen_ns`). The table entry itself is not touched: no write to
    /// the LRU table, which would allocate a node and so evict another flow when the table is
    /// full, and no read-modify-write racing the program's counters.
    ///
    /// # Errors
    /// When the map cannot take the entry: full (`E2BIG` in the source chain) or another error.
    pub fn mark_reported(&mut self, key: &FlowKey, first_seen_ns: u64) -> Result<(), LoadError> {
        self.reported_mut()?
            .insert(key, &first_seen_ns, 0)
            .map_err(|source| map_op_error(REPORTED_MAP, "insert", source))
    }

    /// Deletes the counted mark of `key` (its flow is forgotten for good); a missing one is fine.
    ///
    /// # Errors
    /// When the deletion fails for another reason.
    pub fn forget_reported(&mut self, key: &FlowKey) -> Result<(), LoadError> {
        match self.reported_mut()?.remove(key) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => {
                Ok(())
            }
            Err(source) => Err(map_op_error(REPORTED_MAP, "delete", source)),
        }
    }

    /// Calls `each` with every counted flow's key and the `first_seen_ns` it was counted with,
    /// reading many per system call where the kernel can; returns how many there were.
    ///
    /// # Errors
    /// When the map is missing or reading it fails.
    pub fn for_each_reported(
        &self,
        mut each: impl FnMut(FlowKey, u64),
    ) -> Result<usize, LoadError> {
        let fd = match self.ebpf.map(REPORTED_MAP) {
            Some(Map::HashMap(data)) => data.fd().as_fd(),
            Some(_) => {
                return Err(map_error(
                    REPORTED_MAP,
                    MapError::InvalidMapType { map_type: 0 },
                ));
            }
            None => return Err(LoadError::MissingMap { name: REPORTED_MAP }),
        };
        match super::batch::for_each::<FlowKey, u64>(fd, |key, first_seen| each(*key, *first_seen))
        {
            Ok(n) => Ok(n),
            Err(super::batch::BatchError::Unsupported(_)) => {
                // Only user space writes the map, and it is not writing now: no restarts.
                let bound = reported_entries(self.effective.flow_table_entries)? as usize;
                let mut n = 0;
                for entry in self.reported()?.iter().take(bound) {
                    match entry {
                        Ok((key, first_seen)) => {
                            each(key, first_seen);
                            n += 1;
                        }
                        Err(MapError::KeyNotFound) => {}
                        Err(source) => return Err(map_op_error(REPORTED_MAP, "read", source)),
                    }
                }
                Ok(n)
            }
            Err(super::batch::BatchError::Failed(error)) => Err(LoadError::Walk(error)),
        }
    }

    /// The configuration in force: `events_bytes` rounded up, `sample_every` 0 turned into 1.
    #[must_use]
    pub const fn config(&self) -> DatapathConfig {
        self.effective
    }

    /// The reader of the program's log records, taken out (to poll it where events are read);
    /// `None` once taken. With `kernel_log` off the program writes none: it stays empty.
    pub const fn take_kernel_log(&mut self) -> Option<KernelLog> {
        self.kernel_log.take()
    }

    /// Emits the program's log records waiting now as `tracing` events on the calling thread,
    /// unless the reader was taken.
    pub fn flush_kernel_log(&mut self) {
        if let Some(log) = &mut self.kernel_log {
            log.flush();
        }
    }

    /// The hook programs ([`HOOK_PROGRAMS`]), for the attach manager.
    ///
    /// # Errors
    /// Only if the object lacks a program (a build problem).
    pub fn programs(&mut self) -> Result<TcPrograms<'_>, LoadError> {
        let mut slots: [Option<&mut SchedClassifier>; 4] = [None, None, None, None];
        for (name, program) in self.ebpf.programs_mut() {
            let Some(i) = HOOK_PROGRAMS.iter().position(|p| *p == name) else {
                continue;
            };
            slots[i] = Some(<&mut SchedClassifier>::try_from(program).map_err(|source| {
                LoadError::Program {
                    name: HOOK_PROGRAMS[i],
                    op: "is not a TC classifier",
                    source,
                }
            })?);
        }
        let [ingress, egress, uplink_ingress, uplink_egress] = slots;
        let missing = |i: usize| LoadError::MissingProgram {
            name: HOOK_PROGRAMS[i],
        };
        Ok(TcPrograms {
            ingress: ingress.ok_or_else(|| missing(0))?,
            egress: egress.ok_or_else(|| missing(1))?,
            uplink_ingress: uplink_ingress.ok_or_else(|| missing(2))?,
            uplink_egress: uplink_egress.ok_or_else(|| missing(3))?,
        })
    }

    /// One program by name (`auditor_ebpf::PROGRAM_*`); the no-op baseline is loaded (verified)
    /// on first request, since only the benchmark uses it.
    ///
    /// # Errors
    /// When the object has no such program or the kernel refuses it.
    pub fn program(&mut self, name: &'static str) -> Result<&mut SchedClassifier, LoadError> {
        let program = classifier_mut(&mut self.ebpf, name)?;
        if name == PROGRAM_NOOP && program.fd().is_err() {
            program.load().map_err(|source| LoadError::Program {
                name,
                op: "verify and load",
                source,
            })?;
        }
        Ok(program)
    }

    /// The flow tables, borrowed (for walking them while the datapath keeps ownership).
    ///
    /// # Errors
    /// Only if a map was taken or has the wrong type.
    pub fn flows(&self) -> Result<FlowTables<&MapData>, LoadError> {
        let map = |name| self.ebpf.map(name).ok_or(LoadError::MissingMap { name });
        let [tcp4, v4, other] = TABLES;
        FlowTables::from_maps([map(tcp4)?, map(v4)?, map(other)?])
    }

    /// Calls `each` for every entry of every flow table, reading many entries per system call
    /// where the kernel can (see [`super::batch`]), one by one where it cannot. Returns how many
    /// entries were read from each table, in [`TABLES`] order.
    ///
    /// # Errors
    /// When a table is missing or reading it fails.
    pub fn for_each_flow(
        &self,
        mut each: impl FnMut(FlowKey, &FlowState),
    ) -> Result<[usize; TABLES.len()], LoadError> {
        let fd = |name| match self.ebpf.map(name) {
            Some(Map::LruHashMap(data) | Map::HashMap(data)) => Ok(data.fd().as_fd()),
            Some(_) => Err(map_error(name, MapError::InvalidMapType { map_type: 0 })),
            None => Err(LoadError::MissingMap { name }),
        };
        let [tcp4, v4, other] = TABLES;
        let (tcp4, v4, other) = (fd(tcp4)?, fd(v4)?, fd(other)?);
        let batched = super::batch::for_each::<FlowKeyTcp4, FlowState>(tcp4, |key, state| {
            each(key.widen(), state);
        })
        .and_then(|tcp4| {
            super::batch::for_each::<FlowKey4, FlowState>(v4, |key, state| {
                each(key.widen(), state);
            })
            .map(|v4| (tcp4, v4))
        })
        .and_then(|(tcp4, v4)| {
            super::batch::for_each::<FlowKey, FlowState>(other, |key, state| each(*key, state))
                .map(|other| [tcp4, v4, other])
        });
        match batched {
            Ok(n) => Ok(n),
            Err(super::batch::BatchError::Unsupported(_)) => {
                // Evictions during a one-by-one walk restart it from the start: bounded.
                let bound = 4 * TABLES.len() * self.effective.flow_table_entries as usize;
                let mut n = [0; TABLES.len()];
                for entry in self.flows()?.iter().take(bound) {
                    match entry {
                        Ok((key, state)) => {
                            each(key, &state);
                            n[table_index(&key)] += 1;
                        }
                        // Deleted between finding the key and reading it.
                        Err(MapError::KeyNotFound) => {}
                        Err(source) => return Err(map_error(FLOWS_MAP, source)),
                    }
                }
                Ok(n)
            }
            Err(super::batch::BatchError::Failed(error)) => Err(LoadError::Walk(error)),
        }
    }

    /// The flow tables, mutably borrowed (the reader deletes expired flows).
    ///
    /// # Errors
    /// Only if a map was taken or has the wrong type.
    pub fn flows_mut(&mut self) -> Result<FlowTables<&mut MapData>, LoadError> {
        let mut maps: [Option<&mut Map>; 3] = [None, None, None];
        for (name, map) in self.ebpf.maps_mut() {
            if let Some(i) = TABLES.iter().position(|table| *table == name) {
                maps[i] = Some(map);
            }
        }
        let [tcp4, v4, other] = maps;
        let missing = |i: usize| LoadError::MissingMap { name: TABLES[i] };
        FlowTables::from_maps([
            tcp4.ok_or_else(|| missing(0))?,
            v4.ok_or_else(|| missing(1))?,
            other.ok_or_else(|| missing(2))?,
        ])
    }

    /// The event ring buffer, mutably borrowed.
    ///
    /// # Errors
    /// Only if the map was taken or has the wrong type.
    pub fn events_mut(&mut self) -> Result<RingBuf<&mut MapData>, LoadError> {
        let map = self
            .ebpf
            .map_mut(EVENTS_MAP)
            .ok_or(LoadError::MissingMap { name: EVENTS_MAP })?;
        RingBuf::try_from(map).map_err(|source| map_error(EVENTS_MAP, source))
    }

    /// The event ring buffer, taken out (to move into a reader task; wrap it in `AsyncFd`).
    ///
    /// # Errors
    /// When already taken.
    pub fn take_events(&mut self) -> Result<RingBuf<MapData>, LoadError> {
        let map = self
            .ebpf
            .take_map(EVENTS_MAP)
            .ok_or(LoadError::MissingMap { name: EVENTS_MAP })?;
        RingBuf::try_from(map).map_err(|source| map_error(EVENTS_MAP, source))
    }

    /// The flow tables, taken out.
    ///
    /// # Errors
    /// When already taken.
    pub fn take_flows(&mut self) -> Result<FlowTables<MapData>, LoadError> {
        let mut take = |name| {
            let map = self
                .ebpf
                .take_map(name)
                .ok_or(LoadError::MissingMap { name })?;
            Ok::<_, LoadError>(map)
        };
        let [tcp4, v4, other] = TABLES;
        FlowTables::from_maps([take(tcp4)?, take(v4)?, take(other)?])
    }

    /// The per-CPU counters, borrowed.
    ///
    /// # Errors
    /// Only if the map was taken or has the wrong type.
    pub fn counters(&self) -> Result<PerCpuArray<&MapData, u64>, LoadError> {
        let map = self
            .ebpf
            .map(COUNTERS_MAP)
            .ok_or(LoadError::MissingMap { name: COUNTERS_MAP })?;
        PerCpuArray::try_from(map).map_err(|source| map_error(COUNTERS_MAP, source))
    }

    /// The per-CPU counters, taken out.
    ///
    /// # Errors
    /// When already taken.
    pub fn take_counters(&mut self) -> Result<PerCpuArray<MapData, u64>, LoadError> {
        let map = self
            .ebpf
            .take_map(COUNTERS_MAP)
            .ok_or(LoadError::MissingMap { name: COUNTERS_MAP })?;
        PerCpuArray::try_from(map).map_err(|source| map_error(COUNTERS_MAP, source))
    }

    /// The counters summed over CPUs, now.
    ///
    /// # Errors
    /// When the map was taken or a read fails.
    pub fn counter_totals(&self) -> Result<CounterTotals, LoadError> {
        CounterTotals::read(&self.counters()?)
    }
}

/// The datapath's counters summed over CPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CounterTotals([u64; Counter::COUNT as usize]);

impl CounterTotals {
    /// Reads and sums every counter of `counters`, and works out [`Counter::PacketsSeen`], which
    /// the program does not count itself, as the sum of the outcome counters.
    ///
    /// # Errors
    /// When a map read fails.
    pub fn read<T: std::borrow::Borrow<MapData>>(
        counters: &PerCpuArray<T, u64>,
    ) -> Result<Self, LoadError> {
        let mut totals = [0u64; Counter::COUNT as usize];
        for (counter, total) in Counter::ALL.iter().zip(totals.iter_mut()) {
            let per_cpu = counters
                .get(&(*counter as u32), 0)
                .map_err(|source| map_error(COUNTERS_MAP, source))?;
            *total = per_cpu.iter().copied().fold(0u64, u64::wrapping_add);
        }
        totals[Counter::PacketsSeen as usize] = Counter::OUTCOMES
            .iter()
            .map(|c| totals[*c as usize])
            .fold(0u64, u64::wrapping_add);
        Ok(Self(totals))
    }

    /// One counter's total.
    #[must_use]
    pub const fn get(&self, counter: Counter) -> u64 {
        self.0[counter as usize]
    }

    /// Each counter's growth since `earlier` (counters only grow; wrapping keeps this total).
    #[must_use]
    pub fn since(&self, earlier: &Self) -> Self {
        let mut out = [0u64; Counter::COUNT as usize];
        for ((o, now), then) in out.iter_mut().zip(self.0).zip(earlier.0) {
            *o = now.wrapping_sub(then);
        }
        Self(out)
    }
}

fn classifier_mut<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut SchedClassifier, LoadError> {
    let program = ebpf
        .program_mut(name)
        .ok_or(LoadError::MissingProgram { name })?;
    program.try_into().map_err(|source| LoadError::Program {
        name,
        op: "is not a TC classifier",
        source,
    })
}

const fn map_op_error(name: &'static str, op: &'static str, source: MapError) -> LoadError {
    LoadError::Map { name, op, source }
}

const fn map_error(name: &'static str, source: MapError) -> LoadError {
    LoadError::Map {
        name,
        op: "open with the expected type",
        source,
    }
}

/// The size of [`REPORTED_MAP`]: room for every entry of the three flow tables.
fn reported_entries(flow_table_entries: u32) -> Result<u32, LoadError> {
    flow_table_entries
        .checked_mul(u32::try_from(TABLES.len()).unwrap_or(u32::MAX))
        .ok_or(LoadError::InvalidConfig {
            field: "flow_table_entries",
            value: u64::from(flow_table_entries),
            reason: "too large: the map of counted flows, three times its size, exceeds 2^32 entries",
        })
}

/// The running kernel's page size (4 KiB on x86-64, 16 KiB on the Raspberry Pi 5 kernel).
fn page_size() -> Result<u32, LoadError> {
    // SAFETY: sysconf has no memory-safety preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if size <= 0 {
        return Err(LoadError::PageSize(io::Error::last_os_error()));
    }
    u32::try_from(size).map_err(|_| LoadError::PageSize(io::Error::other("page size above 4 GiB")))
}

/// Validates `config` and rounds what the kernel needs rounded.
fn effective_config(config: &DatapathConfig, page: u32) -> Result<DatapathConfig, LoadError> {
    let DatapathConfig {
        flow_table_entries,
        events_bytes,
        sample_every,
        kernel_log,
        wireguard_port,
    } = *config;
    if flow_table_entries == 0 {
        return Err(LoadError::InvalidConfig {
            field: "flow_table_entries",
            value: 0,
            reason: "must be at least 1",
        });
    }
    reported_entries(flow_table_entries)?;
    Ok(DatapathConfig {
        flow_table_entries,
        events_bytes: ring_buffer_bytes(events_bytes, page)?,
        sample_every: sample_every.max(1),
        kernel_log,
        wireguard_port,
    })
}

/// The value of aya-log's level global: every level on, or none (the records' levels start at
/// 1, error).
fn kernel_log_level(on: bool) -> u8 {
    if on { aya_log::Level::Trace.into() } else { 0 }
}

/// The kernel wants a ring buffer size that is a power of two and a multiple of the page size;
/// with a power-of-two page size both hold for the next power of two of at least one page.
fn ring_buffer_bytes(requested: u32, page: u32) -> Result<u32, LoadError> {
    requested
        .max(page)
        .checked_next_power_of_two()
        .ok_or(LoadError::InvalidConfig {
            field: "events_bytes",
            value: u64::from(requested),
            reason: "too large: the next power of two exceeds 4 GiB",
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_buffer_rounds_up_to_page_multiple_power_of_two() {
        for (requested, page, expected) in [
            (0, 4096, 4096),
            (1, 4096, 4096),
            (4096, 4096, 4096),
            (4097, 4096, 8192),
            (100_000, 4096, 131_072),
            (1, 16_384, 16_384),
            (20_000, 16_384, 32_768),
            (262_144, 16_384, 262_144),
        ] {
            let got = match ring_buffer_bytes(requested, page) {
                Ok(got) => got,
                Err(e) => panic!("ring_buffer_bytes({requested}, {page}) failed: {e}"),
            };
            assert_eq!(got, expected, "ring_buffer_bytes({requested}, {page})");
            assert_eq!(
                got % page,
                0,
                "{got} is not a multiple of the page size {page}"
            );
        }
    }

    /// Pinning needs a bpffs: elsewhere (here, the temporary directory) it is refused with one
    /// error naming the directory, and the layout directory it made is not left behind.
    #[test]
    fn pins_outside_a_bpffs_are_refused_and_leave_nothing() {
        let base = std::env::temp_dir().join(format!("fa-pins-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        match prepare_pins(&base) {
            Err(LoadError::Pins { path, op, .. }) => {
                assert_eq!(path, base);
                assert!(op.contains("bpffs"), "{op}");
            }
            other => panic!("pins outside a bpffs: {other:?}"),
        }
        assert!(!base.exists(), "{} left behind", base.display());
        assert!(pin_dir(&base).ends_with(format!("v{FLOW_LAYOUT:08x}")));
    }

    /// Only `v` and 8 lower-case hex digits is a layout directory: other directories under the
    /// pin base (another tool's, with `pinDir: /sys/fs/bpf`) are never emptied.
    #[test]
    fn only_layout_names_are_layout_directories() {
        assert!(is_layout_name(&format!("v{FLOW_LAYOUT:08x}")));
        assert!(is_layout_name("v0123abcd"));
        for other in [
            "v",
            "vendor",
            "v0123abcde",
            "v0123ABCD",
            "x0123abcd",
            "v0123abcg",
            "cilium",
        ] {
            assert!(!is_layout_name(other), "{other}");
        }
    }

    #[test]
    fn ring_buffer_too_large_is_an_error() {
        assert!(
            matches!(
                ring_buffer_bytes(u32::MAX, 4096),
                Err(LoadError::InvalidConfig {
                    field: "events_bytes",
                    ..
                })
            ),
            "u32::MAX bytes cannot be rounded up to a power of two"
        );
    }

    #[test]
    fn zero_flow_table_is_rejected_and_sampling_zero_means_all() {
        let zero = DatapathConfig {
            flow_table_entries: 0,
            ..DatapathConfig::default()
        };
        assert!(
            matches!(
                effective_config(&zero, 4096),
                Err(LoadError::InvalidConfig {
                    field: "flow_table_entries",
                    ..
                })
            ),
            "a flow table of 0 entries must be refused"
        );
        let unsampled = DatapathConfig {
            sample_every: 0,
            ..DatapathConfig::default()
        };
        match effective_config(&unsampled, 4096) {
            Ok(c) => assert_eq!(c.sample_every, 1, "sample_every 0 keeps every packet"),
            Err(e) => panic!("default config with sample_every 0 refused: {e}"),
        }
    }
}
