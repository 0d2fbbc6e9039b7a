//! Attach/detach churn and crash leftovers, against the real kernel in namespaces of our own:
//! 200 veth pairs come and go while the loader runs; afterwards nothing of ours stays attached,
//! no link of ours survives, and no file descriptor leaks. And what a killed instance leaves:
//! TCX links die with the process, clsact filters do not and the next start removes them. Each
//! test expects the hook the kernel offers: TCX on 6.6+, clsact filters before (Debian 12's 6.1),
//! probed, not assumed. And `:default-route` following the default route to another device.

#[path = "common/hooks.rs"]
mod hooks;
#[path = "common/netns.rs"]
mod netns;

use std::{
    collections::BTreeSet,
    io::{BufRead as _, BufReader},
    process::{Command, Stdio},
    sync::{Mutex, mpsc},
    time::{Duration, Instant},
};

use auditor::datapath::{
    attach::{AttachConfig, AttachError, AttachMode, AttachedInterface, HookMode, Role},
    load::{Datapath, DatapathConfig},
    manager::{DatapathManager, ManagerError},
};
use aya::programs::{
    TcAttachType, loaded_links,
    tc::{self, NlOptions, TcAttach},
};
use netns::{Netns, open_fds, require_root};

const PAIRS: usize = 200;
/// Pairs created before the churn and kept through it.
const SURVIVORS: usize = 3;
/// How many pairs exist at once during the churn: each new pair deletes the one this far back.
const WINDOW: usize = 20;
const CHILD_ENV: &str = "FLOW_AUDITOR_CRASH_CHILD";

/// The tests here count this process's file descriptors: they must not overlap.
static SERIAL: Mutex<()> = Mutex::new(());

enum Cmd {
    Attached(mpsc::Sender<Vec<AttachedInterface>>),
    Stop(mpsc::Sender<()>),
}

/// The loader on its own thread inside `ns`, controlled through commands.
struct Loader {
    commands: tokio::sync::mpsc::UnboundedSender<Cmd>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Loader {
    fn start(ns: &Netns, config: AttachConfig) -> Self {
        let (commands, mut rx) = tokio::sync::mpsc::unbounded_channel::<Cmd>();
        let (ready_tx, ready_rx) = mpsc::channel();
        let thread = ns.spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap_or_else(|e| panic!("tokio runtime: {e}"));
            runtime.block_on(async move {
                let datapath = Datapath::load(&DatapathConfig::default())
                    .unwrap_or_else(|e| panic!("loading the datapath: {e:?}"));
                let mut manager = DatapathManager::start(datapath, config)
                    .unwrap_or_else(|e| panic!("starting the manager: {e:?}"));
                ready_tx
                    .send(())
                    .unwrap_or_else(|e| panic!("test gone: {e}"));
                loop {
                    tokio::select! {
                        cmd = rx.recv() => match cmd {
                            Some(Cmd::Attached(reply)) => {
                                let _ = reply.send(manager.attached());
                            }
                            Some(Cmd::Stop(reply)) => {
                                manager.shutdown().unwrap_or_else(|e| panic!("shutdown: {e}"));
                                drop(manager);
                                let _ = reply.send(());
                                return;
                            }
                            None => return,
                        },
                        events = manager.next_events() => {
                            events.unwrap_or_else(|e| panic!("reading events: {e}"));
                        }
                    }
                }
            });
        });
        ready_rx
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|e| panic!("the loader did not start: {e}"));
        Self {
            commands,
            thread: Some(thread),
        }
    }

    fn attached(&self) -> Vec<AttachedInterface> {
        let (tx, rx) = mpsc::channel();
        self.commands
            .send(Cmd::Attached(tx))
            .unwrap_or_else(|_| panic!("loader thread gone"));
        rx.recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("loader did not answer: {e}"))
    }

    /// Polls until the attached interfaces are exactly `names`, or panics after `limit`.
    fn wait_for(&self, names: &BTreeSet<String>, limit: Duration) -> Vec<AttachedInterface> {
        let start = Instant::now();
        loop {
            let attached = self.attached();
            let now: BTreeSet<String> = attached.iter().map(|a| a.name.clone()).collect();
            if &now == names {
                return attached;
            }
            assert!(
                start.elapsed() < limit,
                "after {limit:?} attached to {} interfaces, expected {}: extra {:?}, missing {:?}",
                now.len(),
                names.len(),
                now.difference(names).take(5).collect::<Vec<_>>(),
                names.difference(&now).take(5).collect::<Vec<_>>()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn stop(mut self) {
        let (tx, rx) = mpsc::channel();
        self.commands
            .send(Cmd::Stop(tx))
            .unwrap_or_else(|_| panic!("loader thread gone"));
        rx.recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("loader did not stop: {e}"));
        if let Some(thread) = self.thread.take() {
            thread
                .join()
                .unwrap_or_else(|_| panic!("loader thread panicked"));
        }
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        // On a panic elsewhere: closing the channel ends the loop, dropping the manager detaches.
        if let Some(thread) = self.thread.take() {
            let (tx, _rx) = mpsc::channel();
            let _ = self.commands.send(Cmd::Stop(tx));
            let _ = thread.join();
        }
    }
}

/// Whether `tc` lists a filter of ours on `ifname` (either direction).
fn has_clsact_filter(ns: &Netns, ifname: &str) -> bool {
    let (ingress, egress) = hooks::clsact_programs(ns, ifname);
    !ingress.is_empty() || !egress.is_empty()
}

/// Our programs on `ifname` by `mode`: one per hook, or panics. Returns their ids.
fn one_per_hook(ns: &Netns, ifname: &str, mode: HookMode) -> Vec<u32> {
    let (ingress, egress) = hooks::programs(ns, ifname, mode);
    assert_eq!(
        (ingress.len(), egress.len()),
        (1, 1),
        "one program of ours per hook on {ifname} by {mode}: {ingress:?} {egress:?}"
    );
    ingress.into_iter().chain(egress).collect()
}

fn links_of(programs: &BTreeSet<u32>) -> usize {
    loaded_links()
        .filter_map(Result::ok)
        .filter(|l| programs.contains(&l.program_id()))
        .count()
}

/// `ip -batch` over the namespace, so 200 pairs come and go in a burst, like a node rescheduling
/// pods, rather than at the pace of one process per command.
fn ip_batch(ns: &Netns, lines: &[String]) {
    let mut child = Command::new("ip")
        .args(["-n", ns.name(), "-batch", "-"])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("ip -batch: {e}"));
    {
        use std::io::Write as _;
        let mut stdin = child.stdin.take().unwrap_or_else(|| panic!("no stdin"));
        stdin
            .write_all(lines.join("\n").as_bytes())
            .unwrap_or_else(|e| panic!("writing to ip -batch: {e}"));
    }
    let status = child.wait().unwrap_or_else(|e| panic!("ip -batch: {e}"));
    assert!(status.success(), "ip -batch failed: {status}");
}

