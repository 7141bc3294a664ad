//! How the server writes its log: a value can neither forge a line nor reveal a person.
//! Field values have their control characters escaped (a visitor id holding a newline would
//! otherwise start a log line of its own, or a terminal escape would rewrite the screen), and
//! ids that name people are logged at `info` and above only as pseudonyms.

use sha2::{Digest, Sha256};
use std::borrow::Cow;
use std::fmt::Write as _;
use tracing_subscriber::field::MakeExt;

/// Installs the process's log: text (escaped fields) or JSON lines, filtered by `RUST_LOG`
/// (default `info`).
pub fn init(json: bool) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // A log that cannot be written (its disk full) loses lines; it must not stop the server:
    // reporting the failure on stderr would panic the thread that logged.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .log_internal_errors(false);
    if json {
        // JSON escapes every string itself.
        builder.json().init();
    } else {
        builder.fmt_fields(escaped_fields()).init();
    }
}

/// Text log fields as `name=value`, the message bare, control characters escaped.
pub fn escaped_fields() -> impl for<'w> tracing_subscriber::fmt::FormatFields<'w> + Send + Sync + 'static {
    tracing_subscriber::fmt::format::debug_fn(|writer, field, value| {
        let mut text = String::new();
        write!(text, "{value:?}")?;
        match field.name() {
            "message" => write!(writer, "{}", escape_controls(&text)),
            name => write!(writer, "{name}={}", escape_controls(&text)),
        }
    })
    .delimited(" ")
}

/// `text` with every control character written as an escape (`\n`, `\u{1b}`).
pub fn escape_controls(text: &str) -> Cow<'_, str> {
    if !text.chars().any(char::is_control) {
        return Cow::Borrowed(text);
    }
    let mut escaped = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c.is_control() {
            true => escaped.extend(c.escape_default()),
            false => escaped.push(c),
        }
    }
    Cow::Owned(escaped)
}

/// A stable stand-in for an id that names a person, for logs at `info` and above: the same id
/// always gives the same pseudonym, so an operator can follow one visitor through the log
/// (and find the pseudonym of an id they hold), but the log does not hold the id.
pub fn pseudonym(id: &str) -> String {
    let digest = Sha256::digest(id.as_bytes());
    let hex: String = digest[..6].iter().map(|b| format!("{b:02x}")).collect();
    format!("id:{hex}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_value_cannot_start_a_log_line_of_its_own() {
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .fmt_fields(escaped_fields())
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            let forged = "a\n2026-01-01T00:00:00Z ERROR starling: admin token leaked\u{1b}[2J";
            tracing::warn!(visitor = %forged, "event accepted with a warning: {forged}");
        });
        let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
        assert_eq!(text.lines().count(), 1, "{text}");
        assert!(
            text.contains(r"visitor=a\n2026-01-01T00:00:00Z ERROR starling: admin token leaked\u{1b}[2J"),
            "{text}"
        );
        assert!(text.contains(r"event accepted with a warning: a\n2026"), "{text}");
        assert!(!text.contains('\u{1b}'));
    }

    #[test]
    fn pseudonyms_are_stable_and_hold_nothing_of_the_id() {
        assert_eq!(pseudonym("ann@example.com"), pseudonym("ann@example.com"));
        assert_ne!(pseudonym("ann@example.com"), pseudonym("bob@example.com"));
        assert!(!pseudonym("ann").contains("ann"));
        assert_eq!(pseudonym("x").len(), "id:".len() + 12);
    }
}
