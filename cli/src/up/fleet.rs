//! The worker groups of `shardserve up` once started: a group (one replica's rank
//! processes) lives and dies together; a crashed group starts again after a backoff
//! (`restart`), and `up` gives up only on a crash loop. Groups are added and removed
//! as the builtin autoscaler decides, on the router's own load metrics: one leaving
//! first drains (the router sends it nothing new and it is stopped once the router
//! counts nothing running on it for a moment, or its drain timeout passes). The
//! router learns the serving groups from a backends file rewritten on each change.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use shardserve_operator::autoscale::{Memory, Timestamp, decide};
use shardserve_operator::load::RouterLoad;
use shardserve_router::BackendsFile;

use super::free_port;
use super::plan::{DeploymentPlan, WorkerPlan};
use super::restart::{AfterCrash, CRASH_LOOP_RESTARTS, CRASH_LOOP_WINDOW, Restarts};
use super::supervisor::{Exited, Supervisor};

/// How long the router must count nothing on a draining group before it stops
/// (a request sent just before the group left the list shows by then).
const DRAIN_SETTLE: Duration = Duration::from_secs(2);
/// How long a stopping group has between SIGTERM and SIGKILL beyond its drain
/// timeout (the worker's own grace for open streams), as a pod's grace period.
const STOP_GRACE_EXTRA: Duration = Duration::from_secs(5);

/// Where a group is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupState {
    /// Started; not yet SERVING.
    Starting { since: Instant },
    /// In the router's list.
    Serving { since: Instant },
    /// Out of the router's list, finishing its requests.
    Draining {
        since: Instant,
        idle_since: Option<Instant>,
    },
    /// Sent SIGTERM; SIGKILL at `deadline`.
    Stopping { deadline: Instant },
    /// Crashed; starts again at `restart_at` (once its other ranks are gone).
    Crashed { restart_at: Instant },
}

/// One replica group.
#[derive(Debug)]
pub struct Group {
    /// Index of its deployment.
    pub deployment: usize,
    pub replica: u32,
    pub plan: WorkerPlan,
    /// Rank 0's gRPC address (what the router sends to).
    pub grpc: SocketAddr,
    pub metrics: SocketAddr,
    /// Rank processes still running (rank 0 first).
    pub pids: Vec<u32>,
    pub state: GroupState,
}

impl Group {
    fn url(&self) -> String {
        format!("http://{}", self.grpc)
    }

    /// The router's id of this group's backend.
    fn backend_id(&self) -> String {
        self.grpc.to_string()
    }

    /// Counts toward the deployment's replicas (not leaving).
    fn active(&self) -> bool {
        !matches!(
            self.state,
            GroupState::Draining { .. } | GroupState::Stopping { .. }
        )
    }
}

/// Every deployment's groups.
pub struct Fleet {
    exe: PathBuf,
    pub deployments: Vec<DeploymentPlan>,
    /// Groups each deployment should run now (the autoscaler moves it).
    targets: Vec<u32>,
    memory: Vec<Memory>,
    pub groups: Vec<Group>,
    restarts: HashMap<String, Restarts>,
    backends_file: PathBuf,
    written: Option<BackendsFile>,
    ready_timeout: Duration,
    /// Every group of the first start serves: from now on a group's adapter
    /// failing to load is reported, not fatal.
    started: bool,
}

impl Fleet {
    pub fn new(
        exe: PathBuf,
        deployments: Vec<DeploymentPlan>,
        backends_file: PathBuf,
        ready_timeout: Duration,
    ) -> Self {
        Self {
            exe,
            targets: deployments.iter().map(|d| d.replicas).collect(),
            memory: vec![Memory::default(); deployments.len()],
            deployments,
            groups: Vec::new(),
            restarts: HashMap::new(),
            backends_file,
            written: None,
            ready_timeout,
            started: false,
        }
    }

    /// The first start is over (every group served once).
    pub fn started(&mut self) {
        self.started = true;
    }

    pub fn backends_file(&self) -> &Path {
        &self.backends_file
    }

