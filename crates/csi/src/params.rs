//! VolumeReplicationClass parameters, as they reach the driver.
//!
//! The csi-addons controller passes a VolumeReplicationClass's `parameters`
//! to every replication RPC after *removing* the keys prefixed with
//! `replication.storage.openshift.io/` (the secret name and namespace, which
//! it resolves into the request's secrets). The keys ceph-csi understands,
//! and so do we:
//!
//! | key | values | default |
//! |---|---|---|
//! | `mirroringMode` | `snapshot`, `journal` | `snapshot` |
//! | `schedulingInterval` | `<n>m`, `<n>h`, `<n>d` (and `<n>s`, our extension for tests) | none (engine default) |
//! | `schedulingStartTime` | ISO 8601 time of day or date-time | none |
//! | `flattenMode` | `never`, `force` | `never` |
//! | `replicaClones` | `linked`, `flatten` (ours: how the replica of a clone is made) | `linked` |
//! | `force` | a Go `strconv.ParseBool` boolean (used by Disable) | `false` |
//!
//! As in ceph-csi: unknown keys are ignored (returned in
//! [`ReplicationParams::ignored`] for the caller to log); a start time needs
//! an interval; in journal mode the scheduling keys are ignored without being
//! validated.
//!
//! Start times: `rbd mirror snapshot schedule add` parses its start time with
//! Python's `dateutil` and keeps only the hour, the minute and the offset, so
//! a date is silently dropped. We accept the ISO 8601 subset users write
//! (see [`StartTime`]) and keep a date when one is given: a full date-time is
//! an absolute first sync time, a time of day anchors a grid of sync times.
//! This module computes, it never schedules anything.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use chrono::format::{ParseErrorKind, Parsed, StrftimeItems};
use chrono::{DateTime, FixedOffset, NaiveDate, NaiveTime, Offset, SecondsFormat, Timelike, Utc};
use serde::{Deserialize, Serialize};

/// The `mirroringMode` key.
pub const MIRRORING_MODE_KEY: &str = "mirroringMode";
/// The `schedulingInterval` key.
pub const SCHEDULING_INTERVAL_KEY: &str = "schedulingInterval";
/// The `schedulingStartTime` key.
pub const SCHEDULING_START_TIME_KEY: &str = "schedulingStartTime";
/// The `flattenMode` key.
pub const FLATTEN_MODE_KEY: &str = "flattenMode";
/// Key of how the replica of a clone is made (an extension of this
/// sidecar): `linked` (a clone of the parent's replica when the parent is
/// replicated, as rbd-mirror does) or `flatten` (always a flat copy).
pub const REPLICA_CLONES_KEY: &str = "replicaClones";
/// The `force` key (DisableVolumeReplication).
pub const FORCE_KEY: &str = "force";
/// Key of the per-image byte-rate cap (an extension of this sidecar), e.g.
/// `50M` for 50 MiB/s.
pub const BANDWIDTH_LIMIT_KEY: &str = "bandwidthLimit";

/// The longest scheduling interval we accept.
pub const MAX_SCHEDULING_INTERVAL: Duration = Duration::from_secs(365 * 86_400);

/// How images are mirrored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum MirroringMode {
    /// Snapshot-based mirroring (the default).
    #[default]
    Snapshot,
    /// Journal-based mirroring.
    Journal,
}

impl MirroringMode {
    /// The parameter value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Snapshot => "snapshot",
            Self::Journal => "journal",
        }
    }
}

impl fmt::Display for MirroringMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What to do with an image that has a parent (a clone) when enabling.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum FlattenMode {
    /// Leave the image as it is (the default).
    #[default]
    Never,
    /// Flatten the image first.
    Force,
}

impl FlattenMode {
    /// The parameter value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Never => "never",
            Self::Force => "force",
        }
    }
}

impl fmt::Display for FlattenMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// When a snapshot schedule starts.
///
/// Parsed from the ISO 8601 extended forms (a missing offset means UTC):
/// - time of day: `14:00`, `14:00:00`, `14:00:00.5`, each optionally followed
///   by `Z`, `+05:00`, `+0500` or `+05`;
/// - date and time: `2024-05-01T14:00[:00[.5]]` with the same optional offset
///   (`t` or a space also separate date and time);
/// - a date alone, `2024-05-01`, meaning its midnight UTC.
///
/// Seconds 60 (leap seconds) and `24:00` are rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StartTime {
    /// An absolute instant: the first sync is at it, or on the grid after it.
    At(DateTime<FixedOffset>),
    /// A time of day in a fixed offset: sync times lie on the grid through
    /// that time, as `rbd mirror snapshot schedule` anchors it (on
    /// 1970-01-01). For intervals that divide a day this means "at that time
    /// every day, and every interval in between".
    Daily {
        /// The time of day.
        time: NaiveTime,
        /// The offset the time is in.
        offset: FixedOffset,
    },
}

impl StartTime {
    /// Parses a `schedulingStartTime` value.
    pub fn parse(s: &str) -> Result<Self, ParamError> {
        parse_start_time(s).map_err(|reason| ParamError::InvalidSchedulingStartTime {
            value: s.to_owned(),
            reason,
        })
    }

    /// The instant the grid is anchored at.
    pub fn anchor(&self) -> DateTime<Utc> {
        match self {
            Self::At(t) => t.with_timezone(&Utc),
            Self::Daily { time, offset } => {
                let naive = NaiveDate::from_ymd_opt(1970, 1, 1)
                    .unwrap_or_default()
                    .and_time(*time);
                // A fixed offset maps every local time to exactly one instant.
                DateTime::<Utc>::from_naive_utc_and_offset(naive, Utc)
                    - chrono::TimeDelta::seconds(i64::from(offset.local_minus_utc()))
            }
        }
    }