#[test]
#[ignore = "needs root and the kernel; run by cargo xtask test"]
fn churn_of_200_veth_pairs_leaves_nothing_behind() {
    require_root();
    let _serial = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let ns = Netns::new("churn");
    // tokio's signal driver keeps a process-wide socket pair for its whole life, created with the
    // first runtime: make it exist before the baseline so only our descriptors are compared.
    drop(
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap_or_else(|e| panic!("tokio runtime: {e}")),
    );
    let fds_before = open_fds();

    let mut survivors = BTreeSet::new();
    for i in 0..SURVIVORS {
        let (a, b) = (format!("veths{i}a"), format!("veths{i}b"));
        ns.ip(&["link", "add", &a, "type", "veth", "peer", "name", &b]);
        survivors.insert(a);
        survivors.insert(b);
    }
    // Not matching the globs: must never be attached.
    ns.ip(&[
        "link", "add", "other0", "type", "veth", "peer", "name", "other1",
    ]);

    let mode = hooks::expected_mode(&ns);
    let loader = Loader::start(&ns, AttachConfig::default());
    let attached = loader.wait_for(&survivors, Duration::from_secs(10));
    assert!(
        attached.iter().all(|a| a.mode == mode),
        "this kernel offers {mode}, which every interface should get: {attached:?}"
    );
    let ours: BTreeSet<u32> = one_per_hook(&ns, "veths0a", mode).into_iter().collect();
    for name in &survivors {
        assert_eq!(
            one_per_hook(&ns, name, mode)
                .into_iter()
                .collect::<BTreeSet<_>>(),
            ours,
            "{name} runs other programs than veths0a"
        );
    }
    // TCX attachments are kernel links; clsact filters are not links at all.
    let links_per_interface = if mode == HookMode::Tcx { 2 } else { 0 };
    assert_eq!(
        links_of(&ours),
        links_per_interface * survivors.len(),
        "{links_per_interface} {mode} link(s) per interface"
    );
    assert!(
        !hooks::anything_attached(&ns, "other0"),
        "other0 does not match the globs"
    );

    // The churn: pair i appears, pair i - WINDOW disappears, then the rest go.
    let started = Instant::now();
    let mut lines = Vec::new();
    for i in 0..PAIRS {
        lines.push(format!("link add vethc{i}a type veth peer name vethc{i}b"));
        lines.push(format!("link set vethc{i}a up"));
        if i >= WINDOW {
            lines.push(format!("link del vethc{}a", i - WINDOW));
        }
    }
    ip_batch(&ns, &lines);
    let mut expected = survivors.clone();
    for i in PAIRS - WINDOW..PAIRS {
        expected.insert(format!("vethc{i}a"));
        expected.insert(format!("vethc{i}b"));
    }
    loader.wait_for(&expected, Duration::from_secs(30));
    let converged_add = started.elapsed();
    assert_eq!(
        links_of(&ours),
        links_per_interface * expected.len(),
        "links of deleted interfaces were not closed"
    );
    assert_eq!(
        one_per_hook(&ns, &format!("vethc{}b", PAIRS - 1), mode)
            .into_iter()
            .collect::<BTreeSet<_>>(),
        ours,
        "the newest interface has our programs"
    );

    let deletes: Vec<String> = (PAIRS - WINDOW..PAIRS)
        .map(|i| format!("link del vethc{i}a"))
        .collect();
    ip_batch(&ns, &deletes);
    loader.wait_for(&survivors, Duration::from_secs(30));
    let churn = started.elapsed();
    assert_eq!(
        links_of(&ours),
        links_per_interface * survivors.len(),
        "links of deleted interfaces were not closed"
    );

    loader.stop();
    for name in &survivors {
        assert!(
            !hooks::anything_attached(&ns, name),
            "{name} still has our program (TCX or a clsact filter) after shutdown"
        );
    }
    assert_eq!(links_of(&ours), 0, "a link of ours survived the shutdown");
    let still_loaded = aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter(|p| ours.contains(&p.id()))
        .count();
    assert_eq!(
        still_loaded, 0,
        "our programs are still loaded after the loader was dropped"
    );
    let fds_after = open_fds();
    assert_eq!(
        fds_before, fds_after,
        "file descriptors leaked: {fds_before:?} before, {fds_after:?} after"
    );
    println!(
        "churn ({mode}): {PAIRS} veth pairs ({} interfaces) added and deleted; attached state converged \
         {converged_add:?} after the start, all done in {churn:?}; open fds {} before, {} after",
        2 * PAIRS,
        fds_before.len(),
        fds_after.len()
    );
}

