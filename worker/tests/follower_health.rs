//! A tensor-parallel group spread over pods, one rank per pod, run as the operator runs
//! it (`--pod-index`, `--ranks-per-pod`): the first rank of every pod answers its pod's
//! gRPC health probe, the followers' NOT_SERVING until their group has met, then SERVING,
//! so every pod of the group turns Ready.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use shardserve_e2e::{Process, demo_model, free_port};
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// The overall status at `addr`, once something answers there.
async fn status(addr: SocketAddr, within: Duration) -> ServingStatus {
    let start = Instant::now();
    loop {
        let answer = async {
            let channel = Channel::from_shared(format!("http://{addr}"))
                .unwrap()
                .connect()
                .await
                .ok()?;
            let reply = HealthClient::new(channel)
                .check(HealthCheckRequest {
                    service: String::new(),
                })
                .await
                .ok()?;
            Some(reply.into_inner().status())
        }
        .await;
        if let Some(status) = answer {
            return status;
        }
        assert!(start.elapsed() < within, "nothing answers on {addr}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn rank(pod: usize, coordinator: &str, listen: SocketAddr) -> Process {
    let model = demo_model();
    Process::start(&[
        "worker",
        "--model",
        model.to_str().unwrap(),
        "--tensor",
        "3",
        "--rank",
        "0",
        "--pod-index",
        &pod.to_string(),
        "--ranks-per-pod",
        "1",
        "--coordinator",
        coordinator,
        "--listen",
        &listen.to_string(),
    ])
}

#[tokio::test(flavor = "multi_thread")]
async fn every_pod_of_a_group_turns_serving_once_the_group_has_met() {
    let coordinator = format!("127.0.0.1:{}", free_port());
    let listen: Vec<SocketAddr> = (0..3)
        .map(|_| format!("127.0.0.1:{}", free_port()).parse().unwrap())
        .collect();
    // Pod 1 first: alone, it loads its shard and waits for the leader.
    let _pod1 = rank(1, &coordinator, listen[1]);
    let waiting = status(listen[1], Duration::from_secs(60)).await;
    assert_eq!(waiting, ServingStatus::NotServing, "before the group met");
    let _pod0 = rank(0, &coordinator, listen[0]);
    let _pod2 = rank(2, &coordinator, listen[2]);
    let start = Instant::now();
    for (pod, addr) in listen.iter().enumerate() {
        loop {
            let left = Duration::from_secs(120).saturating_sub(start.elapsed());
            match status(*addr, left).await {
                ServingStatus::Serving => break,
                other => {
                    assert!(!left.is_zero(), "pod {pod} still {other:?}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }
}