    /// The first sync time at or after `now` for a schedule of `interval`:
    /// the earliest `anchor + k * interval >= now`. For [`StartTime::At`] in
    /// the future that is the start time itself (k >= 0). A zero interval
    /// yields `max(now, start)`.
    pub fn next_at_or_after(&self, now: DateTime<Utc>, interval: Duration) -> DateTime<Utc> {
        let anchor = self.anchor();
        if matches!(self, Self::At(_)) && anchor >= now {
            return anchor;
        }
        let step = i128::try_from(interval.as_nanos()).unwrap_or(i128::MAX);
        if step == 0 {
            return now.max(anchor);
        }
        let diff = nanos(now) - nanos(anchor);
        // Ceiling division for either sign of diff.
        let k = -((-diff).div_euclid(step));
        let at = nanos(anchor).saturating_add(k.saturating_mul(step));
        from_nanos(at).unwrap_or(now)
    }
}

fn nanos(t: DateTime<Utc>) -> i128 {
    i128::from(t.timestamp()) * 1_000_000_000 + i128::from(t.timestamp_subsec_nanos())
}

fn from_nanos(n: i128) -> Option<DateTime<Utc>> {
    let secs = i64::try_from(n.div_euclid(1_000_000_000)).ok()?;
    let sub = u32::try_from(n.rem_euclid(1_000_000_000)).ok()?;
    DateTime::from_timestamp(secs, sub)
}

impl fmt::Display for StartTime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::At(t) => f.write_str(&t.to_rfc3339_opts(SecondsFormat::AutoSi, true)),
            Self::Daily { time, offset } => {
                write!(f, "{}", time.format("%H:%M:%S%.f"))?;
                write_offset(f, *offset)
            }
        }
    }
}

fn write_offset(f: &mut fmt::Formatter<'_>, offset: FixedOffset) -> fmt::Result {
    let secs = offset.local_minus_utc();
    if secs == 0 {
        return f.write_str("Z");
    }
    let sign = if secs < 0 { '-' } else { '+' };
    let abs = secs.unsigned_abs();
    write!(f, "{sign}{:02}:{:02}", abs / 3600, abs / 60 % 60)
}

impl FromStr for StartTime {
    type Err = ParamError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl Serialize for StartTime {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for StartTime {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// The parameters of a VolumeReplicationClass, validated.
///
/// Serializes as the canonical parameter map ([`ReplicationParams::to_map`]),
/// so the engine can store it with a volume's registry entry and read it back.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(
    into = "BTreeMap<String, String>",
    try_from = "BTreeMap<String, String>"
)]
pub struct ReplicationParams {
    /// `mirroringMode`.
    pub mirroring_mode: MirroringMode,
    /// `schedulingInterval`; `None` leaves the choice to the engine.
    pub scheduling_interval: Option<Duration>,
    /// `schedulingStartTime`; only set together with an interval.
    pub scheduling_start_time: Option<StartTime>,
    /// `flattenMode`.
    pub flatten_mode: FlattenMode,
    /// `force`, used by DisableVolumeReplication.
    pub force: bool,
    /// `bandwidthLimit`: byte-rate cap of this image's replication, bytes/s.
    pub bandwidth_limit: Option<u64>,
    /// `replicaClones=flatten`: the replica of a clone is a flat copy even
    /// when its parent is replicated.
    pub flatten_replica: bool,
    /// Keys that were present but not used, sorted: unknown keys, and the
    /// scheduling keys in journal mode. Not part of [`to_map`](Self::to_map).
    pub ignored: Vec<String>,
}

impl ReplicationParams {
    /// Validates the parameters of a request.
    pub fn parse(params: &HashMap<String, String>) -> Result<Self, ParamError> {
        Self::from_pairs(params.iter().map(|(k, v)| (k.as_str(), v.as_str())))
    }

    /// `force` as DisableVolumeReplication reads it: never an error (a
    /// broken class must not block a finalizer); anything but a true value
    /// is `false`, with a warning for a value that is not a boolean.
    pub fn lenient_force(params: &HashMap<String, String>) -> bool {
        match params.get(FORCE_KEY).map(|v| (v, parse_go_bool(v))) {
            Some((_, Some(b))) => b,
            Some((v, None)) => {
                tracing::warn!(value = %v, "parameter force is not a boolean; taken as false");
                false
            }
            None => false,
        }
    }

    fn from_pairs<'a>(pairs: impl Iterator<Item = (&'a str, &'a str)>) -> Result<Self, ParamError> {
        let mut raw = RawParams::default();
        for (key, value) in pairs {
            match key {
                MIRRORING_MODE_KEY => raw.mode = Some(value),
                SCHEDULING_INTERVAL_KEY => raw.interval = Some(value),
                SCHEDULING_START_TIME_KEY => raw.start = Some(value),
                FLATTEN_MODE_KEY => raw.flatten = Some(value),
                FORCE_KEY => raw.force = Some(value),
                BANDWIDTH_LIMIT_KEY => raw.bandwidth = Some(value),
                REPLICA_CLONES_KEY => raw.replica_clones = Some(value),
                _ => raw.ignored.push(key.to_owned()),
            }
        }
        let mirroring_mode = match raw.mode {
            None | Some("snapshot") => MirroringMode::Snapshot,
            Some("journal") => MirroringMode::Journal,
            Some(other) => {
                return Err(ParamError::InvalidMirroringMode {
                    value: other.to_owned(),
                });
            }
        };
        let (scheduling_interval, scheduling_start_time) = raw.schedule(mirroring_mode)?;
        let flatten_mode = match raw.flatten {
            None | Some("never") => FlattenMode::Never,
            Some("force") => FlattenMode::Force,
            Some(other) => {
                return Err(ParamError::InvalidFlattenMode {
                    value: other.to_owned(),
                });
            }
        };
        let flatten_replica = match raw.replica_clones {
            None | Some("linked") => false,
            Some("flatten") => true,
            Some(other) => {
                return Err(ParamError::InvalidReplicaClones {
                    value: other.to_owned(),
                });
            }
        };
        let force = match raw.force {
            None => false,
            Some(v) => parse_go_bool(v).ok_or_else(|| ParamError::InvalidForce {
                value: v.to_owned(),
            })?,
        };
        let bandwidth_limit = raw.bandwidth_limit()?;
        let mut ignored = raw.ignored;
        ignored.sort();
        Ok(Self {
            mirroring_mode,
            scheduling_interval,
            scheduling_start_time,
            flatten_mode,
            force,
            bandwidth_limit,
            flatten_replica,
            ignored,
        })
    }