/// Runs only as the child of `killed_instance_leaves_*`: attaches in the given mode inside the
/// given namespace, says READY, and waits to be killed.
#[test]
#[ignore = "needs root and the kernel; run by cargo xtask test"]
fn crash_child() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return;
    };
    let (ns_name, mode) = spec
        .split_once(',')
        .unwrap_or_else(|| panic!("bad {CHILD_ENV}={spec}"));
    let mode = match mode {
        "tcx" => AttachMode::Tcx,
        "clsact" => AttachMode::Clsact,
        other => panic!("unknown mode {other}"),
    };
    let file = std::fs::File::open(format!("/var/run/netns/{ns_name}"))
        .unwrap_or_else(|e| panic!("open netns {ns_name}: {e}"));
    // SAFETY: a valid namespace fd; affects this thread only.
    let rc = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("tokio runtime: {e}"));
    runtime.block_on(async {
        let datapath =
            Datapath::load(&DatapathConfig::default()).unwrap_or_else(|e| panic!("load: {e:?}"));
        let config = AttachConfig {
            mode,
            ..AttachConfig::default()
        };
        let manager =
            DatapathManager::start(datapath, config).unwrap_or_else(|e| panic!("start: {e:?}"));
        assert_eq!(
            manager.attached().len(),
            2,
            "child attached to {:?}",
            manager.attached()
        );
        println!("READY");
        // Killed long before this; bounded so a lost parent cannot leave it running.
        tokio::time::sleep(Duration::from_secs(60)).await;
        drop(manager);
    });
}