    /// Whether any deployment is autoscaled.
    pub fn autoscaled(&self) -> bool {
        self.deployments.iter().any(|d| d.policy.is_some())
    }

    /// Whether the router's load is needed now (to scale, or to end a drain).
    pub fn wants_load(&self) -> bool {
        self.autoscaled()
            || self
                .groups
                .iter()
                .any(|g| matches!(g.state, GroupState::Draining { .. }))
    }

    /// Starts every deployment's first groups.
    pub fn start_all(&mut self, sup: &mut Supervisor) -> Result<()> {
        for d in 0..self.deployments.len() {
            for replica in 0..self.targets[d] {
                self.spawn(sup, d, replica)?;
            }
        }
        Ok(())
    }

    /// Whether every group started has reached SERVING.
    pub fn all_serving(&self) -> bool {
        self.groups
            .iter()
            .all(|g| matches!(g.state, GroupState::Serving { .. }))
    }

    /// Starts group `replica` of deployment `d`: rank 0 serving on a fresh port,
    /// ranks 1.. meeting it at its coordinator port.
    fn spawn(&mut self, sup: &mut Supervisor, d: usize, replica: u32) -> Result<()> {
        let plan = self.deployments[d].group(replica);
        let grpc = free_port()?;
        let metrics = free_port()?;
        let name = format!("worker {}", plan.name);
        let mut pids = Vec::new();
        let mut leader = self.worker_command(&plan);
        leader
            .arg("--listen")
            .arg(grpc.to_string())
            .arg("--metrics-addr")
            .arg(metrics.to_string())
            .arg("--served-model-name")
            .arg(&plan.model);
        if let Some(n) = plan.max_num_seqs {
            leader.arg("--max-num-seqs").arg(n.to_string());
        }
        let drain = self.deployments[d].drain_timeout.as_secs().to_string();
        leader.args(["--drain-timeout", &drain]);
        let mut followers = Vec::new();
        if plan.tensor > 1 {
            let coordinator = free_port()?.to_string();
            let tensor = plan.tensor.to_string();
            leader.args([
                "--tensor",
                &tensor,
                "--rank",
                "0",
                "--coordinator",
                &coordinator,
            ]);
            for rank in 1..plan.tensor {
                let mut follower = self.worker_command(&plan);
                follower.args(["--tensor", &tensor, "--rank", &rank.to_string()]);
                follower.args(["--coordinator", &coordinator]);
                followers.push((format!("{name} rank {rank}"), follower));
            }
        }
        pids.push(sup.spawn(&name, leader)?);
        for (name, follower) in followers {
            pids.push(sup.spawn(&name, follower)?);
        }
        self.groups.push(Group {
            deployment: d,
            replica,
            plan,
            grpc,
            metrics,
            pids,
            state: GroupState::Starting {
                since: Instant::now(),
            },
        });
        Ok(())
    }

    fn worker_command(&self, plan: &WorkerPlan) -> Command {
        let mut cmd = Command::new(&self.exe);
        cmd.arg("worker")
            .arg("--model")
            .arg(&plan.model_path)
            .arg("--threads")
            .arg(plan.threads.to_string());
        if let Some(n) = plan.max_seq_len {
            cmd.arg("--max-seq-len").arg(n.to_string());
        }
        if let Some(n) = plan.max_loras {
            cmd.arg("--max-loras").arg(n.to_string());
        }
        if let Some(n) = plan.max_lora_rank {
            cmd.arg("--max-lora-rank").arg(n.to_string());
        }
        cmd
    }

