//! Leader election on a `coordination.k8s.io` Lease, so that only one
//! operator replica reconciles. The holder renews the Lease every few
//! seconds; another replica takes it once it has not been renewed for the
//! lease duration. A leader that cannot renew stops before that happens.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::Client;
use kube::api::{Api, PostParams};

/// Seconds a Lease stays valid after its last renewal.
pub const LEASE_DURATION: Duration = Duration::from_secs(15);
/// How often the holder renews (and a waiting replica retries).
pub const RENEW_EVERY: Duration = Duration::from_secs(3);
/// A holder that could not renew for this long stops leading: well before
/// others may take the Lease over.
pub const RENEW_DEADLINE: Duration = Duration::from_secs(10);

/// Which Lease, and who this replica is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseSettings {
    pub namespace: String,
    pub name: String,
    /// This replica's name in `holderIdentity` (its pod name).
    pub identity: String,
}

/// What a replica may do with a Lease as it stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Claim {
    /// Nobody holds it, or the holder let it expire: take it.
    Take,
    /// This replica holds it: renew it.
    Renew,
    /// Another replica holds it for this long still.
    Wait { holder: String, for_: Duration },
}

/// What `identity` may do with a Lease whose spec is `spec`, at `now`.
pub fn claim(spec: Option<&LeaseSpec>, identity: &str, now: Timestamp) -> Claim {
    let Some(spec) = spec else {
        return Claim::Take;
    };
    let holder = match spec.holder_identity.as_deref() {
        None | Some("") => return Claim::Take,
        Some(holder) if holder == identity => return Claim::Renew,
        Some(holder) => holder,
    };
    let renewed = spec.renew_time.as_ref().or(spec.acquire_time.as_ref());
    let seconds = spec
        .lease_duration_seconds
        .unwrap_or(LEASE_DURATION.as_secs() as i32);
    let Some(renewed) = renewed else {
        return Claim::Take;
    };
    // A nonsensical duration (past the year 9999) is no claim at all.
    let Ok(expires) = renewed
        .0
        .checked_add(SignedDuration::from_secs(i64::from(seconds)))
    else {
        return Claim::Take;
    };
    match Duration::try_from(now.duration_until(expires)) {
        Ok(left) if !left.is_zero() => Claim::Wait {
            holder: holder.to_string(),
            for_: left,
        },
        _ => Claim::Take,
    }
}

/// Why this replica stopped leading.
#[derive(Debug, thiserror::Error)]
pub enum LeaseLost {
    #[error("another replica took the Lease {0}")]
    TakenOver(String),
    #[error("the Lease {lease} was not renewed for {deadline:?}: {error}")]
    NotRenewed {
        lease: String,
        deadline: Duration,
        error: kube::Error,
    },
}

/// Takes and holds one Lease.
pub struct LeaderElector {
    api: Api<Lease>,
    settings: LeaseSettings,
}

impl LeaderElector {
    pub fn new(client: Client, settings: LeaseSettings) -> Self {
        Self {
            api: Api::namespaced(client, &settings.namespace),
            settings,
        }
    }

    fn lease_name(&self) -> String {
        format!("{}/{}", self.settings.namespace, self.settings.name)
    }

    /// Waits until this replica holds the Lease.
    pub async fn acquire(&self) {
        let mut waiting_for = None;
        loop {
            match self.try_claim().await {
                Ok(None) => {
                    tracing::info!(lease = %self.lease_name(), identity = %self.settings.identity, "leading");
                    return;
                }
                Ok(Some(holder)) => {
                    if waiting_for.as_ref() != Some(&holder) {
                        tracing::info!(lease = %self.lease_name(), %holder, "another replica leads; waiting");
                        waiting_for = Some(holder);
                    }
                }
                Err(e) => tracing::warn!(lease = %self.lease_name(), "cannot claim the Lease: {e}"),
            }
            tokio::time::sleep(RENEW_EVERY).await;
        }
    }

    /// Renews the Lease until that fails for [`RENEW_DEADLINE`] or another
    /// replica holds it; returns why.
    pub async fn hold(&self) -> LeaseLost {
        let mut renewed = Instant::now();
        loop {
            tokio::time::sleep(RENEW_EVERY).await;
            match self.try_claim().await {
                Ok(None) => renewed = Instant::now(),
                Ok(Some(holder)) => return LeaseLost::TakenOver(holder),
                Err(error) if renewed.elapsed() >= RENEW_DEADLINE => {
                    return LeaseLost::NotRenewed {
                        lease: self.lease_name(),
                        deadline: RENEW_DEADLINE,
                        error,
                    };
                }
                Err(e) => {
                    tracing::warn!(lease = %self.lease_name(), "renewing the Lease failed: {e}")
                }
            }
        }
    }

