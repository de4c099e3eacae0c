//! RFC 3339 timestamps as used on the wire.
//!
//! ebb writes UTC with milliseconds (`2024-05-01T12:00:00.123Z`). It reads any RFC 3339 timestamp,
//! including numeric offsets (`+02:00`), because that is what clients in other languages produce by
//! default (Python's `isoformat()`, Go's `time.RFC3339` in local time). That is why this is written here
//! rather than taken from a crate that only reads `Z`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A timestamp that is not RFC 3339.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid RFC 3339 timestamp `{input}`: {reason}")]
pub struct TimeError {
    pub input: String,
    pub reason: &'static str,
}

/// Formats `t` as RFC 3339 in UTC with milliseconds, e.g. `2024-05-01T12:00:00.123Z`.
pub fn format_rfc3339_millis(t: SystemTime) -> String {
    // Signed milliseconds, so that times before 1970 (never expected, but representable) stay correct.
    let ms: i128 = match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_millis() as i128,
        Err(e) => -(e.duration().as_millis() as i128),
    };
    let secs = ms.div_euclid(1000) as i64;
    let millis = ms.rem_euclid(1000);
    let (year, month, day) = civil_from_days(secs.div_euclid(86_400));
    let tod = secs.rem_euclid(86_400);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        tod / 3600,
        tod / 60 % 60,
        tod % 60
    )
}

/// Parses an RFC 3339 timestamp: `YYYY-MM-DD(T|t| )HH:MM:SS[.fraction](Z|z|±HH:MM)`.
pub fn parse_rfc3339(s: &str) -> Result<SystemTime, TimeError> {
    let err = |reason| TimeError {
        input: s.to_owned(),
        reason,
    };
    let b = s.as_bytes();
    if b.len() < 20 {
        return Err(err("too short, expected e.g. 2024-05-01T12:00:00Z"));
    }
    let digits = |from: usize, len: usize| -> Option<i64> {
        let part = b.get(from..from + len)?;
        part.iter().try_fold(0i64, |acc, &c| {
            c.is_ascii_digit().then(|| acc * 10 + i64::from(c - b'0'))
        })
    };
    let separators_ok = b[4] == b'-'
        && b[7] == b'-'
        && matches!(b[10], b'T' | b't' | b' ')
        && b[13] == b':'
        && b[16] == b':';
    let fields = (
        digits(0, 4),
        digits(5, 2),
        digits(8, 2),
        digits(11, 2),
        digits(14, 2),
        digits(17, 2),
    );
    let (Some(year), Some(month), Some(day), Some(hour), Some(min), Some(sec)) = fields else {
        return Err(err("expected YYYY-MM-DDTHH:MM:SS"));
    };
    if !separators_ok {
        return Err(err("expected YYYY-MM-DDTHH:MM:SS"));
    }
    if !(1..=12).contains(&month) || day < 1 || day > days_in_month(year, month) {
        return Err(err("no such date"));
    }
    // Second 60 is a leap second, allowed by RFC 3339; it simply folds into the next minute.
    if hour > 23 || min > 59 || sec > 60 {
        return Err(err("no such time of day"));
    }

    let mut i = 19;
    let mut nanos: u32 = 0;
    if b[i] == b'.' {
        i += 1;
        let start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        if i == start {
            return Err(err("empty fraction of a second"));
        }
        // Keep nanosecond precision; further digits cannot be represented and are dropped.
        let mut scale = 100_000_000;
        for &c in &b[start..i.min(start + 9)] {
            nanos += u32::from(c - b'0') * scale;
            scale /= 10;
        }
    }
    let offset_secs = match &b[i..] {
        [b'Z' | b'z'] => 0,
        [sign @ (b'+' | b'-'), _, _, b':', _, _] => {
            let (Some(oh), Some(om)) = (digits(i + 1, 2), digits(i + 4, 2)) else {
                return Err(err("bad UTC offset"));
            };
            if oh > 23 || om > 59 {
                return Err(err("bad UTC offset"));
            }
            let magnitude = oh * 3600 + om * 60;
            if *sign == b'-' {
                -magnitude
            } else {
                magnitude
            }
        }
        _ => return Err(err("expected Z or a ±HH:MM offset at the end")),
    };

    let secs =
        days_from_civil(year, month, day) * 86_400 + hour * 3600 + min * 60 + sec - offset_secs;
    let t = if secs >= 0 {
        UNIX_EPOCH.checked_add(Duration::new(secs.unsigned_abs(), nanos))
    } else {
        UNIX_EPOCH
            .checked_sub(Duration::from_secs(secs.unsigned_abs()))
            .and_then(|t| t.checked_add(Duration::from_nanos(u64::from(nanos))))
    };
    t.ok_or_else(|| err("out of range"))
}

fn is_leap(year: i64) -> bool {
    year % 4 == 0 && (year % 100 != 0 || year % 400 == 0)
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        2 if is_leap(year) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

// Howard Hinnant's `days_from_civil` / `civil_from_days`: exact proleptic Gregorian conversions.
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64, millis: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_millis(millis)
    }

    #[test]
    fn formats_utc_millis() {
        assert_eq!(
            format_rfc3339_millis(UNIX_EPOCH),
            "1970-01-01T00:00:00.000Z"
        );
        assert_eq!(
            format_rfc3339_millis(at(1_714_564_800, 123)),
            "2024-05-01T12:00:00.123Z"
        );
        assert_eq!(
            format_rfc3339_millis(at(951_782_400, 0)),
            "2000-02-29T00:00:00.000Z"
        );
    }

    #[test]
    fn parses_zulu_and_offsets() {
        let t = at(1_714_564_800, 123);
        for s in [
            "2024-05-01T12:00:00.123Z",
            "2024-05-01t12:00:00.123z",
            "2024-05-01 12:00:00.123Z",
            "2024-05-01T14:00:00.123+02:00",
            "2024-05-01T07:30:00.123-04:30",
            "2024-05-01T12:00:00.123000+00:00",
            "2024-05-01T12:00:00.1230000009Z",
        ] {
            assert_eq!(parse_rfc3339(s), Ok(t), "{s}");
        }
        assert_eq!(
            parse_rfc3339("2024-05-01T12:00:00Z"),
            Ok(at(1_714_564_800, 0))
        );
        assert_eq!(
            parse_rfc3339("1969-12-31T23:59:59.5Z"),
            Ok(UNIX_EPOCH - Duration::from_millis(500))
        );
    }

    #[test]
    fn round_trips() {
        for secs in [0, 68_169_600, 951_868_799, 4_102_444_800] {
            let t = at(secs, 7);
            assert_eq!(parse_rfc3339(&format_rfc3339_millis(t)), Ok(t));
        }
    }

    #[test]
    fn rejects_garbage() {
        for s in [
            "",
            "yesterday",
            "2024-05-01",
            "2024-05-01T12:00:00",
            "2024-05-01T12:00:00+0200",
            "2024-05-01T12:00:00.Z",
            "2024-13-01T12:00:00Z",
            "2023-02-29T12:00:00Z",
            "2024-05-01T24:00:00Z",
            "2024-05-01T12:00:00+24:00",
            "2024-05-01X12:00:00Z",
            "2024-05-01T12:00:00Z ",
            "２024-05-01T12:00:00Z",
        ] {
            assert!(parse_rfc3339(s).is_err(), "{s:?} must be refused");
        }
    }
}