    /// The canonical parameter map: every used key with its value in
    /// canonical form (defaults included, `ignored` left out). Parsing it
    /// gives back an equal value with an empty `ignored`.
    pub fn to_map(&self) -> BTreeMap<String, String> {
        let mut m = BTreeMap::new();
        m.insert(
            MIRRORING_MODE_KEY.to_owned(),
            self.mirroring_mode.as_str().to_owned(),
        );
        if let Some(i) = self.scheduling_interval {
            m.insert(SCHEDULING_INTERVAL_KEY.to_owned(), format_interval(i));
        }
        if let Some(s) = &self.scheduling_start_time {
            m.insert(SCHEDULING_START_TIME_KEY.to_owned(), s.to_string());
        }
        m.insert(
            FLATTEN_MODE_KEY.to_owned(),
            self.flatten_mode.as_str().to_owned(),
        );
        m.insert(FORCE_KEY.to_owned(), self.force.to_string());
        if let Some(b) = self.bandwidth_limit {
            m.insert(BANDWIDTH_LIMIT_KEY.to_owned(), b.to_string());
        }
        if self.flatten_replica {
            m.insert(REPLICA_CLONES_KEY.to_owned(), "flatten".to_owned());
        }
        m
    }
}

impl From<ReplicationParams> for BTreeMap<String, String> {
    fn from(p: ReplicationParams) -> Self {
        p.to_map()
    }
}

impl TryFrom<BTreeMap<String, String>> for ReplicationParams {
    type Error = ParamError;

    fn try_from(m: BTreeMap<String, String>) -> Result<Self, Self::Error> {
        Self::from_pairs(m.iter().map(|(k, v)| (k.as_str(), v.as_str())))
    }
}

/// Parses a byte size: a number with an optional binary unit `K`, `M`, `G`
/// or `T` (`Ki`, `KiB`, `KB`, ... alike), e.g. `64M` = 64 MiB.
pub fn parse_size(value: &str) -> Result<usize, String> {
    let v = value.trim();
    let split = v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len());
    let (num, unit) = v.split_at(split);
    if num.is_empty() {
        return Err(format!("{value:?} does not start with a number"));
    }
    let shift = match unit
        .to_ascii_uppercase()
        .trim_end_matches('B')
        .trim_end_matches('I')
    {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        u => return Err(format!("unknown size unit {u:?} (use K, M, G or T)")),
    };
    let n: usize = num.parse().map_err(|_| format!("{value:?} is too large"))?;
    n.checked_mul(1usize << shift)
        .ok_or_else(|| format!("{value:?} is too large"))
}

/// Parses `^\d+[smhd]$` into a duration in `1s..=365d`.
pub fn parse_interval(value: &str) -> Result<Duration, ParamError> {
    if value.is_empty() {
        return Err(ParamError::EmptySchedulingInterval);
    }
    let bad = || ParamError::InvalidSchedulingInterval {
        value: value.to_owned(),
    };
    if !value.is_ascii() {
        return Err(bad());
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    let unit_secs: u64 = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3_600,
        "d" => 86_400,
        _ => return Err(bad()),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let out_of_range = || ParamError::SchedulingIntervalOutOfRange {
        value: value.to_owned(),
    };
    let n: u64 = digits.parse().map_err(|_| out_of_range())?;
    let secs = n.checked_mul(unit_secs).ok_or_else(out_of_range)?;
    let d = Duration::from_secs(secs);
    if secs == 0 || d > MAX_SCHEDULING_INTERVAL {
        return Err(out_of_range());
    }
    Ok(d)
}

/// Writes an interval in the largest unit that divides it (`1d`, `90m`, `5s`).
/// Sub-second parts are dropped; intervals are whole seconds when parsed.
pub fn format_interval(d: Duration) -> String {
    let secs = d.as_secs();
    for (unit, size) in [("d", 86_400), ("h", 3_600), ("m", 60)] {
        if secs != 0 && secs.is_multiple_of(size) {
            return format!("{}{unit}", secs / size);
        }
    }
    format!("{secs}s")
}

/// The recognized parameters as given, before they are checked; the keys
/// not recognized.
#[derive(Default)]
struct RawParams<'a> {
    mode: Option<&'a str>,
    interval: Option<&'a str>,
    start: Option<&'a str>,
    flatten: Option<&'a str>,
    force: Option<&'a str>,
    bandwidth: Option<&'a str>,
    replica_clones: Option<&'a str>,
    ignored: Vec<String>,
}

