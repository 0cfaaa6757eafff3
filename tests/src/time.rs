//! Clocks and calendar dates for the kit: the API stand-in's timestamps,
//! the kubelet-like projected volumes' directory names, `x-amz-date`
//! values, and timestamps processes can compare with each other. Calendar
//! arithmetic is jiff's, the crate k8s-openapi uses for the API's times.

use std::time::{SystemTime, UNIX_EPOCH};

use jiff::{Timestamp, civil::DateTime, tz::Offset};

/// Seconds since the epoch, now.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// `CLOCK_MONOTONIC` in nanoseconds: comparable between processes on one
/// machine (Rust's `Instant` is not).
pub fn monotonic_ns() -> u128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u128 * 1_000_000_000 + ts.tv_nsec as u128
}

fn timestamp(secs: u64) -> Timestamp {
    i64::try_from(secs)
        .ok()
        .and_then(|s| Timestamp::from_second(s).ok())
        .unwrap_or_else(|| panic!("{secs} s after the epoch is out of range"))
}

/// Seconds since the epoch of a UTC date and time.
fn utc_seconds(dt: DateTime) -> Option<u64> {
    let ts = Offset::UTC.to_timestamp(dt).ok()?;
    u64::try_from(ts.as_second()).ok()
}

/// UTC (year, month, day, hour, minute, second) of seconds since the epoch.
pub fn utc(secs: u64) -> (i64, u32, u32, u64, u64, u64) {
    let dt = Offset::UTC.to_datetime(timestamp(secs));
    let unsigned = |v: i8| u8::try_from(v).expect("calendar fields are positive");
    (
        i64::from(dt.year()),
        u32::from(unsigned(dt.month())),
        u32::from(unsigned(dt.day())),
        u64::from(unsigned(dt.hour())),
        u64::from(unsigned(dt.minute())),
        u64::from(unsigned(dt.second())),
    )
}

/// `YYYY-MM-DDTHH:MM:SSZ`, the API's `metav1.Time` format.
pub fn format_rfc3339(secs: u64) -> String {
    timestamp(secs).strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

/// Seconds since the epoch of `YYYY-MM-DDTHH:MM:SSZ` (fractions ignored).
pub fn parse_rfc3339(text: &str) -> Option<u64> {
    let whole = text.get(..19)?;
    utc_seconds(DateTime::strptime("%Y-%m-%dT%H:%M:%S", whole).ok()?)
}

/// Seconds since the epoch of an `x-amz-date` value, `YYYYMMDDTHHMMSSZ`.
pub fn parse_amz_date(text: &str) -> Option<u64> {
    utc_seconds(DateTime::strptime("%Y%m%dT%H%M%SZ", text).ok()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates_round_trip() {
        assert_eq!(utc(0), (1970, 1, 1, 0, 0, 0));
        assert_eq!(utc(11_016 * 86_400), (2000, 2, 29, 0, 0, 0));
        assert_eq!(utc(20_819 * 86_400), (2027, 1, 1, 0, 0, 0));
        assert_eq!(format_rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(format_rfc3339(0), "1970-01-01T00:00:00Z");
        for secs in [0, 951_782_400, 1_796_187_661, 4_102_444_799] {
            assert_eq!(parse_rfc3339(&format_rfc3339(secs)), Some(secs));
        }
        assert_eq!(parse_rfc3339("2000-02-29T00:00:00.250Z"), Some(951_782_400));
        assert_eq!(utc(1_796_187_661), (2026, 12, 2, 5, 1, 1));
        assert_eq!(parse_amz_date("20000229T000000Z"), Some(951_782_400));
        assert_eq!(parse_amz_date("20261202T050101Z"), Some(1_796_187_661));
        assert_eq!(parse_amz_date("2026-12-02T05:01:01Z"), None);
    }
}
