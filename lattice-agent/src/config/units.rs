//! Parsers for flag values with units: durations (`500ms`, `5s`, `2m`, `1h`)
//! and byte sizes (`65536`, `64KiB`, `10MiB`, `1GiB`, `10MB`).

use std::time::Duration;

/// A flag value that is not a duration or size.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnitError {
    #[error("{value:?}: expected a duration like 500ms, 5s, 2m or 1h")]
    NotADuration { value: String },
    #[error("{value:?}: unknown unit {unit:?} (use ms, s, m or h)")]
    DurationUnit { value: String, unit: String },
    #[error("{value:?}: expected a size like 65536, 64KiB or 10MiB")]
    NotASize { value: String },
    #[error("{value:?}: unknown unit {unit:?} (use KiB, MiB or GiB)")]
    SizeUnit { value: String, unit: String },
    #[error("{value:?}: too large")]
    TooLarge { value: String },
}

/// Parses `N`, `Nms`, `Ns`, `Nm` or `Nh` (a bare number is seconds).
pub fn parse_duration(s: &str) -> Result<Duration, UnitError> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| UnitError::NotADuration {
        value: s.to_owned(),
    })?;
    let d = match unit.trim() {
        "ms" => Duration::from_millis(n),
        "" | "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.saturating_mul(60)),
        "h" => Duration::from_secs(n.saturating_mul(3600)),
        other => {
            return Err(UnitError::DurationUnit {
                value: s.to_owned(),
                unit: other.to_owned(),
            });
        }
    };
    Ok(d)
}

/// Parses a byte count with an optional binary (KiB) or decimal (KB) suffix.
pub fn parse_bytes(s: &str) -> Result<u64, UnitError> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| UnitError::NotASize {
        value: s.to_owned(),
    })?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" | "K" | "k" => 1 << 10,
        "MiB" | "M" => 1 << 20,
        "GiB" | "G" => 1 << 30,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        other => {
            return Err(UnitError::SizeUnit {
                value: s.to_owned(),
                unit: other.to_owned(),
            });
        }
    };
    n.checked_mul(mult).ok_or_else(|| UnitError::TooLarge {
        value: s.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("5"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert!(parse_duration("5x").is_err());
        assert!(parse_duration("s").is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_bytes("65536"), Ok(65536));
        assert_eq!(parse_bytes("64KiB"), Ok(65536));
        assert_eq!(parse_bytes("10MiB"), Ok(10 << 20));
        assert_eq!(parse_bytes("1GB"), Ok(1_000_000_000));
        assert!(parse_bytes("1TiB").is_err());
        assert!(parse_bytes("").is_err());
    }
}