impl RawParams<'_> {
    /// The schedule of a snapshot-mode volume (journal mode has none: its
    /// schedule keys are ignored, and said so).
    fn schedule(
        &mut self,
        mode: MirroringMode,
    ) -> Result<(Option<Duration>, Option<StartTime>), ParamError> {
        match mode {
            MirroringMode::Journal => {
                self.ignored
                    .extend(self.interval.map(|_| SCHEDULING_INTERVAL_KEY.to_owned()));
                self.ignored
                    .extend(self.start.map(|_| SCHEDULING_START_TIME_KEY.to_owned()));
                Ok((None, None))
            }
            MirroringMode::Snapshot => {
                // ceph-csi treats an empty start time as absent.
                let start = self.start.filter(|s| !s.is_empty());
                let interval = self.interval.map(parse_interval).transpose()?;
                if interval.is_none()
                    && let Some(s) = start
                {
                    return Err(ParamError::StartTimeWithoutInterval {
                        value: s.to_owned(),
                    });
                }
                Ok((interval, start.map(StartTime::parse).transpose()?))
            }
        }
    }

    /// `bandwidthLimit` in bytes per second; 0 is no limit.
    fn bandwidth_limit(&self) -> Result<Option<u64>, ParamError> {
        Ok(self
            .bandwidth
            .map(|v| {
                parse_size(v).map(|n| n as u64).map_err(|reason| {
                    ParamError::InvalidBandwidthLimit {
                        value: v.to_owned(),
                        reason,
                    }
                })
            })
            .transpose()?
            .filter(|n| *n > 0))
    }
}

/// Go's `strconv.ParseBool`, which ceph-csi uses for `force`.
fn parse_go_bool(s: &str) -> Option<bool> {
    match s {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

/// The `schedulingStartTime` forms, as chrono format strings, tried in order.
/// `%#z` takes `Z`, `+HH`, `+HHMM` and `+HH:MM`; `%.f` an optional fraction.
const START_TIME_FORMATS: [&str; 9] = [
    "%H:%M",
    "%H:%M%#z",
    "%H:%M:%S%.f",
    "%H:%M:%S%.f%#z",
    "%Y-%m-%d",
    "%Y-%m-%dT%H:%M",
    "%Y-%m-%dT%H:%M%#z",
    "%Y-%m-%dT%H:%M:%S%.f",
    "%Y-%m-%dT%H:%M:%S%.f%#z",
];

fn parse_start_time(s: &str) -> Result<StartTime, &'static str> {
    if s.is_empty() {
        return Err("it is empty");
    }
    if !s.is_ascii() {
        return Err("it contains a character that is not ASCII");
    }
    // ISO 8601 also separates date and time with `t` or a space.
    let mut text = s.to_owned();
    if matches!(text.as_bytes().get(10), Some(b't' | b' ')) && text.as_bytes().get(4) == Some(&b'-')
    {
        text.replace_range(10..11, "T");
    }
    // The most telling error over all forms: a value out of range beats a
    // shape that does not match.
    let mut worst = ParseErrorKind::Invalid;
    for format in START_TIME_FORMATS {
        let mut parsed = Parsed::new();
        match chrono::format::parse(&mut parsed, &text, StrftimeItems::new(format)) {
            Ok(()) => return start_time_from(&parsed),
            Err(e)
                if matches!(
                    e.kind(),
                    ParseErrorKind::OutOfRange | ParseErrorKind::Impossible
                ) =>
            {
                worst = e.kind();
            }
            Err(_) => {}
        }
    }
    Err(match worst {
        ParseErrorKind::OutOfRange => "a field is out of range",
        ParseErrorKind::Impossible => "the date does not exist",
        _ => "it is not in one of the accepted forms",
    })
}

/// The start time of a successful parse: a date makes it absolute.
fn start_time_from(parsed: &Parsed) -> Result<StartTime, &'static str> {
    let offset = match parsed.offset() {
        Some(secs) => FixedOffset::east_opt(secs).ok_or("the UTC offset is out of range")?,
        None => Utc.fix(),
    };
    let time = if parsed.hour_div_12().is_some() {
        parsed
            .to_naive_time()
            .map_err(|_| "the time does not exist")?
    } else {
        NaiveTime::MIN
    };
    // chrono reads second 60 as a leap second; a schedule has none.
    if time.nanosecond() >= 1_000_000_000 {
        return Err("the second must be 00 to 59");
    }
    if parsed.year().is_none() {
        return Ok(StartTime::Daily { time, offset });
    }
    let date = parsed
        .to_naive_date()
        .map_err(|_| "the date does not exist")?;
    date.and_time(time)
        .and_local_timezone(offset)
        .single()
        .map(StartTime::At)
        .ok_or("the date and time are out of range")
}

/// Accepted `schedulingStartTime` forms, for messages.
const START_TIME_FORMS: &str = "a time of day such as \"14:00\", \"14:00:00\" or \
     \"14:00:00-05:00\", or a date and time such as \"2024-05-01T14:00:00Z\"";