/// Starts `crash_child` in `ns` with `mode`, waits for READY, runs `check_while_running`, kills
/// the child with SIGKILL and returns what the check returned.
fn crash_an_instance<T>(ns: &Netns, mode: &str, check_while_running: impl FnOnce() -> T) -> T {
    let exe = std::env::current_exe().unwrap_or_else(|e| panic!("current_exe: {e}"));
    let mut child = Command::new(exe)
        .args([
            "--exact",
            "crash_child",
            "--include-ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, format!("{},{mode}", ns.name()))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawning the child instance: {e}"));
    let stdout = child
        .stdout
        .take()
        .unwrap_or_else(|| panic!("no child stdout"));
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if line.contains("READY") {
                let _ = tx.send(());
            }
        }
    });
    let ready = rx.recv_timeout(Duration::from_secs(60));
    if ready.is_err() {
        let _ = child.kill();
        let _ = child.wait();
        panic!("the child instance never became ready");
    }
    let checked = check_while_running();
    child
        .kill()
        .unwrap_or_else(|e| panic!("SIGKILL the child: {e}"));
    child
        .wait()
        .unwrap_or_else(|e| panic!("reaping the child: {e}"));
    checked
}

#[test]
#[ignore = "needs root and the kernel; run by cargo xtask test"]
fn killed_instance_leaves_no_tcx_link() {
    require_root();
    let _serial = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let ns = Netns::new("crashtcx");
    ns.ip(&[
        "link", "add", "vethk0a", "type", "veth", "peer", "name", "vethk0b",
    ]);
    if !hooks::tcx_supported(&ns) {
        // No TCX here (before 6.6): `attachMode: tcx` must fail loudly and leave nothing, never
        // fall back to clsact behind the operator's back.
        forced_tcx_fails_without_tcx(&ns);
        return;
    }
    crash_an_instance(&ns, "tcx", || {
        one_per_hook(&ns, "vethk0a", HookMode::Tcx);
    });
    // The kernel releases a dead process's files asynchronously: allow it a moment.
    let start = Instant::now();
    while hooks::tcx_programs(&ns, "vethk0a") != (vec![], vec![]) {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "a killed instance's TCX links are still attached after 5 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// On a kernel without TCX: starting with the mode forced to TCX is an attach error naming TCX,
/// and nothing of ours is left on the interface.
fn forced_tcx_fails_without_tcx(ns: &Netns) {
    let result = ns.run(|| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap_or_else(|e| panic!("tokio runtime: {e}"));
        runtime.block_on(async {
            let datapath = Datapath::load(&DatapathConfig::default())
                .unwrap_or_else(|e| panic!("load: {e:?}"));
            let config = AttachConfig {
                mode: AttachMode::Tcx,
                ..AttachConfig::default()
            };
            DatapathManager::start(datapath, config).map(|manager| manager.attached())
        })
    });
    match result {
        Err(ManagerError::Attach(AttachError::Attach {
            mode, interface, ..
        })) => {
            assert_eq!(mode, HookMode::Tcx, "the failed attach names {mode}");
            assert!(interface.starts_with("vethk0"), "failed on {interface}");
        }
        other => panic!("forcing TCX on a kernel without it must fail to attach: {other:?}"),
    }
    for name in ["vethk0a", "vethk0b"] {
        assert!(
            !hooks::anything_attached(ns, name),
            "a failed TCX start left something of ours on {name}"
        );
    }
}

#[test]
#[ignore = "needs root and the kernel; run by cargo xtask test"]
fn killed_instance_clsact_filters_are_removed_on_start() {
    require_root();
    let _serial = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let ns = Netns::new("crashcls");
    ns.ip(&[
        "link", "add", "vethk0a", "type", "veth", "peer", "name", "vethk0b",
    ]);
    let mode = hooks::expected_mode(&ns);
    let leftovers: BTreeSet<u32> = crash_an_instance(&ns, "clsact", || {
        one_per_hook(&ns, "vethk0a", HookMode::Clsact)
            .into_iter()
            .chain(one_per_hook(&ns, "vethk0b", HookMode::Clsact))
            .collect()
    });
    assert!(
        has_clsact_filter(&ns, "vethk0a") && has_clsact_filter(&ns, "vethk0b"),
        "clsact filters are expected to outlive a killed instance"
    );
    let loader = Loader::start(&ns, AttachConfig::default());
    for name in ["vethk0a", "vethk0b"] {
        let (ingress, egress) = hooks::clsact_programs(&ns, name);
        assert!(
            !ingress
                .iter()
                .chain(&egress)
                .any(|id| leftovers.contains(id)),
            "the new instance did not remove the leftover clsact filters on {name} \
             (programs {leftovers:?}): ingress {ingress:?}, egress {egress:?}"
        );
        // Its own programs, once per hook, by what this kernel offers (on a clsact kernel they
        // are filters of the same names as the leftovers, so only the ids tell them apart).
        let new = one_per_hook(&ns, name, mode);
        assert!(
            !new.iter().any(|id| leftovers.contains(id)),
            "{name} runs a leftover program: {new:?}"
        );
        if mode == HookMode::Tcx {
            assert!(
                !has_clsact_filter(&ns, name),
                "a clsact filter of ours beside TCX on {name}"
            );
        }
    }
    loader.stop();
    for name in ["vethk0a", "vethk0b"] {
        assert!(
            !hooks::anything_attached(&ns, name),
            "{name} still has our program after shutdown"
        );
    }
}

#[test]
#[ignore = "needs root and the kernel; run by cargo xtask test"]
fn attaches_first_in_the_chain() {
    require_root();
    let _serial = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let ns = Netns::new("first");
    ns.ip(&[
        "link", "add", "vethf0a", "type", "veth", "peer", "name", "vethf0b",
    ]);
    let mode = hooks::expected_mode(&ns);
    // Stands in for a CNI's program, attached before we start, by the hook this kernel offers.
    let foreign = ns.run(|| {
        let mut datapath =
            Datapath::load(&DatapathConfig::default()).unwrap_or_else(|e| panic!("load: {e:?}"));
        let noop = datapath
            .program(auditor_ebpf::PROGRAM_NOOP)
            .unwrap_or_else(|e| panic!("no-op program: {e:?}"));
        let attach = match mode {
            HookMode::Tcx => TcAttach::Tcx {
                attach_type: TcAttachType::Ingress,
                order: aya::programs::LinkOrder::default(),
            },
            HookMode::Clsact => {
                match tc::qdisc_add_clsact(c"vethf0a") {
                    Ok(()) | Err(tc::TcError::AlreadyAttached) => {}
                    Err(e) => panic!("adding clsact to vethf0a: {e}"),
                }
                TcAttach::Netlink {
                    parent: TcAttachType::Ingress.into(),
                    options: NlOptions::default(),
                }
            }
        };
        noop.attach(c"vethf0a", attach)
            .unwrap_or_else(|e| panic!("attaching the stand-in CNI program by {mode}: {e}"));
        let id = noop.info().unwrap_or_else(|e| panic!("{e}")).id();
        (datapath, id)
    });
    let loader = Loader::start(&ns, AttachConfig::default());
    // The ingress chain in the order it runs: (program id, name).
    let chain: Vec<(u32, String)> = match mode {
        HookMode::Tcx => ns.run(|| {
            let (_, programs) =
                aya::programs::SchedClassifier::query_tcx(c"vethf0a", TcAttachType::Ingress)
                    .unwrap_or_else(|e| panic!("query_tcx: {e}"));
            programs
                .iter()
                .map(|p| (p.id(), p.name_as_str().unwrap_or_default().to_owned()))
                .collect()
        }),
        HookMode::Clsact => {
            let filters = hooks::clsact_filters(&ns, "vethf0a", "ingress");
            assert!(
                filters.windows(2).all(|w| w[0].pref <= w[1].pref),
                "tc lists filters by priority: {filters:?}"
            );
            assert!(
                filters.first().map(|f| f.pref) < filters.last().map(|f| f.pref),
                "ours needs a priority of its own ahead of the CNI's: {filters:?}"
            );
            filters
                .into_iter()
                .map(|f| (f.program_id, f.name))
                .collect()
        }
    };
    assert_eq!(chain.len(), 2, "{mode} chain on vethf0a ingress: {chain:?}");
    assert_ne!(
        chain[0].0, foreign.1,
        "ours must run before the CNI's: {chain:?}"
    );
    assert!(
        chain[0].1.starts_with("flow_auditor_in"),
        "first is not ours: {chain:?}"
    );
    assert_eq!(
        chain[1].0, foreign.1,
        "the CNI's program must stay in the chain: {chain:?}"
    );
    loader.stop();
    drop(foreign);
}

#[test]
#[ignore = "needs root and the kernel; run by cargo xtask test"]
fn refuses_to_act_from_another_namespace() {
    require_root();
    let _serial = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let ns = Netns::new("elsewhere");
    let mut attacher = ns.run(|| {
        auditor::datapath::attach::Attacher::new(AttachConfig::default())
            .unwrap_or_else(|e| panic!("attacher: {e}"))
    });
    // This thread is in another namespace, with interfaces the attacher must never touch.
    let mut datapath =
        Datapath::load(&DatapathConfig::default()).unwrap_or_else(|e| panic!("load: {e:?}"));
    let mut programs = datapath.programs().unwrap_or_else(|e| panic!("{e}"));
    let link = auditor::datapath::netlink::Link {
        ifindex: 1,
        name: "veth-anything".into(),
    };
    let result = attacher.attach(&mut programs, &link);
    assert!(
        matches!(
            result,
            Err(auditor::datapath::attach::AttachError::WrongNamespace { .. })
        ),
        "attach from another namespace: {result:?}"
    );
    assert!(
        matches!(
            attacher.shutdown(),
            Err(auditor::datapath::attach::AttachError::WrongNamespace { .. })
        ),
        "shutdown from another namespace must be refused"
    );
    assert!(attacher.attached().is_empty());
}

/// `:default-route` follows the route: two devices, the default route via A, then replaced by
/// one via B. B becomes the uplink and A is detached (nothing else makes it one of ours), at
/// once rather than at the next resync; with the default route gone, neither is attached.
#[test]
#[ignore = "needs root and the kernel; run by cargo xtask test"]
fn the_default_route_s_device_is_followed_when_the_route_moves() {
    require_root();
    let _serial = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let ns = Netns::new("orient-route");
    two_devices_default_via_upa(&ns);
    let loader = Loader::start(
        &ns,
        AttachConfig {
            interfaces: vec!["cali*".to_owned()],
            uplinks: vec![":default-route".to_owned()],
            ..AttachConfig::default()
        },
    );
    let only = |name: &str| BTreeSet::from([name.to_owned()]);
    let attached = loader.wait_for(&only("upa"), Duration::from_secs(10));
    assert!(
        attached.iter().all(|a| a.role == Role::Uplink),
        "{attached:?}"
    );
    ns.ip(&[
        "route",
        "replace",
        "default",
        "via",
        "198.18.11.254",
        "dev",
        "upb",
    ]);
    let attached = loader.wait_for(&only("upb"), Duration::from_secs(10));
    assert!(
        attached.iter().all(|a| a.role == Role::Uplink),
        "{attached:?}"
    );
    ns.ip(&["route", "del", "default"]);
    loader.wait_for(&BTreeSet::new(), Duration::from_secs(10));
    loader.stop();
}

/// A device that is an uplink by name as well stays attached when the default route leaves it.
#[test]
#[ignore = "needs root and the kernel; run by cargo xtask test"]
fn a_device_named_an_uplink_stays_attached_when_the_default_route_leaves_it() {
    require_root();
    let _serial = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let ns = Netns::new("orient-route2");
    two_devices_default_via_upa(&ns);
    let loader = Loader::start(
        &ns,
        AttachConfig {
            interfaces: vec!["cali*".to_owned()],
            uplinks: vec![":default-route".to_owned(), "upa".to_owned()],
            ..AttachConfig::default()
        },
    );
    loader.wait_for(&BTreeSet::from(["upa".to_owned()]), Duration::from_secs(10));
    ns.ip(&[
        "route",
        "replace",
        "default",
        "via",
        "198.18.11.254",
        "dev",
        "upb",
    ]);
    let attached = loader.wait_for(
        &BTreeSet::from(["upa".to_owned(), "upb".to_owned()]),
        Duration::from_secs(10),
    );
    assert!(
        attached.iter().all(|a| a.role == Role::Uplink),
        "{attached:?}"
    );
    loader.stop();
}

/// Two veth devices, `upa` (198.18.10.1/24) and `upb` (198.18.11.1/24), in `ns`, with the
/// default route via `upa`.
fn two_devices_default_via_upa(ns: &Netns) {
    for (dev, peer, net) in [
        ("upa", "upa-peer", "198.18.10"),
        ("upb", "upb-peer", "198.18.11"),
    ] {
        ns.ip(&["link", "add", dev, "type", "veth", "peer", "name", peer]);
        ns.ip(&["link", "set", dev, "up"]);
        ns.ip(&["link", "set", peer, "up"]);
        ns.ip(&["addr", "add", &format!("{net}.1/24"), "dev", dev]);
    }
    ns.ip(&[
        "route",
        "add",
        "default",
        "via",
        "198.18.10.254",
        "dev",
        "upa",
    ]);
}
