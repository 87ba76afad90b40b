//! The backend index: every deployment's backends with their channels,
//! outstanding counts, health and model limits, plus the prefix-affinity map.
//! Discovery feeds it (`update`), the health checker reports into it, and the
//! request paths take leases from it. One lock guards the whole index and is
//! never held across an `.await`.

mod adapters;
mod health;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::Notify;

use shardserve_proto::v1::ModelInfoResponse;
use tonic::transport::{Channel, Endpoint};

pub(crate) use adapters::{AdapterSummary, Target};
pub(crate) use health::{refresh_info, run_health_checks};

use crate::balance::{Candidate, Choice, PrefixLru, choose};
use crate::discovery::Deployment;
use crate::metrics::Metrics;

/// Consecutive failed health checks that eject a backend.
const EJECT_AFTER: u32 = 2;

/// Why no backend could be leased (or a request was held and then given up).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum PickError {
    #[error("the model {0:?} does not exist")]
    UnknownModel(String),
    /// TGI's `adapter_id` or gRPC's `adapter` names an adapter the model's
    /// backends do not serve.
    #[error("model {model:?} serves no LoRA adapter {adapter:?}")]
    UnknownAdapter { model: String, adapter: String },
    /// The request named no model and several are served.
    #[error("model is required: this router serves {0:?}")]
    ModelRequired(Vec<String>),
    /// The model exists but has no backend at all yet (its pods are
    /// starting, or it was scaled to zero).
    #[error(
        "no backend ready for model {0:?}: its workers are starting (or it has none); try again shortly"
    )]
    NoBackends(String),
    #[error("no healthy backend for model {0:?}; try again shortly")]
    NoHealthy(String),
    #[error("model {0:?} is overloaded: every backend's queue is full; retry after 1 s")]
    Overloaded(String),
    /// The model had no routable backend for the whole hold timeout.
    #[error(
        "no backend of model {model:?} became ready within {waited:?} (it is scaled to zero or its workers are starting); retry later"
    )]
    HoldTimeout { model: String, waited: Duration },
    /// The model has as many requests held for a backend as the router holds.
    #[error(
        "model {model:?} has no ready backend and {held} requests already wait for one; retry later"
    )]
    HoldFull { model: String, held: usize },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Health {
    /// Not checked yet: routable, but not counted as ready.
    Unknown,
    Healthy,
    Ejected,
}

struct BackendState {
    id: String,
    uri: String,
    channel: Channel,
    outstanding: usize,
    health: Health,
    failures: u32,
    info: Option<ModelInfoResponse>,
}

#[derive(Default)]
struct DeploymentState {
    backends: Vec<BackendState>,
    /// LoRA adapters discovery says the model has (its manifest's).
    declared: Vec<String>,
    /// Backends discovery no longer lists (a group draining or removed) that still
    /// run requests: never picked, but counted until their last request ends, so
    /// that whoever drains the group sees when it is done.
    leaving: Vec<BackendState>,
}

/// One model's requests: received and not finished, and of those, the ones held
/// while the model has no routable backend. Kept apart from the deployments so that
/// discovery replacing a model's backends does not lose them.
#[derive(Default)]
struct ModelLoad {
    in_flight: usize,
    held: usize,
}

struct State {
    deployments: BTreeMap<String, DeploymentState>,
    /// Leaving backends of models discovery no longer lists at all.
    gone: BTreeMap<String, Vec<BackendState>>,
    load: BTreeMap<String, ModelLoad>,
    affinity: PrefixLru,
}

/// A summary of one deployment, for `/v1/models`, `/api/tags` and `/readyz`.
#[derive(Debug, Clone)]
pub(crate) struct ModelSummary {
    pub model: String,
    pub backends: usize,
    pub healthy: usize,
    /// From the first backend that answered ModelInfo.
    pub info: Option<ModelInfoResponse>,
    /// The LoRA adapters its backends serve, by name.
    pub adapters: Vec<AdapterSummary>,
}

pub(crate) struct Pool {
    state: Mutex<State>,
    metrics: Arc<Metrics>,
    max_queue: usize,
    max_held: usize,
    connect_timeout: Duration,
    /// TLS to the workers, when they serve it.
    backend_tls: Option<shardserve_tls::ClientTls>,
    rotate: AtomicUsize,
    /// Woken when a backend may have become routable (discovery changed, a health
    /// check passed): held requests try again.
    changed: Notify,
}

/// The pool's limits, from the router's configuration.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PoolLimits {
    pub max_queue_per_backend: usize,
    pub max_held_per_model: usize,
    pub connect_timeout: Duration,
    pub affinity_capacity: usize,
}

