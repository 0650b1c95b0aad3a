//! The leader-election decision of `serve --watch-pvs`, on a
//! `coordination.k8s.io/v1` Lease: whoever holds an unexpired Lease is the
//! leader; a candidate takes a free or expired Lease over, and the leader
//! renews it. The Kubernetes API's optimistic concurrency (a `replace` with
//! the `resourceVersion` that was read) makes a take-over by two candidates
//! at once safe: one of them gets a conflict. Pure; the API calls are in
//! `super::watch` (built with the `kube` feature).

use std::time::Duration;

use chrono::{DateTime, Utc};

/// What the decision needs from a Lease's spec.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LeaseState {
    /// `spec.holderIdentity`.
    pub holder: Option<String>,
    /// `spec.renewTime`.
    pub renew_time: Option<DateTime<Utc>>,
    /// `spec.leaseDurationSeconds`.
    pub duration: Option<Duration>,
}

/// What a candidate does with the Lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// No Lease exists: create it, holding it.
    Create,
    /// The Lease is free or expired: take it over.
    TakeOver,
    /// We hold it: renew it.
    Renew,
    /// Someone else holds it until `until`: follow.
    Follow {
        /// The holder.
        holder: String,
        /// When its Lease expires unless renewed.
        until: DateTime<Utc>,
    },
}

impl Decision {
    /// Whether acting on the decision makes (or keeps) us the leader.
    pub fn leads(&self) -> bool {
        !matches!(self, Decision::Follow { .. })
    }
}

/// Decides for candidate `me` at `now`; `default_duration` applies when the
/// Lease does not say how long it lasts.
pub fn decide(
    lease: Option<&LeaseState>,
    me: &str,
    now: DateTime<Utc>,
    default_duration: Duration,
) -> Decision {
    let Some(l) = lease else {
        return Decision::Create;
    };
    let holder = match l.holder.as_deref() {
        None | Some("") => return Decision::TakeOver,
        Some(h) if h == me => return Decision::Renew,
        Some(h) => h,
    };
    let Some(renewed) = l.renew_time else {
        return Decision::TakeOver;
    };
    let lasts = chrono::Duration::from_std(l.duration.unwrap_or(default_duration))
        .unwrap_or(chrono::Duration::MAX);
    let until = renewed
        .checked_add_signed(lasts)
        .unwrap_or(DateTime::<Utc>::MAX_UTC);
    if until <= now {
        Decision::TakeOver
    } else {
        Decision::Follow {
            holder: holder.to_owned(),
            until,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(secs: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_700_000_000 + secs, 0).unwrap()
    }

    const D: Duration = Duration::from_secs(15);

    #[test]
    fn decisions() {
        assert_eq!(decide(None, "me", t(0), D), Decision::Create);
        let free = LeaseState::default();
        assert_eq!(decide(Some(&free), "me", t(0), D), Decision::TakeOver);
        let mine = LeaseState {
            holder: Some("me".into()),
            renew_time: Some(t(0)),
            duration: Some(D),
        };
        assert_eq!(decide(Some(&mine), "me", t(100), D), Decision::Renew);
        let theirs = LeaseState {
            holder: Some("other".into()),
            renew_time: Some(t(0)),
            duration: Some(Duration::from_secs(10)),
        };
        let d = decide(Some(&theirs), "me", t(9), D);
        assert_eq!(
            d,
            Decision::Follow {
                holder: "other".into(),
                until: t(10)
            }
        );
        assert!(!d.leads());
        assert_eq!(decide(Some(&theirs), "me", t(10), D), Decision::TakeOver);
        let never_renewed = LeaseState {
            holder: Some("other".into()),
            ..Default::default()
        };
        assert_eq!(
            decide(Some(&never_renewed), "me", t(0), D),
            Decision::TakeOver
        );
        // Without a duration the default applies.
        let no_duration = LeaseState {
            holder: Some("other".into()),
            renew_time: Some(t(0)),
            duration: None,
        };
        assert!(!decide(Some(&no_duration), "me", t(14), D).leads());
        assert!(decide(Some(&no_duration), "me", t(15), D).leads());
    }
}
