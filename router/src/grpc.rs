//! The router's gRPC face: `shardserve.v1.Inference`, each call sent to a
//! backend of the model named in the request (`model`, or the only one).
//! Generate streams are relayed event by event; dropping the client's call
//! drops the upstream one, which cancels the worker's generation.

use std::pin::Pin;

use futures::{Stream, StreamExt};
use shardserve_proto::v1 as pb;
use shardserve_proto::v1::inference_client::InferenceClient;
use shardserve_proto::v1::inference_server::Inference;
use tonic::{Code, Request, Response, Status};

use crate::auth::Keys;
use crate::dispatch::{DispatchError, Upstream};
use crate::pool::{Lease, PickError};

pub(crate) struct RouterInference {
    pub upstream: Upstream,
    /// The keys' running requests: a stream holds its key's slot until it ends,
    /// shared with HTTP.
    pub keys: Keys,
}

fn pick_status(e: PickError) -> Status {
    let message = e.to_string();
    match e {
        PickError::UnknownModel(_) | PickError::UnknownAdapter { .. } => Status::not_found(message),
        PickError::ModelRequired(_) => Status::invalid_argument(message),
        PickError::Overloaded(_) => Status::resource_exhausted(message),
        PickError::NoBackends(_)
        | PickError::NoHealthy(_)
        | PickError::HoldTimeout { .. }
        | PickError::HoldFull { .. } => Status::unavailable(message),
    }
}

fn dispatch_status(e: DispatchError) -> Status {
    match e {
        DispatchError::Pick(p) => pick_status(p),
        DispatchError::Upstream(s) => s,
    }
}

impl RouterInference {
    fn count(&self, model: &str, code: Code) {
        self.upstream
            .metrics
            .requests
            .with_label_values(&[model, "grpc_generate", &format!("{code:?}")])
            .inc();
    }

    /// A backend for a unary call (Tokenize, ModelInfo).
    fn lease(&self, model: &str) -> Result<Lease, Status> {
        let target = self.upstream.pool.resolve(model).map_err(pick_status)?;
        self.upstream
            .pool
            .lease(&target.model, 0, &[])
            .map_err(pick_status)
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::GenerateResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Inference for RouterInference {
    type GenerateStream = EventStream;

    async fn generate(
        &self,
        request: Request<pb::GenerateRequest>,
    ) -> Result<Response<EventStream>, Status> {
        let slot = self.keys.enter_grpc(request.extensions())?;
        let mut req = request.into_inner();
        // `model` may name an adapter (as in the OpenAI API), or `adapter` names
        // one of the model's.
        let resolved = match req.adapter.as_str() {
            "" => self.upstream.pool.resolve(&req.model),
            adapter => self.upstream.pool.resolve_adapter(&req.model, adapter),
        };
        let target = match resolved {
            Ok(t) => t,
            Err(e) => {
                let status = pick_status(e);
                self.count(&req.model, status.code());
                return Err(status);
            }
        };
        req.adapter = target.adapter.clone().unwrap_or_default();
        let model = target.model;
        match self.upstream.generate(&model, req).await {
            Ok(generation) => {
                self.count(&model, Code::Ok);
                let events = generation.map(move |event| {
                    let _running = &slot;
                    event.map(|e| pb::GenerateResponse { event: Some(e) })
                });
                Ok(Response::new(Box::pin(events)))
            }
            Err(e) => {
                let status = dispatch_status(e);
                self.count(&model, status.code());
                Err(status)
            }
        }
    }

    async fn tokenize(
        &self,
        request: Request<pb::TokenizeRequest>,
    ) -> Result<Response<pb::TokenizeResponse>, Status> {
        let req = request.into_inner();
        let lease = self.lease(&req.model)?;
        InferenceClient::new(lease.channel.clone())
            .tokenize(req)
            .await
    }

    async fn model_info(
        &self,
        request: Request<pb::ModelInfoRequest>,
    ) -> Result<Response<pb::ModelInfoResponse>, Status> {
        let req = request.into_inner();
        let lease = self.lease(&req.model)?;
        InferenceClient::new(lease.channel.clone())
            .model_info(req)
            .await
    }
}