    /// A child ended. A group's rank ending uninvited crashes the group: its
    /// other ranks are killed and it starts again after its backoff; an error
    /// when it crash-loops. Children that are not workers are not ours.
    pub fn exited(&mut self, exited: &Exited, sup: &mut Supervisor, now: Instant) -> Result<bool> {
        let Some(i) = self
            .groups
            .iter()
            .position(|g| g.pids.contains(&exited.pid))
        else {
            return Ok(false);
        };
        let group = &mut self.groups[i];
        group.pids.retain(|&p| p != exited.pid);
        match group.state {
            GroupState::Stopping { .. } | GroupState::Crashed { .. } => {}
            GroupState::Draining { .. } => {
                // It was leaving anyway: the rest of it goes too.
                eprintln!("{exited} while draining; stopping the rest of its group");
                for &pid in &group.pids {
                    sup.signal(pid, libc::SIGKILL);
                }
                group.state = GroupState::Stopping { deadline: now };
            }
            GroupState::Starting { .. } | GroupState::Serving { .. } => {
                let why = exited.to_string();
                self.crash(i, &why, sup, now)?;
            }
        }
        self.forget_stopped();
        Ok(true)
    }

    /// Group `i` failed (`why`): kill its ranks, and restart it after its backoff.
    fn crash(&mut self, i: usize, why: &str, sup: &mut Supervisor, now: Instant) -> Result<()> {
        let group = &mut self.groups[i];
        for &pid in &group.pids {
            sup.signal(pid, libc::SIGKILL);
        }
        let restarts = self.restarts.entry(group.plan.name.clone()).or_default();
        match restarts.crashed(now) {
            AfterCrash::Restart { after, restart } => {
                let others = match group.pids.len() {
                    0 => String::new(),
                    n => format!(", its other {n} rank(s) killed"),
                };
                eprintln!(
                    "{why}{others}; group {} starts again in {} s (restart {restart})",
                    group.plan.name,
                    after.as_secs()
                );
                group.state = GroupState::Crashed {
                    restart_at: now + after,
                };
                Ok(())
            }
            AfterCrash::CrashLoop => bail!(
                "{why}; group {} crash-loops ({CRASH_LOOP_RESTARTS} restarts within {} s); \
                 giving up",
                group.plan.name,
                CRASH_LOOP_WINDOW.as_secs()
            ),
        }
    }

    /// Drops groups whose every rank is gone after a stop.
    fn forget_stopped(&mut self) {
        self.groups.retain(|g| {
            let gone = g.pids.is_empty() && matches!(g.state, GroupState::Stopping { .. });
            if gone {
                eprintln!("group {} stopped", g.plan.name);
            }
            !gone
        });
    }

    /// Starts crashed groups whose backoff has passed; kills stopping groups past
    /// their grace.
    pub fn restart_due(&mut self, sup: &mut Supervisor, now: Instant) -> Result<()> {
        let mut due = Vec::new();
        for (i, g) in self.groups.iter().enumerate() {
            match g.state {
                GroupState::Crashed { restart_at } if restart_at <= now && g.pids.is_empty() => {
                    due.push(i);
                }
                GroupState::Stopping { deadline } if deadline <= now => {
                    for &pid in &g.pids {
                        sup.signal(pid, libc::SIGKILL);
                    }
                }
                _ => {}
            }
        }
        for i in due.into_iter().rev() {
            let g = self.groups.remove(i);
            eprintln!("group {}: starting again", g.plan.name);
            self.spawn(sup, g.deployment, g.replica)?;
        }
        Ok(())
    }