/// A request counted in its model's in-flight requests until dropped.
pub(crate) struct InFlight {
    pool: Arc<Pool>,
    model: String,
}

/// A request counted as held for a backend of its model until dropped.
pub(crate) struct Held {
    pool: Arc<Pool>,
    model: String,
}

/// One request's claim on a backend; dropping it ends the claim.
pub(crate) struct Lease {
    pool: Arc<Pool>,
    pub model: String,
    pub backend: String,
    pub channel: Channel,
}

impl Pool {
    pub(crate) fn new(
        metrics: Arc<Metrics>,
        limits: PoolLimits,
        backend_tls: Option<shardserve_tls::ClientTls>,
    ) -> Self {
        Self {
            state: Mutex::new(State {
                deployments: BTreeMap::new(),
                gone: BTreeMap::new(),
                load: BTreeMap::new(),
                affinity: PrefixLru::new(limits.affinity_capacity),
            }),
            metrics,
            max_queue: limits.max_queue_per_backend.max(1),
            max_held: limits.max_held_per_model,
            connect_timeout: limits.connect_timeout,
            backend_tls,
            rotate: AtomicUsize::new(0),
            changed: Notify::new(),
        }
    }

    /// Counts a request of `model` in flight until the guard is dropped.
    pub(crate) fn enter(self: &Arc<Self>, model: &str) -> InFlight {
        let mut state = self.lock();
        let load = state.load.entry(model.to_string()).or_default();
        load.in_flight += 1;
        self.publish_load(model, load);
        InFlight {
            pool: Arc::clone(self),
            model: model.to_string(),
        }
    }

    /// Counts a request of `model` as held for a backend, unless the model already
    /// holds as many as the router allows.
    pub(crate) fn hold(self: &Arc<Self>, model: &str) -> Result<Held, PickError> {
        let mut state = self.lock();
        let load = state.load.entry(model.to_string()).or_default();
        if load.held >= self.max_held {
            return Err(PickError::HoldFull {
                model: model.to_string(),
                held: load.held,
            });
        }
        load.held += 1;
        self.publish_load(model, load);
        Ok(Held {
            pool: Arc::clone(self),
            model: model.to_string(),
        })
    }

