//! Leader election through a `coordination.k8s.io/v1` Lease, as client-go's leaderelection does:
//! the holder renews the Lease every few seconds; another replica takes it over once it has not
//! been renewed for its whole duration. Every write carries the Lease's `resourceVersion`, so of
//! two replicas racing for an expired Lease exactly one wins (the other gets a conflict).

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::Api;
use kube::api::PostParams;

/// What a replica does about the Lease, given what it holds now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// No Lease yet: create it, holding it.
    Create,
    /// Ours: renew it.
    Renew,
    /// Nobody's, or its holder stopped renewing it: take it.
    TakeOver,
    /// Someone else holds it: wait.
    Follow,
}

/// Decides, purely, what `me` should do at `now` about `lease`.
pub fn decide(lease: Option<&LeaseSpec>, me: &str, now: Timestamp, default_duration: Duration) -> Decision {
    let Some(spec) = lease else { return Decision::Create };
    let holder = spec.holder_identity.as_deref().unwrap_or_default();
    if holder == me {
        return Decision::Renew;
    }
    if holder.is_empty() {
        return Decision::TakeOver;
    }
    let duration = spec.lease_duration_seconds.map_or(default_duration, |s| Duration::from_secs(s.max(0) as u64));
    let renewed = spec.renew_time.as_ref().map(|t| t.0);
    match renewed {
        Some(at) if at + SignedDuration::try_from(duration).unwrap_or(SignedDuration::ZERO) > now => Decision::Follow,
        _ => Decision::TakeOver,
    }
}

/// One replica's side of the election.
pub struct Elector {
    api: Api<Lease>,
    name: String,
    identity: String,
    duration: Duration,
}

#[derive(Debug, thiserror::Error)]
#[error("the leader-election Lease {name}: {source}")]
pub struct LeaseError {
    name: String,
    source: kube::Error,
}

impl Elector {
    /// `identity` is this replica's (its pod name); `duration` how long a Lease holds unrenewed.
    pub fn new(api: Api<Lease>, name: &str, identity: &str, duration: Duration) -> Self {
        Elector { api, name: name.into(), identity: identity.into(), duration }
    }

    /// How often the holder renews (a third of the duration, as client-go does by default).
    pub fn renew_every(&self) -> Duration {
        self.duration / 3
    }

    /// One round: creates, renews or takes over the Lease, or follows. True while this replica
    /// leads. A lost race (a conflict) is not an error: the other replica leads.
    pub async fn step(&self) -> Result<bool, LeaseError> {
        let fail = |source| LeaseError { name: self.name.clone(), source };
        let current = self.api.get_opt(&self.name).await.map_err(fail)?;
        let now = Timestamp::now();
        let spec = current.as_ref().and_then(|l| l.spec.as_ref());
        let decision = decide(spec, &self.identity, now, self.duration);
        let mut lease = current.clone().unwrap_or_else(|| Lease {
            metadata: ObjectMeta { name: Some(self.name.clone()), ..ObjectMeta::default() },
            spec: None,
        });
        let mut next = spec.cloned().unwrap_or_default();
        next.holder_identity = Some(self.identity.clone());
        next.lease_duration_seconds = Some(self.duration.as_secs() as i32);
        next.renew_time = Some(MicroTime(now));
        match decision {
            Decision::Follow => return Ok(false),
            Decision::Renew => {}
            Decision::Create | Decision::TakeOver => {
                next.acquire_time = Some(MicroTime(now));
                if decision == Decision::TakeOver {
                    next.lease_transitions = Some(next.lease_transitions.unwrap_or(0) + 1);
                    tracing::info!(lease = %self.name, previous = ?spec.and_then(|s| s.holder_identity.clone()), "taking over leadership");
                }
            }
        }
        lease.spec = Some(next);
        let written = match decision {
            Decision::Create => self.api.create(&PostParams::default(), &lease).await,
            _ => self.api.replace(&self.name, &PostParams::default(), &lease).await,
        };
        match written {
            Ok(_) => Ok(true),
            // Another replica wrote first (created it, or took it over): it leads.
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(fail(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held_by(who: &str, renewed_secs_ago: i64) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(who.into()),
            lease_duration_seconds: Some(15),
            renew_time: Some(MicroTime(Timestamp::now() - SignedDuration::from_secs(renewed_secs_ago))),
            ..LeaseSpec::default()
        }
    }

    #[test]
    fn a_lease_is_created_renewed_followed_or_taken_over() {
        let now = Timestamp::now();
        let d = Duration::from_secs(15);
        assert_eq!(decide(None, "a", now, d), Decision::Create);
        assert_eq!(decide(Some(&held_by("a", 100)), "a", now, d), Decision::Renew);
        assert_eq!(decide(Some(&held_by("b", 5)), "a", now, d), Decision::Follow);
        assert_eq!(decide(Some(&held_by("b", 16)), "a", now, d), Decision::TakeOver);
        assert_eq!(decide(Some(&LeaseSpec::default()), "a", now, d), Decision::TakeOver);
        let never_renewed = LeaseSpec { holder_identity: Some("b".into()), ..LeaseSpec::default() };
        assert_eq!(decide(Some(&never_renewed), "a", now, d), Decision::TakeOver);
    }
}