    /// Asks each starting group whether it serves; one that takes longer than the
    /// ready timeout counts as crashed.
    pub async fn check_starting(&mut self, sup: &mut Supervisor, now: Instant) -> Result<()> {
        let mut checks = tokio::task::JoinSet::new();
        for (i, g) in self.groups.iter().enumerate() {
            if let GroupState::Starting { .. } = g.state {
                let url = g.url();
                checks.spawn(async move { (i, super::worker_serving(url).await) });
            }
        }
        let mut serving = Vec::new();
        while let Some(done) = checks.join_next().await {
            if let Ok((i, true)) = done {
                serving.push(i);
            }
        }
        for i in serving {
            // Its adapters first: the router lists the group only once it has them.
            let wanted = &self.deployments[self.groups[i].deployment].adapters;
            if !wanted.is_empty() {
                let failed = load_adapters(&self.groups[i], wanted).await;
                if let Some(failed) = failed {
                    let g = &self.groups[i];
                    if self.started {
                        eprintln!("group {}: {failed:#}", g.plan.name);
                    } else {
                        // A manifest's bad adapter stops `up` before it serves, as a bad model does.
                        return Err(failed.context(format!("group {}", g.plan.name)));
                    }
                }
            }
            let g = &mut self.groups[i];
            eprintln!("group {}: serving on {}", g.plan.name, g.grpc);
            g.state = GroupState::Serving { since: now };
        }
        let late: Vec<usize> = (0..self.groups.len())
            .filter(|&i| {
                matches!(self.groups[i].state, GroupState::Starting { since }
                    if now.duration_since(since) > self.ready_timeout)
            })
            .collect();
        for i in late {
            let why = format!(
                "group {} was not serving after {} s (--ready-timeout)",
                self.groups[i].plan.name,
                self.ready_timeout.as_secs()
            );
            self.crash(i, &why, sup, now)?;
        }
        for g in &self.groups {
            if let GroupState::Serving { since } = g.state
                && let Some(r) = self.restarts.get_mut(&g.plan.name)
            {
                r.serving(since, now);
            }
        }
        Ok(())
    }

    /// The builtin autoscaler's decisions on the router's `load`, then each
    /// deployment's groups brought to its target.
    pub fn scale(
        &mut self,
        load: &RouterLoad,
        at: Timestamp,
        sup: &mut Supervisor,
        now: Instant,
    ) -> Result<()> {
        for d in 0..self.deployments.len() {
            let Some(policy) = self.deployments[d].policy else {
                continue;
            };
            let model = &self.deployments[d].template.model;
            let current = self.targets[d];
            let decision = decide(&policy, current, load.model(model), self.memory[d], at);
            self.memory[d] = decision.memory;
            if let (true, Some(why)) = (decision.replicas != current, decision.why) {
                eprintln!(
                    "autoscaler: {} from {current} to {} group(s): {why}",
                    self.deployments[d].name, decision.replicas
                );
                self.targets[d] = decision.replicas;
            }
            self.converge(d, load, sup, now)?;
        }
        Ok(())
    }

    /// Starts or removes groups of deployment `d` until it runs its target: new
    /// groups take the lowest free numbers; leaving first go the groups not
    /// serving, then the least loaded serving ones, which drain.
    fn converge(
        &mut self,
        d: usize,
        load: &RouterLoad,
        sup: &mut Supervisor,
        now: Instant,
    ) -> Result<()> {
        let target = self.targets[d] as usize;
        let active: Vec<usize> = (0..self.groups.len())
            .filter(|&i| self.groups[i].deployment == d && self.groups[i].active())
            .collect();
        if active.len() < target {
            for _ in active.len()..target {
                let taken: Vec<u32> = self
                    .groups
                    .iter()
                    .filter(|g| g.deployment == d)
                    .map(|g| g.replica)
                    .collect();
                let replica = (0..).find(|r| !taken.contains(r)).unwrap_or(0);
                self.spawn(sup, d, replica)?;
            }
            return Ok(());
        }
        let mut leaving = active;
        let serving = |g: &Group| matches!(g.state, GroupState::Serving { .. });
        leaving.sort_by_key(|&i| {
            let g = &self.groups[i];
            let outstanding = load.backends.get(&g.backend_id()).copied().unwrap_or(0);
            (serving(g), outstanding, std::cmp::Reverse(g.replica))
        });
        for &i in leaving.iter().take(leaving.len().saturating_sub(target)) {
            let g = &mut self.groups[i];
            if serving(g) {
                eprintln!("group {}: draining", g.plan.name);
                g.state = GroupState::Draining {
                    since: now,
                    idle_since: None,
                };
            } else {
                eprintln!("group {}: not serving yet; stopping it", g.plan.name);
                for &pid in &g.pids {
                    sup.signal(pid, libc::SIGTERM);
                }
                g.state = GroupState::Stopping {
                    deadline: now + STOP_GRACE_EXTRA,
                };
            }
        }
        self.forget_stopped();
        Ok(())
    }

