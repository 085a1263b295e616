//! The Monitor view's query: `since`/`until` (RFC 3339, or a duration ago:
//! `90s`, `15m`, `1h`, `7d`), `step` (seconds, or a duration), read
//! against the controller's clock, checked, and the step defaulted to the
//! finest the chosen tier allows with at most [`DEFAULT_POINTS`] points.

use super::Tier;
use crate::config::MetricsConfig;

/// Points a default step aims at.
pub const DEFAULT_POINTS: i64 = 360;
/// Most points one series may have (as Prometheus caps a range query).
pub const MAX_POINTS: i64 = 11_000;
/// The default range: the last hour.
pub const DEFAULT_RANGE_MS: i64 = 3_600_000;

/// A parameter that cannot be read; answered 400 naming it.
#[derive(Debug, thiserror::Error)]
#[error("{param}: {message}")]
pub struct QueryError {
    pub param: &'static str,
    pub message: String,
}

fn err(param: &'static str, message: impl Into<String>) -> QueryError {
    QueryError {
        param,
        message: message.into(),
    }
}

/// The range and step a view is made over, and the tier it reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    pub since_ms: i64,
    pub until_ms: i64,
    pub step_secs: u64,
    pub tier: Tier,
}

/// A duration: `<n>` with `s`, `m`, `h` or `d` (or none, for `step`:
/// seconds). Answers milliseconds.
fn duration(param: &'static str, s: &str, bare_secs: bool) -> Result<i64, QueryError> {
    let (num, unit) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => (&s[..i], c),
        _ if bare_secs => (s, 's'),
        _ => {
            return Err(err(
                param,
                format!("{s:?} is neither RFC 3339 nor a duration like 15m"),
            ))
        }
    };
    let mult: i64 = match unit {
        's' => 1,
        'm' => 60,
        'h' => 3600,
        'd' => 86_400,
        _ => return Err(err(param, format!("unit {unit:?}: use s, m, h or d"))),
    };
    let n: i64 = num
        .parse()
        .ok()
        .filter(|n| (1..=100_000_000).contains(n))
        .ok_or_else(|| {
            err(
                param,
                format!("{s:?}: want a positive whole number and a unit (s, m, h, d)"),
            )
        })?;
    Ok(n * mult * 1000)
}

/// A time: RFC 3339, or a duration before `now_ms`.
fn instant(param: &'static str, s: &str, now_ms: i64) -> Result<i64, QueryError> {
    if s.contains('T') || s.contains(':') {
        return chrono::DateTime::parse_from_rfc3339(s)
            .map(|t| t.timestamp_millis())
            .map_err(|e| err(param, format!("{s:?} is not RFC 3339: {e}")));
    }
    Ok(now_ms - duration(param, s, false)?)
}

/// Reads `since`, `until` and `step` (each optional) at `now_ms`.
pub fn parse(
    since: Option<&str>,
    until: Option<&str>,
    step: Option<&str>,
    now_ms: i64,
    cfg: &MetricsConfig,
) -> Result<Range, QueryError> {
    let until_ms = match until {
        Some(u) => instant("until", u, now_ms)?.min(now_ms),
        None => now_ms,
    };
    let since_ms = match since {
        Some(s) => instant("since", s, now_ms)?,
        None => until_ms - DEFAULT_RANGE_MS,
    };
    if since_ms >= until_ms {
        return Err(err("since", "must be before until (and before now)"));
    }
    let tier = Tier::for_since(since_ms, now_ms, cfg);
    let span = until_ms - since_ms;
    let step_secs = match step {
        Some(s) => {
            // Never finer than the tier holds.
            let secs = (duration("step", s, true)? / 1000).max(tier.min_step_secs(false));
            if span / (secs * 1000) > MAX_POINTS {
                return Err(err(
                    "step",
                    format!(
                        "{s:?} makes more than {MAX_POINTS} points over the range; use a larger \
                         step"
                    ),
                ));
            }
            secs
        }
        None => {
            let fit = (span + DEFAULT_POINTS * 1000 - 1) / (DEFAULT_POINTS * 1000);
            fit.max(tier.min_step_secs(true))
        }
    };
    Ok(Range {
        since_ms,
        until_ms,
        step_secs: step_secs as u64,
        tier,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_800_000_000_000;

    fn p(
        since: Option<&str>,
        until: Option<&str>,
        step: Option<&str>,
    ) -> Result<Range, QueryError> {
        parse(since, until, step, NOW, &MetricsConfig::default())
    }

    #[test]
    fn defaults_are_the_last_hour_from_raw_samples() {
        let r = p(None, None, None).unwrap();
        assert_eq!(
            (r.since_ms, r.until_ms, r.step_secs),
            (NOW - 3_600_000, NOW, 10)
        );
        assert_eq!(r.tier, Tier::Raw);
    }

    #[test]
    fn older_ranges_read_coarser_tiers() {
        let r = p(Some("1d"), None, None).unwrap();
        assert_eq!((r.tier, r.step_secs), (Tier::Minute, 240));
        let r = p(Some("30d"), None, Some("60")).unwrap();
        assert_eq!((r.tier, r.step_secs), (Tier::Hour, 3600));
        let r = p(
            Some("2026-01-01T00:00:00Z"),
            Some("2026-01-01T01:00:00Z"),
            Some("5m"),
        );
        assert_eq!(r.unwrap().step_secs, 3600, "hour tier: an hour at least");
    }

    #[test]
    fn bad_parameters_are_named() {
        for (since, until, step, want) in [
            (Some("yesterday"), None, None, "since"),
            (Some("5x"), None, None, "since"),
            (Some("-5m"), None, None, "since"),
            (None, Some("nope"), None, "until"),
            (None, None, Some("0"), "step"),
            (None, None, Some("fast"), "step"),
            (Some("7d"), None, Some("2w"), "step"),
            (Some("1m"), Some("2m"), None, "since"),
        ] {
            let e = p(since, until, step).unwrap_err();
            assert_eq!(e.param, want, "{since:?} {until:?} {step:?}: {e}");
        }
        // Too many points (raw samples kept two days, one-second steps).
        let cfg = MetricsConfig {
            raw_retention_secs: 2 * 86_400,
            ..MetricsConfig::default()
        };
        let e = parse(Some("1d"), None, Some("1"), NOW, &cfg).unwrap_err();
        assert_eq!(e.param, "step", "{e}");
        // A step finer than the tier is raised to it.
        assert_eq!(p(Some("7d"), None, Some("1s")).unwrap().step_secs, 60);
    }
}
