//! The two request-time formats SigV4 accepts, without a date library: `X-Amz-Date` (ISO 8601 basic,
//! `20150830T123600Z`) and `Date` (IMF-fixdate, `Sun, 30 Aug 2015 12:36:00 GMT`). Times are whole
//! seconds since the Unix epoch, UTC.

use std::time::{SystemTime, UNIX_EPOCH};

/// Seconds since the Unix epoch, negative before it, saturating far outside the representable range.
pub(crate) fn unix_seconds(time: SystemTime) -> i64 {
    match time.duration_since(UNIX_EPOCH) {
        Ok(after) => i64::try_from(after.as_secs()).unwrap_or(i64::MAX),
        Err(before) => i64::try_from(before.duration().as_secs()).map_or(i64::MIN, |s| -s),
    }
}

/// `YYYYMMDDTHHMMSSZ`, the form the string to sign carries.
pub(crate) fn format_amz_date(unix: i64) -> String {
    let (days, secs) = (unix.div_euclid(86_400), unix.rem_euclid(86_400));
    let (year, month, day) = civil_from_days(days);
    format!("{year:04}{month:02}{day:02}T{:02}{:02}{:02}Z", secs / 3600, secs / 60 % 60, secs % 60)
}

/// Parses `YYYYMMDDTHHMMSSZ`.
pub(crate) fn parse_amz_date(value: &str) -> Option<i64> {
    let b = value.as_bytes();
    if b.len() != 16 || b[8] != b'T' || b[15] != b'Z' {
        return None;
    }
    let year = digits(&b[0..4])?;
    let (month, day) = (digits(&b[4..6])?, digits(&b[6..8])?);
    let (hour, minute, second) = (digits(&b[9..11])?, digits(&b[11..13])?, digits(&b[13..15])?);
    to_unix(year, month, day, hour, minute, second)
}

/// Parses an IMF-fixdate (RFC 9110 §5.6.7), the only `Date` form SDKs send.
pub(crate) fn parse_http_date(value: &str) -> Option<i64> {
    const MONTHS: [&str; 12] = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
    let mut parts = value.split(' ');
    let (_weekday, day, month, year, time, zone) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || zone != "GMT" || day.len() != 2 || year.len() != 4 {
        return None;
    }
    let month = MONTHS.iter().position(|m| *m == month)? as i64 + 1;
    let t = time.as_bytes();
    if t.len() != 8 || t[2] != b':' || t[5] != b':' {
        return None;
    }
    let (hour, minute, second) = (digits(&t[0..2])?, digits(&t[3..5])?, digits(&t[6..8])?);
    to_unix(digits(year.as_bytes())?, month, digits(day.as_bytes())?, hour, minute, second)
}

fn digits(bytes: &[u8]) -> Option<i64> {
    bytes.iter().try_fold(0i64, |n, &b| b.is_ascii_digit().then(|| n * 10 + i64::from(b - b'0')))
}

fn to_unix(year: i64, month: i64, day: i64, hour: i64, minute: i64, second: i64) -> Option<i64> {
    let valid = (1..=12).contains(&month)
        && (1..=days_in_month(year, month)).contains(&day)
        && hour < 24
        && minute < 60
        && second < 60;
    valid.then(|| days_from_civil(year, month, day) * 86_400 + hour * 3600 + minute * 60 + second)
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        2 if year % 4 == 0 && (year % 100 != 0 || year % 400 == 0) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's `days_from_civil`).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let day_of_year = (153 * ((month + 9) % 12) + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// The inverse of [`days_from_civil`].
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let days = days + 719_468;
    let era = days.div_euclid(146_097);
    let day_of_era = days - era * 146_097;
    let year_of_era = (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let shifted_month = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * shifted_month + 2) / 5 + 1;
    let month = if shifted_month < 10 { shifted_month + 3 } else { shifted_month - 9 };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const TEST_SUITE_TIME: i64 = 1_440_938_160; // 2015-08-30T12:36:00Z

    #[test]
    fn amz_date_parses_and_formats_the_test_suite_time() {
        assert_eq!(parse_amz_date("20150830T123600Z"), Some(TEST_SUITE_TIME));
        assert_eq!(format_amz_date(TEST_SUITE_TIME), "20150830T123600Z");
    }

    #[test]
    fn http_date_parses_the_same_instant() {
        assert_eq!(parse_http_date("Sun, 30 Aug 2015 12:36:00 GMT"), Some(TEST_SUITE_TIME));
    }

    #[test]
    fn epoch_leap_days_and_centuries_round_trip() {
        for (text, unix) in [
            ("19700101T000000Z", 0),
            ("20000229T235959Z", 951_868_799),
            ("21000301T000000Z", 4_107_542_400),
            ("19691231T235959Z", -1),
        ] {
            assert_eq!(parse_amz_date(text), Some(unix), "{text}");
            assert_eq!(format_amz_date(unix), text);
        }
        for day in (-719_468..2_932_896).step_by(997) {
            // Years 0000 to 9999, the range the four-digit format covers.
            let unix = day * 86_400 + 45_296;
            assert_eq!(parse_amz_date(&format_amz_date(unix)), Some(unix), "day {day}");
        }
    }

    #[test]
    fn system_time_converts_both_sides_of_the_epoch() {
        assert_eq!(unix_seconds(UNIX_EPOCH + Duration::from_secs(TEST_SUITE_TIME as u64)), TEST_SUITE_TIME);
        assert_eq!(unix_seconds(UNIX_EPOCH - Duration::from_secs(5)), -5);
    }

    #[test]
    fn malformed_dates_are_rejected() {
        for bad in [
            "",
            "20150830T123600",
            "20150830T123600z",
            "20150830 123600Z",
            "2015083OT123600Z",
            "20151330T123600Z",
            "20150230T123600Z",
            "20190229T000000Z",
            "20150830T243600Z",
            "20150830T126000Z",
            "20150830T123660Z",
            "+0150830T123600Z",
            "２015083T123600Z",
            "2015-08-30T12:36:00Z",
        ] {
            assert_eq!(parse_amz_date(bad), None, "{bad:?}");
        }
        for bad in [
            "",
            "Sun, 30 Aug 2015 12:36:00 UTC",
            "Sun, 30 Aug 2015 12:36:00",
            "Sun, 30 Aug 2015 12:36:00 GMT extra",
            "Sun, 30 Agu 2015 12:36:00 GMT",
            "Sun, 31 Sep 2015 12:36:00 GMT",
            "Sun, 3 Aug 2015 12:36:00 GMT",
            "Sun, 30 Aug 2015 12-36-00 GMT",
            "Sun, 30 Aug 2015 1é:36:0 GMT",
            "Sunday, 30-Aug-15 12:36:00 GMT",
        ] {
            assert_eq!(parse_http_date(bad), None, "{bad:?}");
        }
    }
}