    /// Gives the Lease up (on shutdown), so that another replica takes
    /// over at once instead of after the lease duration.
    pub async fn release(&self) {
        let Ok(Some(mut lease)) = self.api.get_opt(&self.settings.name).await else {
            return;
        };
        let Some(spec) = lease.spec.as_mut() else {
            return;
        };
        if spec.holder_identity.as_deref() != Some(self.settings.identity.as_str()) {
            return;
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(MicroTime(Timestamp::now()));
        let name = self.settings.name.clone();
        match self
            .api
            .replace(&name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => tracing::info!(lease = %self.lease_name(), "released"),
            Err(e) => tracing::warn!(lease = %self.lease_name(), "releasing the Lease failed: {e}"),
        }
    }

    /// One attempt to take or renew the Lease: `None` when this replica
    /// holds it now, else the holder.
    async fn try_claim(&self) -> Result<Option<String>, kube::Error> {
        let now = Timestamp::now();
        let me = &self.settings.identity;
        let name = &self.settings.name;
        let Some(mut lease) = self.api.get_opt(name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(name.clone()),
                    namespace: Some(self.settings.namespace.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(self.taken(None, now)),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(None),
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(Some("(another replica)".into())),
                Err(e) => Err(e),
            };
        };
        let spec = match claim(lease.spec.as_ref(), me, now) {
            Claim::Wait { holder, .. } => return Ok(Some(holder)),
            Claim::Take => self.taken(lease.spec.as_ref(), now),
            Claim::Renew => LeaseSpec {
                renew_time: Some(MicroTime(now)),
                lease_duration_seconds: Some(LEASE_DURATION.as_secs() as i32),
                ..lease.spec.clone().unwrap_or_default()
            },
        };
        lease.spec = Some(spec);
        // The resourceVersion from the read makes this fail if another
        // replica wrote in between.
        match self.api.replace(name, &PostParams::default(), &lease).await {
            Ok(_) => Ok(None),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(Some("(another replica)".into())),
            Err(e) => Err(e),
        }
    }

    fn taken(&self, previous: Option<&LeaseSpec>, now: Timestamp) -> LeaseSpec {
        let transitions = previous.and_then(|s| s.lease_transitions).unwrap_or(0);
        LeaseSpec {
            holder_identity: Some(self.settings.identity.clone()),
            lease_duration_seconds: Some(LEASE_DURATION.as_secs() as i32),
            acquire_time: Some(MicroTime(now)),
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(if previous.is_some() {
                transitions + 1
            } else {
                0
            }),
            ..LeaseSpec::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: i64) -> Timestamp {
        Timestamp::from_second(1_700_000_000 + seconds).unwrap()
    }

    fn held_by(holder: &str, renewed: i64) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(holder.into()),
            lease_duration_seconds: Some(15),
            renew_time: Some(MicroTime(at(renewed))),
            ..LeaseSpec::default()
        }
    }

    #[test]
    fn a_free_lease_is_taken() {
        assert_eq!(claim(None, "op-a", at(0)), Claim::Take);
        let released = LeaseSpec {
            holder_identity: None,
            ..held_by("op-b", 0)
        };
        assert_eq!(claim(Some(&released), "op-a", at(0)), Claim::Take);
    }

    #[test]
    fn the_holder_renews() {
        assert_eq!(
            claim(Some(&held_by("op-a", 0)), "op-a", at(100)),
            Claim::Renew
        );
    }

    #[test]
    fn another_holder_is_waited_for_until_the_lease_expires() {
        let lease = held_by("op-b", 0);
        assert_eq!(
            claim(Some(&lease), "op-a", at(5)),
            Claim::Wait {
                holder: "op-b".into(),
                for_: Duration::from_secs(10)
            }
        );
        assert_eq!(claim(Some(&lease), "op-a", at(15)), Claim::Take);
        assert_eq!(claim(Some(&lease), "op-a", at(60)), Claim::Take);
    }

    mod api {
        //! `try_claim` and `release` against a scripted API server.

        use super::*;
        use http::{Method, Request, Response, StatusCode};
        use kube::client::Body;
        use serde_json::{Value, json};
        use tower_test::mock::Handle;

        type Server = Handle<Request<Body>, Response<Body>>;
        const LEASE: &str = "/apis/coordination.k8s.io/v1/namespaces/shardserve/leases";