    /// Stops draining groups once the router counts nothing on them for
    /// [`DRAIN_SETTLE`], or their drain timeout has passed; with no load known
    /// (no router), at once.
    pub fn finish_drains(&mut self, load: Option<&RouterLoad>, sup: &mut Supervisor, now: Instant) {
        for g in &mut self.groups {
            let GroupState::Draining { since, idle_since } = g.state else {
                continue;
            };
            let timeout = self.deployments[g.deployment].drain_timeout;
            let outstanding = load.map(|l| l.backends.get(&g.backend_id()).copied().unwrap_or(0));
            let idle_since = match outstanding {
                Some(0) | None => Some(idle_since.unwrap_or(now)),
                Some(_) => None,
            };
            let settled =
                load.is_none() || idle_since.is_some_and(|t| now.duration_since(t) >= DRAIN_SETTLE);
            let overdue = now.duration_since(since) >= timeout;
            if settled || overdue {
                let how = match settled {
                    true => "drained".to_string(),
                    false => format!(
                        "drain timeout ({} s) passed with {} request(s) running",
                        timeout.as_secs(),
                        outstanding.unwrap_or(0)
                    ),
                };
                eprintln!("group {}: {how}; stopping it", g.plan.name);
                for &pid in &g.pids {
                    sup.signal(pid, libc::SIGTERM);
                }
                g.state = GroupState::Stopping {
                    deadline: now + timeout + STOP_GRACE_EXTRA,
                };
            } else {
                g.state = GroupState::Draining { since, idle_since };
            }
        }
    }

    /// Writes the serving groups to the backends file if they changed; every
    /// deployment's model is listed, with no URL while none serves.
    pub fn write_backends(&mut self) -> Result<()> {
        let mut file = BackendsFile::default();
        for d in &self.deployments {
            file.models.entry(d.template.model.clone()).or_default();
            if !d.adapters.is_empty() {
                let names = d.adapters.iter().map(|(name, _)| name.clone()).collect();
                file.adapters.insert(d.template.model.clone(), names);
            }
        }
        for g in &self.groups {
            if let GroupState::Serving { .. } = g.state {
                let model = &self.deployments[g.deployment].template.model;
                file.models.entry(model.clone()).or_default().push(g.url());
            }
        }
        if self.written.as_ref() != Some(&file) {
            file.write(&self.backends_file)
                .with_context(|| format!("writing {}", self.backends_file.display()))?;
            self.written = Some(file);
        }
        Ok(())
    }
}

/// Loads `wanted` adapters into group `g` through its API; the adapters that
/// failed and why, as one error, or `None`.
async fn load_adapters(g: &Group, wanted: &[(String, String)]) -> Option<anyhow::Error> {
    let channel = match tonic::transport::Endpoint::from_shared(g.url()) {
        Ok(endpoint) => endpoint.connect().await,
        Err(e) => return Some(anyhow::anyhow!("{} is no gRPC address: {e}", g.url())),
    };
    let channel = match channel {
        Ok(channel) => channel,
        Err(e) => {
            return Some(anyhow::anyhow!(
                "cannot reach it to load its LoRA adapters: {e}"
            ));
        }
    };
    let outcomes = match shardserve_operator::adapters::sync(channel, wanted, &[]).await {
        Ok(outcomes) => outcomes,
        Err(status) => {
            return Some(anyhow::anyhow!(
                "loading its LoRA adapters failed: {}",
                status.message()
            ));
        }
    };
    let failed: Vec<String> = outcomes
        .into_iter()
        .filter_map(|(name, outcome)| match outcome {
            shardserve_operator::adapters::Outcome::Failed(why) => {
                Some(format!("spec.loraAdapters {name}: {why}"))
            }
            _ => None,
        })
        .collect();
    (!failed.is_empty()).then(|| anyhow::anyhow!("{}", failed.join("; ")))
}