/// A parameter that is not valid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParamError {
    /// `bandwidthLimit` is not a size.
    #[error("bandwidthLimit {value:?} is not a byte rate like 50M (bytes per second): {reason}")]
    InvalidBandwidthLimit {
        /// The value given.
        value: String,
        /// What is wrong.
        reason: String,
    },
    /// `mirroringMode` has an unknown value.
    #[error(
        "mirroringMode {value:?} is not supported; accepted values are \"snapshot\" (the \
         default) and \"journal\""
    )]
    InvalidMirroringMode {
        /// The value given.
        value: String,
    },
    /// `schedulingInterval` is present but empty.
    #[error(
        "schedulingInterval is empty; give a number and a unit m, h or d (or s), such as \
         \"5m\", \"1h\" or \"1d\", or leave it out"
    )]
    EmptySchedulingInterval,
    /// `schedulingInterval` is not `<number><unit>`.
    #[error(
        "schedulingInterval {value:?} is not a number followed by a unit m, h or d (or s), \
         such as \"5m\", \"1h\" or \"1d\""
    )]
    InvalidSchedulingInterval {
        /// The value given.
        value: String,
    },
    /// `schedulingInterval` is zero or too long.
    #[error(
        "schedulingInterval {value:?} is out of range; it must be more than zero and at \
         most 365d"
    )]
    SchedulingIntervalOutOfRange {
        /// The value given.
        value: String,
    },
    /// `schedulingStartTime` cannot be parsed.
    #[error(
        "schedulingStartTime {value:?} is not a valid ISO 8601 start time ({reason}); \
         accepted are {START_TIME_FORMS}, with an optional offset (Z, +HH:MM), UTC if none"
    )]
    InvalidSchedulingStartTime {
        /// The value given.
        value: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// `schedulingStartTime` without `schedulingInterval`.
    #[error(
        "schedulingStartTime {value:?} is set but schedulingInterval is not; a start time \
         is only supported together with an interval"
    )]
    StartTimeWithoutInterval {
        /// The start time given.
        value: String,
    },
    /// `flattenMode` has an unknown value.
    #[error(
        "flattenMode {value:?} is not supported; accepted values are \"never\" (the default) \
         and \"force\""
    )]
    InvalidFlattenMode {
        /// The value given.
        value: String,
    },
    /// `replicaClones` has an unknown value.
    #[error(
        "replicaClones {value:?} is not supported; accepted values are \"linked\" (the \
         default) and \"flatten\""
    )]
    InvalidReplicaClones {
        /// The value given.
        value: String,
    },
    /// `force` is not a boolean.
    #[error(
        "force {value:?} is not a boolean; accepted values are true and false (also 1/0, \
         t/f, True/False, TRUE/FALSE)"
    )]
    InvalidForce {
        /// The value given.
        value: String,
    },
}