        fn elector() -> (LeaderElector, Server) {
            let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
            let settings = LeaseSettings {
                namespace: "shardserve".into(),
                name: "shardserve-operator".into(),
                identity: "op-a".into(),
            };
            (
                LeaderElector::new(Client::new(service, "default"), settings),
                handle,
            )
        }

        /// Expects `method path`; answers `status` and `body`; returns the request's body.
        async fn answer(
            server: &mut Server,
            method: Method,
            path: &str,
            status: StatusCode,
            body: Value,
        ) -> Value {
            let (request, respond) = server.next_request().await.expect("a request");
            assert_eq!((request.method(), request.uri().path()), (&method, path));
            let bytes = request.into_body().collect_bytes().await.unwrap();
            let sent = if bytes.is_empty() {
                Value::Null
            } else {
                serde_json::from_slice(&bytes).unwrap()
            };
            let body = if body.is_null() { sent.clone() } else { body };
            respond.send_response(
                Response::builder()
                    .status(status)
                    .body(Body::from(serde_json::to_vec(&body).unwrap()))
                    .unwrap(),
            );
            sent
        }

        fn not_found() -> Value {
            json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 404, "reason": "NotFound", "message": "not found"})
        }

        fn lease(holder: &str, renewed: Timestamp) -> Value {
            json!({
                "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": "shardserve-operator", "namespace": "shardserve", "resourceVersion": "41"},
                "spec": {
                    "holderIdentity": holder, "leaseDurationSeconds": 15, "leaseTransitions": 2,
                    "renewTime": MicroTime(renewed)
                }
            })
        }

        #[tokio::test]
        async fn a_missing_lease_is_created_held_by_this_replica() {
            let (elector, mut server) = elector();
            let script = tokio::spawn(async move {
                let path = format!("{LEASE}/shardserve-operator");
                answer(
                    &mut server,
                    Method::GET,
                    &path,
                    StatusCode::NOT_FOUND,
                    not_found(),
                )
                .await;
                answer(
                    &mut server,
                    Method::POST,
                    LEASE,
                    StatusCode::CREATED,
                    Value::Null,
                )
                .await
            });
            assert_eq!(elector.try_claim().await.unwrap(), None);
            let created = script.await.unwrap();
            assert_eq!(created["spec"]["holderIdentity"], "op-a");
            assert_eq!(created["spec"]["leaseDurationSeconds"], 15);
            assert_eq!(created["spec"]["leaseTransitions"], 0);
        }

        #[tokio::test]
        async fn a_lease_another_replica_renews_is_left_alone() {
            let (elector, mut server) = elector();
            let script = tokio::spawn(async move {
                let path = format!("{LEASE}/shardserve-operator");
                let held = lease("op-b", Timestamp::now());
                answer(&mut server, Method::GET, &path, StatusCode::OK, held).await;
                server
            });
            assert_eq!(elector.try_claim().await.unwrap(), Some("op-b".into()));
            let mut server = script.await.unwrap();
            drop(elector);
            assert!(server.next_request().await.is_none(), "nothing written");
        }

        #[tokio::test]
        async fn an_expired_lease_is_taken_over_with_its_resource_version() {
            let (elector, mut server) = elector();
            let script = tokio::spawn(async move {
                let path = format!("{LEASE}/shardserve-operator");
                let expired = lease("op-b", Timestamp::now() - SignedDuration::from_secs(60));
                answer(&mut server, Method::GET, &path, StatusCode::OK, expired).await;
                answer(&mut server, Method::PUT, &path, StatusCode::OK, Value::Null).await
            });
            assert_eq!(elector.try_claim().await.unwrap(), None);
            let taken = script.await.unwrap();
            assert_eq!(taken["metadata"]["resourceVersion"], "41");
            assert_eq!(taken["spec"]["holderIdentity"], "op-a");
            assert_eq!(taken["spec"]["leaseTransitions"], 3);
        }

        #[tokio::test]
        async fn release_hands_the_lease_over() {
            let (elector, mut server) = elector();
            let script = tokio::spawn(async move {
                let path = format!("{LEASE}/shardserve-operator");
                answer(
                    &mut server,
                    Method::GET,
                    &path,
                    StatusCode::OK,
                    lease("op-a", Timestamp::now()),
                )
                .await;
                answer(&mut server, Method::PUT, &path, StatusCode::OK, Value::Null).await
            });
            elector.release().await;
            let released = script.await.unwrap();
            assert!(released["spec"]["holderIdentity"].is_null());
            assert_eq!(released["spec"]["leaseDurationSeconds"], 1);
        }
    }
}
