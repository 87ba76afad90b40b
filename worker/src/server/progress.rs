//! `shardserve.v1.Progress`: how far this pod is in fetching and loading its model.

use shardserve_proto::v1::progress_response::Stage as WireStage;
use shardserve_proto::v1::progress_server::{Progress, ProgressServer};
use shardserve_proto::v1::{ProgressRequest, ProgressResponse};
use tonic::{Request, Response, Status};

use crate::progress::{PodProgress, Stage};

/// Answers with the pod's progress: this process's and its local peers'.
#[derive(Clone, Debug)]
pub struct ProgressService {
    pod: PodProgress,
    /// The pod's other processes (ranks started by this one), counted even before
    /// they have written anything.
    peers: usize,
}

impl ProgressService {
    pub fn new(pod: PodProgress, peers: usize) -> Self {
        Self { pod, peers }
    }

    pub fn server(self) -> ProgressServer<Self> {
        ProgressServer::new(self)
    }
}

#[tonic::async_trait]
impl Progress for ProgressService {
    async fn get(
        &self,
        _request: Request<ProgressRequest>,
    ) -> Result<Response<ProgressResponse>, Status> {
        let report = self.pod.report(self.peers);
        let stage = match report.stage {
            Stage::Downloading => WireStage::Downloading,
            Stage::Loading => WireStage::Loading,
            Stage::Loaded => WireStage::Loaded,
        };
        Ok(Response::new(ProgressResponse {
            stage: stage as i32,
            done_bytes: report.done,
            total_bytes: report.total,
            processes: report.processes,
        }))
    }
}
