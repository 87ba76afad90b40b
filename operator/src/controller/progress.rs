//! Asks the pods of groups on their way how far they are: each rank pod answers
//! `shardserve.v1.Progress` on its gRPC port (its init container too, while it
//! fetches the model), with bytes fetched or loaded of its ranks.
//!
//! The operator asks rather than the pods writing to the API server: worker pods
//! mount no ServiceAccount token (a rank holds a model, not a credential), and a
//! Role narrow enough for one pod's own object does not exist in RBAC. The price:
//! the operator must reach pod IPs on the gRPC port, as the router already does.

use std::time::Duration;

use futures::future::join_all;
use shardserve_proto::v1::ProgressRequest;
use shardserve_proto::v1::progress_client::ProgressClient;
use shardserve_proto::v1::progress_response::Stage as WireStage;
use tonic::transport::Endpoint;

use super::observe::{Observed, PodObserved};

/// How long one pod may take to answer; a pod that does not is shown without its
/// bytes this time.
const ASK_TIMEOUT: Duration = Duration::from_secs(2);

/// How far a pod's processes are, as it answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PodLoad {
    pub stage: LoadStage,
    pub done: u64,
    pub total: u64,
}

/// The least advanced stage of a pod's processes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum LoadStage {
    Downloading,
    Loading,
    Loaded,
}

/// Fills in [`PodObserved::load`] for every pod worth asking: live, not ready, with
/// an IP, fetching or running. All at once, each within [`ASK_TIMEOUT`].
pub async fn ask_pods(observed: &mut Observed, port: u16) {
    let asked: Vec<&mut PodObserved> = observed
        .groups
        .values_mut()
        .flat_map(|g| g.pods.iter_mut())
        .filter(|p| worth_asking(p))
        .collect();
    join_all(asked.into_iter().map(|pod| async move {
        if let Some(ip) = pod.ip.clone() {
            pod.load = ask(&ip, port).await;
        }
    }))
    .await;
}

fn worth_asking(pod: &PodObserved) -> bool {
    !pod.terminating && !pod.ready && pod.ip.is_some() && (pod.downloading || pod.running)
}

/// One pod's answer; `None` when it gives none (not listening yet, an older image).
async fn ask(ip: &str, port: u16) -> Option<PodLoad> {
    // An IPv6 pod IP needs brackets in a URI.
    let host = match ip.contains(':') {
        true => format!("[{ip}]"),
        false => ip.to_string(),
    };
    let endpoint = Endpoint::from_shared(format!("http://{host}:{port}"))
        .ok()?
        .connect_timeout(ASK_TIMEOUT)
        .timeout(ASK_TIMEOUT);
    let answer = tokio::time::timeout(ASK_TIMEOUT, async {
        let channel = endpoint.connect().await.ok()?;
        ProgressClient::new(channel)
            .get(ProgressRequest {})
            .await
            .ok()
    })
    .await
    .ok()??
    .into_inner();
    let stage = match answer.stage() {
        WireStage::Downloading => LoadStage::Downloading,
        WireStage::Loading => LoadStage::Loading,
        WireStage::Loaded => LoadStage::Loaded,
        WireStage::Unspecified => return None,
    };
    Some(PodLoad {
        stage,
        done: answer.done_bytes.min(answer.total_bytes),
        total: answer.total_bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::labels::GroupId;
    use crate::controller::observe::GroupObserved;
    use shardserve_proto::v1::ProgressResponse;
    use shardserve_proto::v1::progress_server::{Progress, ProgressServer};
    use tonic::{Request, Response, Status};

    /// A pod's progress server answering one fixed report.
    struct Answers(ProgressResponse);

    #[tonic::async_trait]
    impl Progress for Answers {
        async fn get(
            &self,
            _: Request<ProgressRequest>,
        ) -> Result<Response<ProgressResponse>, Status> {
            Ok(Response::new(self.0))
        }
    }

    async fn serve(answer: ProgressResponse) -> u16 {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(ProgressServer::new(Answers(answer)))
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
        );
        port
    }

    fn pod(name: &str, ip: Option<&str>, running: bool, ready: bool) -> PodObserved {
        PodObserved {
            name: name.into(),
            ip: ip.map(str::to_string),
            running,
            ready,
            ..PodObserved::default()
        }
    }

    #[tokio::test]
    async fn pods_on_their_way_are_asked_and_others_left_alone() {
        let port = serve(ProgressResponse {
            stage: WireStage::Loading as i32,
            done_bytes: 300,
            total_bytes: 1000,
            processes: 2,
        })
        .await;
        let mut observed = Observed::default();
        let group = GroupObserved {
            pods: vec![
                pod("loading", Some("127.0.0.1"), true, false),
                pod("ready", Some("127.0.0.1"), true, true),
                pod("no-ip", None, true, false),
                // Nothing listens on 127.0.0.2 at that port: no answer, no wait.
                pod("silent", Some("127.0.0.2"), true, false),
            ],
            ..GroupObserved::default()
        };
        observed.groups.insert(GroupId(0), group);
        ask_pods(&mut observed, port).await;
        let loads: Vec<_> = observed.groups[&GroupId(0)]
            .pods
            .iter()
            .map(|p| (p.name.as_str(), p.load))
            .collect();
        let answered = PodLoad {
            stage: LoadStage::Loading,
            done: 300,
            total: 1000,
        };
        assert_eq!(
            loads,
            [
                ("loading", Some(answered)),
                ("ready", None),
                ("no-ip", None),
                ("silent", None),
            ]
        );
    }
}