#[cfg(test)]
mod size_tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("64M").unwrap(), 64 << 20);
        assert_eq!(parse_size("64MiB").unwrap(), 64 << 20);
        assert_eq!(parse_size("1G").unwrap(), 1 << 30);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("M").is_err());
        assert!(parse_size("99999999999999999999T").is_err());
    }

    #[test]
    fn bandwidth_limit_parameter() {
        let m = HashMap::from([(BANDWIDTH_LIMIT_KEY.to_string(), "50M".to_string())]);
        assert_eq!(
            ReplicationParams::parse(&m).unwrap().bandwidth_limit,
            Some(50 << 20)
        );
        let m = HashMap::from([(BANDWIDTH_LIMIT_KEY.to_string(), "fast".to_string())]);
        assert!(matches!(
            ReplicationParams::parse(&m),
            Err(ParamError::InvalidBandwidthLimit { .. })
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use proptest::prelude::*;

    fn params(pairs: &[(&str, &str)]) -> Result<ReplicationParams, ParamError> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        ReplicationParams::parse(&m)
    }

    fn utc_at(y: i32, mo: u32, d: u32, h: u32, mi: u32, s: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, mo, d, h, mi, s).single().unwrap()
    }

    fn off(secs: i32) -> FixedOffset {
        FixedOffset::east_opt(secs).unwrap()
    }

    fn daily(h: u32, m: u32, s: u32, offset_secs: i32) -> StartTime {
        StartTime::Daily {
            time: NaiveTime::from_hms_opt(h, m, s).unwrap(),
            offset: off(offset_secs),
        }
    }

    #[test]
    fn defaults() {
        let p = params(&[]).unwrap();
        assert_eq!(p, ReplicationParams::default());
        assert_eq!(p.mirroring_mode, MirroringMode::Snapshot);
        assert_eq!(p.flatten_mode, FlattenMode::Never);
        assert_eq!(p.scheduling_interval, None);
        assert!(!p.force);
    }

    #[test]
    fn full_set() {
        let p = params(&[
            ("mirroringMode", "snapshot"),
            ("schedulingInterval", "1h"),
            ("schedulingStartTime", "14:00:00-05:00"),
            ("flattenMode", "force"),
            ("force", "True"),
        ])
        .unwrap();
        assert_eq!(p.scheduling_interval, Some(Duration::from_secs(3600)));
        assert_eq!(p.scheduling_start_time, Some(daily(14, 0, 0, -5 * 3600)));
        assert_eq!(p.flatten_mode, FlattenMode::Force);
        assert!(p.force);
        assert!(p.ignored.is_empty());
    }

    #[test]
    fn mirroring_mode() {
        let p = params(&[("mirroringMode", "journal")]).unwrap();
        assert_eq!(p.mirroring_mode, MirroringMode::Journal);
        for bad in ["", "Snapshot", "image", "snapshot "] {
            assert_eq!(
                params(&[("mirroringMode", bad)]).unwrap_err(),
                ParamError::InvalidMirroringMode { value: bad.into() }
            );
        }
        assert_eq!(
            params(&[("mirroringMode", "pool")])
                .unwrap_err()
                .to_string(),
            "mirroringMode \"pool\" is not supported; accepted values are \"snapshot\" (the \
             default) and \"journal\""
        );
    }

    #[test]
    fn journal_mode_ignores_scheduling_keys() {
        let p = params(&[
            ("mirroringMode", "journal"),
            ("schedulingInterval", "bogus"),
            ("schedulingStartTime", "bogus"),
        ])
        .unwrap();
        assert_eq!(p.scheduling_interval, None);
        assert_eq!(p.scheduling_start_time, None);
        assert_eq!(p.ignored, vec!["schedulingInterval", "schedulingStartTime"]);
    }

    #[test]
    fn intervals() {
        let ok = |s: &str| parse_interval(s).unwrap().as_secs();
        assert_eq!(ok("1m"), 60);
        assert_eq!(ok("90m"), 5_400);
        assert_eq!(ok("12h"), 43_200);
        assert_eq!(ok("1d"), 86_400);
        assert_eq!(ok("30s"), 30);
        assert_eq!(ok("007m"), 420);
        assert_eq!(ok("365d"), 365 * 86_400);
        assert_eq!(ok("8760h"), 365 * 86_400);

        for bad in [
            "1", "h", "1H", "1w", "-1h", "+1h", "1.5h", " 1h", "1h ", "1hh", "1 h", "1é", "é",
        ] {
            assert_eq!(
                parse_interval(bad).unwrap_err(),
                ParamError::InvalidSchedulingInterval { value: bad.into() },
                "{bad:?}"
            );
        }
        for bad in [
            "0m",
            "0d",
            "366d",
            "8761h",
            "99999999999999999999999d",
            "18446744073709551615d",
        ] {
            assert_eq!(
                parse_interval(bad).unwrap_err(),
                ParamError::SchedulingIntervalOutOfRange { value: bad.into() },
                "{bad:?}"
            );
        }
        assert_eq!(
            params(&[("schedulingInterval", "")]).unwrap_err(),
            ParamError::EmptySchedulingInterval
        );
        assert_eq!(
            params(&[("schedulingInterval", "1w")])
                .unwrap_err()
                .to_string(),
            "schedulingInterval \"1w\" is not a number followed by a unit m, h or d (or s), \
             such as \"5m\", \"1h\" or \"1d\""
        );
    }

    #[test]
    fn interval_formatting() {
        let f = |s: u64| format_interval(Duration::from_secs(s));
        assert_eq!(f(60), "1m");
        assert_eq!(f(5_400), "90m");
        assert_eq!(f(7_200), "2h");
        assert_eq!(f(172_800), "2d");
        assert_eq!(f(90), "90s");
        assert_eq!(f(0), "0s");
        for s in ["1m", "90m", "2h", "25h", "3d", "45s"] {
            assert_eq!(format_interval(parse_interval(s).unwrap()), s);
        }
    }

    #[test]
    fn start_time_of_day_forms() {
        let p = |s: &str| StartTime::parse(s).unwrap();
        assert_eq!(p("14:00"), daily(14, 0, 0, 0));
        assert_eq!(p("14:00:00"), daily(14, 0, 0, 0));
        assert_eq!(p("14:00Z"), daily(14, 0, 0, 0));
        assert_eq!(p("14:00:30z"), daily(14, 0, 30, 0));
        assert_eq!(p("14:00:00-05:00"), daily(14, 0, 0, -18_000));
        assert_eq!(p("14:00:00+0530"), daily(14, 0, 0, 19_800));
        assert_eq!(p("14:00+02"), daily(14, 0, 0, 7_200));
        assert_eq!(p("00:00"), daily(0, 0, 0, 0));
        assert_eq!(p("23:59:59"), daily(23, 59, 59, 0));
        assert_eq!(
            p("14:00:00.250"),
            StartTime::Daily {
                time: NaiveTime::from_hms_milli_opt(14, 0, 0, 250).unwrap(),
                offset: off(0)
            }
        );
    }

    #[test]
    fn start_time_date_time_forms() {
        let p = |s: &str| StartTime::parse(s).unwrap();
        let at = |t: DateTime<Utc>, o: i32| StartTime::At(t.with_timezone(&off(o)));
        assert_eq!(
            p("2024-05-01T14:00:00Z"),
            at(utc_at(2024, 5, 1, 14, 0, 0), 0)
        );
        assert_eq!(
            p("2024-05-01T14:00:00"),
            at(utc_at(2024, 5, 1, 14, 0, 0), 0)
        );
        assert_eq!(p("2024-05-01T14:00"), at(utc_at(2024, 5, 1, 14, 0, 0), 0));
        assert_eq!(p("2024-05-01 14:00"), at(utc_at(2024, 5, 1, 14, 0, 0), 0));
        assert_eq!(p("2024-05-01t14:00Z"), at(utc_at(2024, 5, 1, 14, 0, 0), 0));
        let minus5 = p("2024-05-01T14:00:00-05:00");
        assert_eq!(minus5, at(utc_at(2024, 5, 1, 19, 0, 0), -18_000));
        assert_eq!(minus5.anchor(), utc_at(2024, 5, 1, 19, 0, 0));
        assert_eq!(minus5.to_string(), "2024-05-01T14:00:00-05:00");
        assert_eq!(p("2024-05-01"), at(utc_at(2024, 5, 1, 0, 0, 0), 0));
        assert_eq!(
            p("2024-02-29T00:00:00+14:00").anchor(),
            utc_at(2024, 2, 28, 10, 0, 0)
        );
    }

    #[test]
    fn start_time_errors() {
        let reason = |s: &str| match StartTime::parse(s).unwrap_err() {
            ParamError::InvalidSchedulingStartTime { value, reason } => {
                assert_eq!(value, s);
                reason
            }
            other => panic!("{other}"),
        };
        const RANGE: &str = "a field is out of range";
        const FORMS: &str = "it is not in one of the accepted forms";
        for (text, want) in [
            ("24:00", RANGE),
            ("14:60", RANGE),
            ("14:00:60", "the second must be 00 to 59"),
            ("14:00:00+25:00", "the UTC offset is out of range"),
            ("2024-02-30T14:00", "the date does not exist"),
            ("1400", FORMS),
            ("2pm", FORMS),
            ("14:00:00+05:0", FORMS),
            ("14:00 UTC", FORMS),
            ("14:00:00Zx", FORMS),
            ("14:00:00.", FORMS),
            ("2024-05-01X14:00", FORMS),
            ("2024-05-01T", FORMS),
            ("", "it is empty"),
            ("１４:00", "it contains a character that is not ASCII"),
        ] {
            assert_eq!(reason(text), want, "{text:?}");
        }
        let msg = params(&[
            ("schedulingInterval", "1h"),
            ("schedulingStartTime", "25:00"),
        ])
        .unwrap_err()
        .to_string();
        assert!(
            msg.starts_with(
                "schedulingStartTime \"25:00\" is not a valid ISO 8601 start time (a field is \
                 out of range); accepted are a time of day such as \"14:00\""
            ),
            "{msg}"
        );
    }

    #[test]
    fn start_time_needs_interval() {
        assert_eq!(
            params(&[("schedulingStartTime", "14:00")]).unwrap_err(),
            ParamError::StartTimeWithoutInterval {
                value: "14:00".into()
            }
        );
        // An empty start time is absent, as in ceph-csi.
        let p = params(&[("schedulingStartTime", "")]).unwrap();
        assert_eq!(p.scheduling_start_time, None);
        let p = params(&[("schedulingInterval", "5m"), ("schedulingStartTime", "")]).unwrap();
        assert_eq!(p.scheduling_start_time, None);
    }

    #[test]
    fn replica_clones_linked_by_default_flatten_by_choice() {
        assert!(!params(&[]).unwrap().flatten_replica);
        assert!(
            !params(&[("replicaClones", "linked")])
                .unwrap()
                .flatten_replica
        );
        let p = params(&[("replicaClones", "flatten")]).unwrap();
        assert!(p.flatten_replica);
        // Kept in the canonical map (stored with the record), and only then.
        assert_eq!(
            ReplicationParams::parse(&p.to_map().into_iter().collect()).unwrap(),
            ReplicationParams {
                ignored: Vec::new(),
                ..p
            }
        );
        assert!(!params(&[]).unwrap().to_map().contains_key("replicaClones"));
        assert_eq!(
            params(&[("replicaClones", "flat")]).unwrap_err(),
            ParamError::InvalidReplicaClones {
                value: "flat".into()
            }
        );
    }

    #[test]
    fn flatten_and_force() {
        assert_eq!(
            params(&[("flattenMode", "never")]).unwrap().flatten_mode,
            FlattenMode::Never
        );
        assert_eq!(
            params(&[("flattenMode", "always")])
                .unwrap_err()
                .to_string(),
            "flattenMode \"always\" is not supported; accepted values are \"never\" (the \
             default) and \"force\""
        );
        for (v, want) in [
            ("1", true),
            ("t", true),
            ("TRUE", true),
            ("0", false),
            ("False", false),
        ] {
            assert_eq!(params(&[("force", v)]).unwrap().force, want, "{v}");
        }
        for bad in ["", "yes", "tRUE", "2"] {
            assert_eq!(
                params(&[("force", bad)]).unwrap_err(),
                ParamError::InvalidForce { value: bad.into() }
            );
        }
    }

    #[test]
    fn unknown_keys_are_returned_sorted() {
        let p = params(&[
            ("csi.storage.k8s.io/pvc/name", "x"),
            ("replicationScheduleInterval", "1h"),
            ("mirroringMode", "snapshot"),
            ("clusterID", "rook-ceph"),
        ])
        .unwrap();
        assert_eq!(
            p.ignored,
            vec![
                "clusterID",
                "csi.storage.k8s.io/pvc/name",
                "replicationScheduleInterval"
            ]
        );
    }

    #[test]
    fn map_and_serde_round_trip() {
        let p = params(&[
            ("mirroringMode", "snapshot"),
            ("schedulingInterval", "120m"),
            ("schedulingStartTime", "2024-05-01T14:00:00.5-05:00"),
            ("flattenMode", "force"),
            ("extra", "1"),
        ])
        .unwrap();
        let m = p.to_map();
        assert_eq!(m["schedulingInterval"], "2h");
        assert_eq!(m["schedulingStartTime"], "2024-05-01T14:00:00.500-05:00");
        assert_eq!(m["force"], "false");
        assert!(!m.contains_key("extra"));
        let back = ReplicationParams::try_from(m).unwrap();
        assert_eq!(
            back,
            ReplicationParams {
                ignored: vec![],
                ..p.clone()
            }
        );

        let json = serde_json::to_string(&p).unwrap();
        assert_eq!(
            json,
            r#"{"flattenMode":"force","force":"false","mirroringMode":"snapshot","schedulingInterval":"2h","schedulingStartTime":"2024-05-01T14:00:00.500-05:00"}"#
        );
        let back: ReplicationParams = serde_json::from_str(&json).unwrap();
        assert_eq!(back.to_map(), p.to_map());
        assert!(serde_json::from_str::<ReplicationParams>(r#"{"mirroringMode":"x"}"#).is_err());

        let d = daily(14, 0, 0, -18_000);
        assert_eq!(serde_json::to_string(&d).unwrap(), r#""14:00:00-05:00""#);
        assert_eq!(
            serde_json::from_str::<StartTime>(r#""14:00:00-05:00""#).unwrap(),
            d
        );
        assert_eq!(daily(9, 30, 0, 0).to_string(), "09:30:00Z");
    }

    #[test]
    fn next_for_absolute_start() {
        let hour = Duration::from_secs(3600);
        let start = StartTime::parse("2024-05-01T14:00:00-05:00").unwrap(); // 19:00Z
        // Start in the future: wait for it.
        assert_eq!(
            start.next_at_or_after(utc_at(2024, 5, 1, 10, 0, 0), hour),
            utc_at(2024, 5, 1, 19, 0, 0)
        );
        // Exactly at the start.
        assert_eq!(
            start.next_at_or_after(utc_at(2024, 5, 1, 19, 0, 0), hour),
            utc_at(2024, 5, 1, 19, 0, 0)
        );
        // On the grid: stays.
        assert_eq!(
            start.next_at_or_after(utc_at(2024, 5, 2, 3, 0, 0), hour),
            utc_at(2024, 5, 2, 3, 0, 0)
        );
        // Between grid points: the next one.
        assert_eq!(
            start.next_at_or_after(utc_at(2024, 5, 2, 3, 0, 1), hour),
            utc_at(2024, 5, 2, 4, 0, 0)
        );
        // An interval that does not divide a day keeps the grid from the start.
        let seven = Duration::from_secs(7 * 3600);
        assert_eq!(
            start.next_at_or_after(utc_at(2024, 5, 2, 3, 0, 0), seven),
            utc_at(2024, 5, 2, 9, 0, 0)
        );
        // Sub-second precision in now.
        let now = utc_at(2024, 5, 2, 2, 59, 59) + chrono::Duration::milliseconds(999);
        assert_eq!(
            start.next_at_or_after(now, hour),
            utc_at(2024, 5, 2, 3, 0, 0)
        );
    }

    #[test]
    fn next_for_time_of_day() {
        let day = Duration::from_secs(86_400);
        let hour = Duration::from_secs(3600);
        let t = StartTime::parse("14:00:00-05:00").unwrap(); // 19:00Z daily
        assert_eq!(
            t.next_at_or_after(utc_at(2024, 5, 1, 10, 0, 0), day),
            utc_at(2024, 5, 1, 19, 0, 0)
        );
        assert_eq!(
            t.next_at_or_after(utc_at(2024, 5, 1, 19, 0, 0), day),
            utc_at(2024, 5, 1, 19, 0, 0)
        );
        assert_eq!(
            t.next_at_or_after(utc_at(2024, 5, 1, 19, 0, 1), day),
            utc_at(2024, 5, 2, 19, 0, 0)
        );
        assert_eq!(
            t.next_at_or_after(utc_at(2024, 5, 1, 20, 30, 0), hour),
            utc_at(2024, 5, 1, 21, 0, 0)
        );
        // Positive offset crossing midnight UTC: 01:30+03:00 is 22:30Z.
        let t = StartTime::parse("01:30+03:00").unwrap();
        assert_eq!(
            t.next_at_or_after(utc_at(2024, 1, 1, 0, 0, 0), day),
            utc_at(2024, 1, 1, 22, 30, 0)
        );
        // 6h from 14:00Z: 02:00, 08:00, 14:00, 20:00.
        let t = StartTime::parse("14:00").unwrap();
        assert_eq!(
            t.next_at_or_after(utc_at(2024, 1, 1, 8, 0, 1), Duration::from_secs(6 * 3600)),
            utc_at(2024, 1, 1, 14, 0, 0)
        );
        assert_eq!(
            t.next_at_or_after(utc_at(2024, 1, 1, 0, 0, 0), Duration::from_secs(6 * 3600)),
            utc_at(2024, 1, 1, 2, 0, 0)
        );
    }

    #[test]
    fn zero_interval_does_not_divide_by_zero() {
        let t = StartTime::parse("14:00").unwrap();
        let now = utc_at(2024, 1, 1, 0, 0, 0);
        assert_eq!(t.next_at_or_after(now, Duration::ZERO), now);
        let a = StartTime::parse("2020-01-01T00:00Z").unwrap();
        assert_eq!(a.next_at_or_after(now, Duration::ZERO), now);
    }

    /// `schedulingStartTime` texts in every accepted shape.
    fn start_time_text() -> impl Strategy<Value = String> {
        let offset = prop::sample::select(vec![
            "", "Z", "+00:00", "-05:00", "+05:30", "+14:00", "-1100", "+09",
        ]);
        (
            (0..24u32, 0..60u32, 0..60u32),
            prop::option::of((1990..2050i32, 1..=12u32, 1..=28u32)),
            offset,
        )
            .prop_map(|((h, m, s), date, off)| match date {
                None => format!("{h:02}:{m:02}:{s:02}{off}"),
                Some((y, mo, d)) => format!("{y:04}-{mo:02}-{d:02}T{h:02}:{m:02}:{s:02}{off}"),
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2_000))]

        #[test]
        fn property_start_time_round_trips_and_next_is_on_grid(
            text in start_time_text(),
            interval_minutes in 1..=3 * 1440u64,
            now_secs in 946_684_800..2_946_684_800i64,
            now_nanos in 0..1_000_000_000u32,
        ) {
            let st = StartTime::parse(&text).unwrap();
            let again = StartTime::parse(&st.to_string()).unwrap();
            prop_assert_eq!(again, st, "{}", text);
            prop_assert_eq!(again.to_string(), st.to_string());

            let interval = Duration::from_secs(60 * interval_minutes);
            let now = DateTime::from_timestamp(now_secs, now_nanos).unwrap();
            let next = st.next_at_or_after(now, interval);
            let step = i128::from(interval.as_secs()) * 1_000_000_000;
            prop_assert!(next >= now, "{}", text);
            prop_assert_eq!((nanos(next) - nanos(st.anchor())).rem_euclid(step), 0, "{}", text);
            if next > st.anchor() {
                prop_assert!(nanos(next) - nanos(now) < step, "{}: not the first", text);
            } else {
                prop_assert!(matches!(st, StartTime::At(_)) && next == st.anchor());
            }
        }

        #[test]
        fn property_parse_never_panics(
            pieces in prop::collection::vec(prop::sample::select(vec![
                "1", "4", "9", "0", ":", "-", "+", "T", "Z", ".", "2024-", " ", "é", "h", "d",
            ]), 0..24),
        ) {
            let s = pieces.concat();
            let _ = parse_interval(&s);
            if let Ok(st) = StartTime::parse(&s) {
                prop_assert_eq!(StartTime::parse(&st.to_string()).unwrap(), st);
            }
        }
    }

    #[test]
    fn mode_display() {
        assert_eq!(MirroringMode::Journal.to_string(), "journal");
        assert_eq!(FlattenMode::Force.to_string(), "force");
        assert_eq!(
            StartTime::Daily {
                time: NaiveTime::from_hms_nano_opt(1, 2, 3, 4).unwrap(),
                offset: off(-3600)
            }
            .to_string(),
            "01:02:03.000000004-01:00"
        );
    }
}
