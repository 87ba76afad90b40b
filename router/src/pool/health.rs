//! Polls every backend's `grpc.health.v1.Health/Check` and reports the
//! results to the pool; a healthy backend is also asked for its ModelInfo
//! each time (a small message): the model's context length, and the LoRA
//! adapters it serves now, which change at run time.

use std::sync::Arc;
use std::time::Duration;

use shardserve_proto::v1::inference_client::InferenceClient;
use shardserve_proto::v1::{ModelInfoRequest, ModelInfoResponse};
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use super::Pool;

/// Checks every backend every `interval` until the task is dropped.
pub(crate) async fn run_health_checks(pool: Arc<Pool>, interval: Duration, timeout: Duration) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let checks = pool
            .check_targets()
            .into_iter()
            .map(|(model, id, channel)| {
                let pool = Arc::clone(&pool);
                async move {
                    let ok = check(channel.clone(), timeout).await;
                    let info = if ok {
                        model_info(channel, timeout).await
                    } else {
                        None
                    };
                    pool.report_check(&model, &id, ok, info);
                }
            });
        futures::future::join_all(checks).await;
    }
}

async fn check(channel: Channel, timeout: Duration) -> bool {
    let mut client = HealthClient::new(channel);
    let call = client.check(HealthCheckRequest {
        service: String::new(),
    });
    match tokio::time::timeout(timeout, call).await {
        Ok(Ok(response)) => response.into_inner().status == ServingStatus::Serving as i32,
        Ok(Err(_)) | Err(_) => false,
    }
}

/// Reads a backend's ModelInfo again now (its adapters changed).
pub(crate) async fn refresh_info(
    pool: &Pool,
    model: &str,
    id: &str,
    channel: Channel,
    timeout: Duration,
) {
    if let Some(info) = model_info(channel, timeout).await {
        pool.report_info(model, id, info);
    }
}

async fn model_info(channel: Channel, timeout: Duration) -> Option<ModelInfoResponse> {
    let mut client = InferenceClient::new(channel);
    match tokio::time::timeout(timeout, client.model_info(ModelInfoRequest::default())).await {
        Ok(Ok(response)) => Some(response.into_inner()),
        _ => None,
    }
}
