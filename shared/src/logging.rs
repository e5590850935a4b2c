//! `tracing` set up the same way for both binaries.
//!
//! - On a terminal: the usual human-readable format, with colour.
//! - Under journald (stderr is the journal stream named by `JOURNAL_STREAM`): one line per event with a
//!   `<N>` syslog priority prefix, so `journalctl -p warning` filters by level, and no timestamp (the
//!   journal adds its own) and no colour.
//! - Anywhere else (a file, a pipe): plain lines with an RFC 3339 timestamp, no colour.
//!
//! The filter comes from `BACKHAUL_LOG`, then `RUST_LOG`, else the default given (e.g. `info`), in the
//! `tracing_subscriber::EnvFilter` syntax (`info,backhaul_edge::queue=debug`).

use std::fmt;
use std::io::IsTerminal;

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::EnvFilter;

/// Where log lines go and how they look.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogStyle {
    Terminal,
    Journald,
    Plain,
}

impl LogStyle {
    /// The style for this process's stderr.
    pub fn detect() -> Self {
        if stderr_is_journal() {
            LogStyle::Journald
        } else if std::io::stderr().is_terminal() {
            LogStyle::Terminal
        } else {
            LogStyle::Plain
        }
    }
}

/// Installs the global subscriber. Call once, first thing in `main`. A second call does nothing.
pub fn init(default_filter: &str) {
    let filter = std::env::var("BACKHAUL_LOG")
        .ok()
        .and_then(|f| EnvFilter::try_new(f).ok())
        .or_else(|| EnvFilter::try_from_default_env().ok())
        .unwrap_or_else(|| EnvFilter::new(default_filter));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = match LogStyle::detect() {
        LogStyle::Terminal => builder.try_init(),
        LogStyle::Plain => builder.with_ansi(false).try_init(),
        LogStyle::Journald => builder.with_ansi(false).event_format(JournaldFormat).try_init(),
    };
}

/// systemd sets `JOURNAL_STREAM=<dev>:<inode>` for the stream stdout/stderr are connected to.
fn stderr_is_journal() -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        let Ok(stream) = std::env::var("JOURNAL_STREAM") else { return false };
        let Some((dev, ino)) = stream.split_once(':') else { return false };
        let Ok(meta) = std::fs::metadata("/proc/self/fd/2") else { return false };
        dev.parse() == Ok(meta.dev()) && ino.parse() == Ok(meta.ino())
    }
    #[cfg(not(unix))]
    false
}

/// `<prio>target: span: message key=value`, the syslog priority prefix journald understands.
struct JournaldFormat;

impl<S, N> FormatEvent<S, N> for JournaldFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(&self, ctx: &FmtContext<'_, S, N>, mut writer: Writer<'_>, event: &Event<'_>) -> fmt::Result {
        let priority = match *event.metadata().level() {
            Level::ERROR => 3,
            Level::WARN => 4,
            Level::INFO => 6,
            Level::DEBUG | Level::TRACE => 7,
        };
        write!(writer, "<{priority}>{}: ", event.metadata().target())?;
        if let Some(scope) = ctx.event_scope() {
            for span in scope.from_root() {
                write!(writer, "{}: ", span.name())?;
            }
        }
        ctx.field_format().format_fields(writer.by_ref(), event)?;
        writeln!(writer)
    }
}