    /// Resolves when a backend may have become routable; make it (and `enable` it)
    /// before trying to lease, so that no wake-up falls between the two.
    pub(crate) fn changed(&self) -> tokio::sync::futures::Notified<'_> {
        self.changed.notified()
    }

    fn leave(&self, model: &str, held: bool) {
        let mut state = self.lock();
        let Some(load) = state.load.get_mut(model) else {
            return;
        };
        if held {
            load.held = load.held.saturating_sub(1);
        } else {
            load.in_flight = load.in_flight.saturating_sub(1);
        }
        self.publish_load(model, load);
        if load.in_flight == 0 && load.held == 0 {
            state.load.remove(model);
        }
    }

    fn publish_load(&self, model: &str, load: &ModelLoad) {
        let labels = [model];
        self.metrics
            .in_flight
            .with_label_values(&labels)
            .set(load.in_flight as i64);
        self.metrics
            .held
            .with_label_values(&labels)
            .set(load.held as i64);
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic elsewhere must not take routing down with it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Replaces the index with `deployments`, keeping the state (channel,
    /// counts, health) of backends that stay. Backends whose URI is not
    /// valid are skipped with a warning.
    pub(crate) fn update(&self, deployments: &[Deployment]) {
        let mut state = self.lock();
        let mut old = std::mem::take(&mut state.deployments);
        for d in deployments {
            let mut kept = old.remove(&d.model).unwrap_or_default();
            kept.backends.append(&mut kept.leaving);
            kept.backends
                .extend(state.gone.remove(&d.model).into_iter().flatten());
            let mut next = DeploymentState {
                declared: d.adapters.clone(),
                ..DeploymentState::default()
            };
            for b in &d.backends {
                let pos = kept
                    .backends
                    .iter()
                    .position(|s| s.id == b.id && s.uri == b.grpc_uri);
                let backend = match pos {
                    Some(i) => kept.backends.swap_remove(i),
                    None => match self.endpoint(&b.grpc_uri) {
                        Ok(channel) => {
                            tracing::info!(model = %d.model, backend = %b.id, uri = %b.grpc_uri, "backend added");
                            BackendState {
                                id: b.id.clone(),
                                uri: b.grpc_uri.clone(),
                                channel,
                                outstanding: 0,
                                health: Health::Unknown,
                                failures: 0,
                                info: None,
                            }
                        }
                        Err(reason) => {
                            tracing::warn!(model = %d.model, backend = %b.id, uri = %b.grpc_uri, %reason, "backend skipped");
                            continue;
                        }
                    },
                };
                self.publish(&d.model, &backend);
                next.backends.push(backend);
            }
            for gone in kept.backends {
                self.let_go(&d.model, gone, &mut next.leaving);
            }
            state.deployments.insert(d.model.clone(), next);
        }
        for (model, mut gone) in old {
            gone.backends.append(&mut gone.leaving);
            let mut leaving = Vec::new();
            for b in gone.backends {
                self.let_go(&model, b, &mut leaving);
            }
            if !leaving.is_empty() {
                // The model is gone from discovery; its last requests still finish.
                state.gone.insert(model, leaving);
            }
        }
        drop(state);
        self.changed.notify_waiters();
    }

    /// A channel to `uri`: `http://` in plain text, `https://` over the router's
    /// backend TLS (mutual TLS when it has a certificate).
    fn endpoint(&self, uri: &str) -> Result<Channel, String> {
        let tls = match uri.strip_prefix("https://") {
            Some(rest) => match &self.backend_tls {
                // tonic's own connector refuses https:// without its TLS feature;
                // ours does the TLS, so tonic sees the plain scheme.
                Some(tls) => Some((tls, format!("http://{rest}"))),
                None => {
                    return Err(format!(
                        "{uri} is served over TLS; start the router with --backend-tls-ca"
                    ));
                }
            },
            None => None,
        };
        let target = tls.as_ref().map_or(uri, |(_, plain)| plain.as_str());
        let endpoint = Endpoint::from_shared(target.to_string()).map_err(|e| e.to_string())?;
        let endpoint = endpoint
            .connect_timeout(self.connect_timeout)
            .tcp_nodelay(true);
        Ok(match tls {
            Some((tls, _)) => endpoint.connect_with_connector_lazy(tls.connector()),
            None => endpoint.connect_lazy(),
        })
    }

    fn publish(&self, model: &str, b: &BackendState) {
        let labels = [model, b.id.as_str()];
        self.metrics
            .outstanding
            .with_label_values(&labels)
            .set(b.outstanding as i64);
        self.metrics
            .healthy
            .with_label_values(&labels)
            .set(i64::from(b.health != Health::Ejected));
    }

    /// A backend discovery dropped: forgotten now when idle, else kept in
    /// `leaving` until its last request ends.
    fn let_go(&self, model: &str, backend: BackendState, leaving: &mut Vec<BackendState>) {
        if backend.outstanding == 0 {
            self.forget(model, &backend.id);
        } else {
            tracing::info!(
                model,
                backend = %backend.id,
                outstanding = backend.outstanding,
                "backend leaving: nothing new is sent to it; its requests finish"
            );
            leaving.push(backend);
        }
    }

    fn forget(&self, model: &str, id: &str) {
        tracing::info!(model, backend = id, "backend removed");
        let _ = self.metrics.outstanding.remove_label_values(&[model, id]);
        let _ = self.metrics.healthy.remove_label_values(&[model, id]);
    }

    /// The model a request names, or the only one served when it names none.
    pub(crate) fn resolve_model(&self, model: &str) -> Result<String, PickError> {
        let state = self.lock();
        if model.is_empty() {
            let names: Vec<_> = state.deployments.keys().cloned().collect();
            return match names.as_slice() {
                [one] => Ok(one.clone()),
                _ => Err(PickError::ModelRequired(names)),
            };
        }
        if state.deployments.contains_key(model) {
            Ok(model.to_string())
        } else {
            Err(PickError::UnknownModel(model.to_string()))
        }
    }

    /// What a request's `model` names: a served model (or the only one, for an
    /// empty name), or a LoRA adapter one of the models' backends serves (vLLM's
    /// convention: adapters are asked for by their own name).
    pub(crate) fn resolve(&self, name: &str) -> Result<Target, PickError> {
        match self.resolve_model(name) {
            Ok(model) => Ok(Target {
                model,
                adapter: None,
            }),
            Err(PickError::UnknownModel(_)) => {
                let state = self.lock();
                adapters::model_serving(&state, name)
                    .map(|model| Target {
                        model,
                        adapter: Some(name.to_string()),
                    })
                    .ok_or_else(|| PickError::UnknownModel(name.to_string()))
            }
            Err(e) => Err(e),
        }
    }

    /// `model` (resolved as [`Pool::resolve_model`]) run with adapter `adapter`,
    /// which one of its backends must serve (TGI's `adapter_id`, gRPC's `adapter`).
    pub(crate) fn resolve_adapter(&self, model: &str, adapter: &str) -> Result<Target, PickError> {
        let model = self.resolve_model(model)?;
        let state = self.lock();
        let served = state
            .deployments
            .get(&model)
            .is_some_and(|d| adapters::has(d, adapter));
        if !served {
            return Err(PickError::UnknownAdapter {
                model,
                adapter: adapter.to_string(),
            });
        }
        Ok(Target {
            model,
            adapter: Some(adapter.to_string()),
        })
    }

    /// The backends of `model` that are not ejected, for calls made to all of
    /// them (loading an adapter): (id, channel).
    pub(crate) fn backends_of(&self, model: &str) -> Vec<(String, Channel)> {
        let state = self.lock();
        state
            .deployments
            .get(model)
            .map(|d| {
                d.backends
                    .iter()
                    .filter(|b| b.health != Health::Ejected)
                    .map(|b| (b.id.clone(), b.channel.clone()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Claims a backend of `model` for a request whose prefix hashes to
    /// `key`, skipping the backends in `exclude` (already tried).
    pub(crate) fn lease(
        self: &Arc<Self>,
        model: &str,
        key: u64,
        exclude: &[String],
    ) -> Result<Lease, PickError> {
        self.lease_for(model, None, key, exclude)
    }

    /// [`Pool::lease`] for a request on LoRA adapter `adapter`: only backends
    /// that serve it, those that have it resident first, then by load.
    pub(crate) fn lease_for(
        self: &Arc<Self>,
        model: &str,
        adapter: Option<&str>,
        key: u64,
        exclude: &[String],
    ) -> Result<Lease, PickError> {
        let mut guard = self.lock();
        let state = &mut *guard;
        let deployment = state
            .deployments
            .get_mut(model)
            .ok_or_else(|| PickError::UnknownModel(model.to_string()))?;
        if deployment.backends.is_empty() {
            return Err(PickError::NoBackends(model.to_string()));
        }
        let serving = |b: &BackendState| adapter.is_none_or(|a| adapters::serves(b, a).is_some());
        if let Some(name) = adapter
            && !deployment.backends.iter().any(&serving)
        {
            // Declared and no backend has said what it serves (its groups start):
            // held as a model without backends is. Else unloaded since the request
            // was resolved.
            return Err(match adapters::has(deployment, name) {
                true => PickError::NoBackends(model.to_string()),
                false => PickError::UnknownModel(name.to_string()),
            });
        }
        let candidates: Vec<Candidate> = deployment
            .backends
            .iter()
            .map(|b| Candidate {
                outstanding: b.outstanding,
                healthy: b.health != Health::Ejected && !exclude.contains(&b.id) && serving(b),
            })
            .collect();
        let preferred = state
            .affinity
            .get(key)
            .and_then(|id| deployment.backends.iter().position(|b| b.id == id));
        let rotate = self.rotate.fetch_add(1, Ordering::Relaxed);
        // An adapter already resident costs no load: those backends first, while
        // one of them has room.
        let resident = adapter.map(|a| {
            let only: Vec<Candidate> = candidates
                .iter()
                .zip(&deployment.backends)
                .map(|(c, b)| Candidate {
                    healthy: c.healthy && adapters::serves(b, a).is_some_and(|r| r.resident),
                    ..*c
                })
                .collect();
            choose(&only, preferred, rotate, self.max_queue)
        });
        let choice = match resident {
            Some(Choice::Backend(i)) => Choice::Backend(i),
            _ => choose(&candidates, preferred, rotate, self.max_queue),
        };
        let index = match choice {
            Choice::Backend(i) => i,
            Choice::Overloaded => return Err(PickError::Overloaded(model.to_string())),
            Choice::NoHealthy => return Err(PickError::NoHealthy(model.to_string())),
        };
        let backend = &mut deployment.backends[index];
        backend.outstanding += 1;
        state.affinity.put(key, &backend.id);
        self.publish(model, backend);
        Ok(Lease {
            pool: Arc::clone(self),
            model: model.to_string(),
            backend: backend.id.clone(),
            channel: backend.channel.clone(),
        })
    }

    fn release(&self, model: &str, id: &str) {
        let mut state = self.lock();
        if let Some(b) = find(&mut state, model, id) {
            b.outstanding = b.outstanding.saturating_sub(1);
            self.publish(model, b);
            return;
        }
        // A leaving backend's last request ending: it goes.
        let State {
            deployments, gone, ..
        } = &mut *state;
        let leaving = match deployments.get_mut(model) {
            Some(d) => &mut d.leaving,
            None => match gone.get_mut(model) {
                Some(leaving) => leaving,
                None => return,
            },
        };
        if let Some(i) = leaving.iter().position(|b| b.id == id) {
            let b = &mut leaving[i];
            b.outstanding = b.outstanding.saturating_sub(1);
            if b.outstanding == 0 {
                leaving.swap_remove(i);
                self.forget(model, id);
            } else {
                self.publish(model, b);
            }
        }
        if gone.get(model).is_some_and(Vec::is_empty) {
            gone.remove(model);
        }
    }

    /// A request could not reach the backend: eject it until a health check
    /// passes again.
    pub(crate) fn report_failure(&self, model: &str, id: &str, reason: &str) {
        let mut state = self.lock();
        if let Some(b) = find(&mut state, model, id) {
            if b.health != Health::Ejected {
                tracing::warn!(
                    model,
                    backend = id,
                    reason,
                    "backend ejected after a failed request"
                );
            }
            b.health = Health::Ejected;
            b.failures = b.failures.max(EJECT_AFTER);
            self.publish(model, b);
        }
    }

    /// Records a health check's result (and the backend's ModelInfo, when read:
    /// its limits, and the adapters it serves now).
    fn report_check(&self, model: &str, id: &str, ok: bool, info: Option<ModelInfoResponse>) {
        let mut state = self.lock();
        let Some(b) = find(&mut state, model, id) else {
            return;
        };
        let mut routable_again = false;
        if ok {
            if b.health == Health::Ejected {
                tracing::info!(model, backend = id, "backend healthy again");
                routable_again = true;
            }
            b.health = Health::Healthy;
            b.failures = 0;
            if info.is_some() {
                b.info = info;
            }
        } else {
            b.failures += 1;
            if b.failures >= EJECT_AFTER && b.health != Health::Ejected {
                tracing::warn!(
                    model,
                    backend = id,
                    failures = b.failures,
                    "backend ejected"
                );
                b.health = Health::Ejected;
            }
        }
        self.publish(model, b);
        drop(state);
        if routable_again {
            self.changed.notify_waiters();
        }
    }

    /// (model, backend id, channel) of every backend to check.
    fn check_targets(&self) -> Vec<(String, String, Channel)> {
        let state = self.lock();
        state
            .deployments
            .iter()
            .flat_map(|(model, d)| {
                d.backends
                    .iter()
                    .map(|b| (model.clone(), b.id.clone(), b.channel.clone()))
            })
            .collect()
    }

    /// A backend's ModelInfo read outside a health check (after its adapters
    /// changed).
    pub(crate) fn report_info(&self, model: &str, id: &str, info: ModelInfoResponse) {
        let mut state = self.lock();
        if let Some(b) = find(&mut state, model, id) {
            b.info = Some(info);
        }
    }

    /// The model's context length, once a backend has told it.
    pub(crate) fn max_sequence_length(&self, model: &str) -> Option<u32> {
        let state = self.lock();
        state.deployments.get(model).and_then(|d| {
            d.backends
                .iter()
                .find_map(|b| b.info.as_ref().map(|i| i.max_sequence_length))
        })
    }

    pub(crate) fn models(&self) -> Vec<ModelSummary> {
        let state = self.lock();
        state
            .deployments
            .iter()
            .map(|(model, d)| ModelSummary {
                model: model.clone(),
                backends: d.backends.len(),
                healthy: d
                    .backends
                    .iter()
                    .filter(|b| b.health == Health::Healthy)
                    .count(),
                info: d.backends.iter().find_map(|b| b.info.clone()),
                adapters: adapters::summary(d),
            })
            .collect()
    }

    /// Backend ids of a model with their outstanding counts and health, for
    /// logs and tests.
    #[cfg(test)]
    pub(crate) fn snapshot(&self, model: &str) -> Vec<(String, usize, bool)> {
        let state = self.lock();
        state
            .deployments
            .get(model)
            .map(|d| {
                d.backends
                    .iter()
                    .map(|b| (b.id.clone(), b.outstanding, b.health != Health::Ejected))
                    .collect()
            })
            .unwrap_or_default()
    }
}

fn find<'a>(state: &'a mut State, model: &str, id: &str) -> Option<&'a mut BackendState> {
    state
        .deployments
        .get_mut(model)?
        .backends
        .iter_mut()
        .find(|b| b.id == id)
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.pool.release(&self.model, &self.backend);
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.pool.leave(&self.model, false);
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.pool.leave(&self.model, true);
    }
}

#[cfg(test)]
mod tests;

impl Lease {
    /// Reports that this lease's backend failed mid-request.
    pub(crate) fn report_failure(&self, reason: &str) {
        self.pool.report_failure(&self.model, &self.backend, reason);
    }
}
