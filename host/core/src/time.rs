//! UTC instants as milliseconds since the Unix epoch, read and written as RFC 3339.

use chrono::{DateTime, SecondsFormat};

/// Parses an RFC 3339 timestamp (`2024-05-01T12:00:00Z`, `...+02:00`, fractional seconds allowed).
pub fn parse_rfc3339(s: &str) -> Option<i64> {
    DateTime::parse_from_rfc3339(s).ok().map(|d| d.timestamp_millis())
}

/// Formats milliseconds since the epoch as `YYYY-MM-DDTHH:MM:SS.mmmZ`.
pub fn format_rfc3339(ms: i64) -> String {
    DateTime::from_timestamp_millis(ms)
        .map_or_else(|| format!("{ms}"), |d| d.to_rfc3339_opts(SecondsFormat::Millis, true))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let ms = parse_rfc3339("2024-02-29T23:59:58.123Z").unwrap();
        assert_eq!(format_rfc3339(ms), "2024-02-29T23:59:58.123Z");
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Some(0));
    }

    #[test]
    fn applies_offsets() {
        assert_eq!(parse_rfc3339("2024-01-01T02:00:00+02:00"), parse_rfc3339("2024-01-01T00:00:00Z"));
    }

    #[test]
    fn rejects_nonsense() {
        for s in ["2024-13-01T00:00:00Z", "2023-02-29T00:00:00Z", "yesterday", "2024-01-01T00:00:00"] {
            assert_eq!(parse_rfc3339(s), None, "{s}");
        }
    }
}
