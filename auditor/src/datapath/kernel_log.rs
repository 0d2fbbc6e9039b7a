//! The TC program's own log records (aya-log, written on its rare paths when the datapath was
//! loaded with `kernel_log`), read from their ring buffer and re-emitted as `tracing` events: under
//! the target [`KERNEL_LOG_TARGET`], at the record's level, with the program's module, file and
//! line as fields. aya-log hands records to a [`log::Log`]; the bridge here is that logger, so
//! nothing is installed as the process's global `log` logger.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};

use auditor_ebpf::KERNEL_LOG_TARGET;
use aya::Ebpf;
use aya_log::EbpfLogger;

/// The program's log records, ready to be read. Readable (its fd polls) when records wait; hand
/// it to `tokio::io::unix::AsyncFd` and call [`KernelLog::flush`] on each wake-up, or call it
/// now and then.
pub struct KernelLog(EbpfLogger<TracingBridge>);

impl std::fmt::Debug for KernelLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KernelLog").finish_non_exhaustive()
    }
}

impl KernelLog {
    /// Takes the record ring buffer out of `ebpf`. Call only once the programs that write to it
    /// are loaded: they hold their own reference to the map, so the reader may then own it.
    pub(super) fn take(ebpf: &mut Ebpf) -> Result<Self, aya_log::Error> {
        EbpfLogger::init_with_logger(ebpf, TracingBridge).map(Self)
    }

    /// Emits every record waiting in the ring buffer as a `tracing` event, on the calling
    /// thread (so under its default subscriber).
    pub fn flush(&mut self) {
        self.0.flush();
    }
}

impl AsFd for KernelLog {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

/// For `tokio::io::unix::AsyncFd`.
impl AsRawFd for KernelLog {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

/// A [`log::Log`] that forwards each record to `tracing`. `tracing` wants a target known at
/// compile time, so records are emitted under [`KERNEL_LOG_TARGET`], the target the program gives
/// all of them; a record with another target (a log call in the program that forgot to name
/// it) keeps it in the `kernel_target` field.
pub struct TracingBridge;

impl log::Log for TracingBridge {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        let module = record.module_path().unwrap_or_default();
        let file = record.file().unwrap_or_default();
        let line = record.line().unwrap_or_default();
        let target = record.target();
        let kernel_target = (target != KERNEL_LOG_TARGET).then_some(target);
        macro_rules! emit {
            ($level:expr) => {
                tracing::event!(
                    target: KERNEL_LOG_TARGET,
                    $level,
                    module,
                    file,
                    line,
                    kernel_target,
                    "{}",
                    record.args()
                )
            };
        }
        match record.level() {
            log::Level::Error => emit!(tracing::Level::ERROR),
            log::Level::Warn => emit!(tracing::Level::WARN),
            log::Level::Info => emit!(tracing::Level::INFO),
            log::Level::Debug => emit!(tracing::Level::DEBUG),
            log::Level::Trace => emit!(tracing::Level::TRACE),
        }
    }

    fn flush(&self) {}
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use log::Log as _;
    use tracing::{
        Event, Subscriber,
        field::{Field, Visit},
    };
    use tracing_subscriber::{Layer, layer::Context, prelude::*};

    use super::*;

    /// One event as the bridge emitted it.
    #[derive(Debug, Default, Clone, PartialEq, Eq)]
    struct Seen {
        target: String,
        level: String,
        fields: Vec<(String, String)>,
    }

    struct Capture(Arc<Mutex<Vec<Seen>>>);

    impl<S: Subscriber> Layer<S> for Capture {
        fn on_event(&self, event: &Event<'_>, _: Context<'_, S>) {
            struct Fields<'a>(&'a mut Vec<(String, String)>);
            impl Visit for Fields<'_> {
                fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
                    self.0.push((field.name().to_owned(), format!("{value:?}")));
                }
                fn record_str(&mut self, field: &Field, value: &str) {
                    self.0.push((field.name().to_owned(), value.to_owned()));
                }
            }
            let mut seen = Seen {
                target: event.metadata().target().to_owned(),
                level: event.metadata().level().to_string(),
                fields: Vec::new(),
            };
            event.record(&mut Fields(&mut seen.fields));
            self.0
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push(seen);
        }
    }

    fn bridged(record: &log::Record<'_>) -> Vec<Seen> {
        let events = Arc::new(Mutex::new(Vec::new()));
        let subscriber = tracing_subscriber::registry().with(Capture(Arc::clone(&events)));
        tracing::subscriber::with_default(subscriber, || TracingBridge.log(record));
        events
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    fn field<'a>(seen: &'a Seen, name: &str) -> Option<&'a str> {
        seen.fields
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    #[test]
    fn records_keep_their_level_target_and_origin() {
        for (level, expected) in [
            (log::Level::Error, "ERROR"),
            (log::Level::Warn, "WARN"),
            (log::Level::Info, "INFO"),
            (log::Level::Debug, "DEBUG"),
            (log::Level::Trace, "TRACE"),
        ] {
            let got = bridged(
                &log::Record::builder()
                    .args(format_args!("headers cut short: {} bytes", 15))
                    .level(level)
                    .target(KERNEL_LOG_TARGET)
                    .module_path(Some("auditor_ebpf::diag"))
                    .file(Some("src/diag.rs"))
                    .line(Some(57))
                    .build(),
            );
            assert_eq!(got.len(), 1, "one event per record: {got:?}");
            let seen = &got[0];
            assert_eq!(seen.target, KERNEL_LOG_TARGET);
            assert_eq!(seen.level, expected);
            assert_eq!(field(seen, "message"), Some("headers cut short: 15 bytes"));
            assert_eq!(field(seen, "module"), Some("auditor_ebpf::diag"));
            assert_eq!(field(seen, "file"), Some("src/diag.rs"));
            assert_eq!(field(seen, "line"), Some("57"));
            assert_eq!(
                field(seen, "kernel_target"),
                None,
                "the program's own target is the event's"
            );
        }
    }

    #[test]
    fn a_record_with_another_target_keeps_it_in_a_field() {
        let got = bridged(
            &log::Record::builder()
                .args(format_args!("untargeted"))
                .level(log::Level::Warn)
                .target("auditor_ebpf::track")
                .build(),
        );
        assert_eq!(got.len(), 1, "one event per record: {got:?}");
        assert_eq!(got[0].target, KERNEL_LOG_TARGET);
        assert_eq!(field(&got[0], "kernel_target"), Some("auditor_ebpf::track"));
    }
}
