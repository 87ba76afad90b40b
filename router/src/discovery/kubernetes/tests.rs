//! The watch plumbing against a mocked API server (`tower_test::mock`, as
//! kube-rs documents): LISTs are answered from a script, WATCHes with streams
//! the test writes events into, and the discovery's channel must follow.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body as ResponseBody, Bytes};
use axum::http::{Request, Response, StatusCode};
use futures::StreamExt;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;

use super::KubernetesDiscovery;
use super::fixtures::{endpoint, grpc, md_json, ready, slice_json};
use crate::discovery::{Backend, Deployment, Discovery};

/// Longest wait for discovery to reach an expected state.
const PATIENCE: Duration = Duration::from_secs(15);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Kind {
    ModelDeployments,
    EndpointSlices,
}

/// One scripted answer to a LIST.
enum ListAnswer {
    Items(Vec<Value>),
    Error(StatusCode),
}

/// What the test keeps of the fake API server: the URIs it was asked for and
/// the write ends of its watch streams.
struct ApiServer {
    requests: Arc<Mutex<Vec<String>>>,
    watches: HashMap<Kind, mpsc::UnboundedSender<Bytes>>,
}

impl ApiServer {
    /// Starts the fake server and a discovery that talks to it.
    fn start(
        namespace: Option<&str>,
        lists: Vec<(Kind, ListAnswer)>,
    ) -> (Self, KubernetesDiscovery) {
        let (service, handle) =
            tower_test::mock::pair::<Request<kube::client::Body>, Response<ResponseBody>>();
        let client = kube::Client::new(service, namespace.unwrap_or("default"));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let mut scripts: HashMap<Kind, VecDeque<ListAnswer>> = HashMap::new();
        for (kind, answer) in lists {
            scripts.entry(kind).or_default().push_back(answer);
        }
        let mut watches = HashMap::new();
        let mut streams = HashMap::new();
        for kind in [Kind::ModelDeployments, Kind::EndpointSlices] {
            let (tx, rx) = mpsc::unbounded_channel();
            watches.insert(kind, tx);
            streams.insert(kind, rx);
        }
        tokio::spawn(serve(handle, scripts, streams, Arc::clone(&requests)));
        let discovery = KubernetesDiscovery::start(client, namespace);
        (Self { requests, watches }, discovery)
    }

    /// Sends a watch event (`ADDED`, `MODIFIED`, `DELETED`) on `kind`'s stream.
    fn event(&self, kind: Kind, kind_of_event: &str, object: Value) {
        let line = format!("{}\n", json!({"type": kind_of_event, "object": object}));
        self.watches[&kind]
            .send(Bytes::from(line))
            .expect("the watch stream is open");
    }

    fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }
}

/// Answers requests until the client goes away: a LIST from the script (an
/// empty list once it runs out), the first WATCH of each kind with the
/// test's stream, later WATCHes with a stream that stays open and silent.
async fn serve(
    mut handle: tower_test::mock::Handle<Request<kube::client::Body>, Response<ResponseBody>>,
    mut scripts: HashMap<Kind, VecDeque<ListAnswer>>,
    mut streams: HashMap<Kind, mpsc::UnboundedReceiver<Bytes>>,
    requests: Arc<Mutex<Vec<String>>>,
) {
    let mut silent = Vec::new();
    while let Some((request, reply)) = handle.next_request().await {
        let uri = request.uri().clone();
        requests.lock().unwrap().push(uri.to_string());
        let kind = if uri.path().ends_with("/modeldeployments") {
            Kind::ModelDeployments
        } else if uri.path().ends_with("/endpointslices") {
            Kind::EndpointSlices
        } else {
            panic!("unexpected request {uri}");
        };
        let watching = uri.query().is_some_and(|q| q.contains("watch=true"));
        let response = if watching {
            let rx = streams.remove(&kind).unwrap_or_else(|| {
                let (tx, rx) = mpsc::unbounded_channel();
                silent.push(tx);
                rx
            });
            let body = UnboundedReceiverStream::new(rx).map(Ok::<_, Infallible>);
            Response::new(ResponseBody::from_stream(body))
        } else {
            match scripts.get_mut(&kind).and_then(VecDeque::pop_front) {
                Some(ListAnswer::Error(status)) => Response::builder()
                    .status(status)
                    .body(ResponseBody::from(
                        json!({
                            "apiVersion": "v1", "kind": "Status", "status": "Failure",
                            "message": "scripted failure", "reason": "Forbidden", "code": status.as_u16(),
                        })
                        .to_string(),
                    ))
                    .unwrap(),
                answer => {
                    let items = match answer {
                        Some(ListAnswer::Items(items)) => items,
                        _ => Vec::new(),
                    };
                    let list = json!({
                        "apiVersion": "v1", "kind": "List",
                        "metadata": {"resourceVersion": "100"},
                        "items": items,
                    });
                    Response::new(ResponseBody::from(list.to_string()))
                }
            }
        };
        reply.send_response(response);
    }
}

fn backend(id: &str, uri: &str) -> Backend {
    Backend {
        id: id.into(),
        grpc_uri: uri.into(),
    }
}

fn deployment(model: &str, backends: Vec<Backend>) -> Deployment {
    Deployment {
        model: model.into(),
        backends,
        adapters: Vec::new(),
    }
}

/// Waits until the discovery publishes `expected`.
async fn expect(discovery: &KubernetesDiscovery, expected: &[Deployment]) {
    let mut rx = discovery.watch();
    let reached = tokio::time::timeout(PATIENCE, rx.wait_for(|d| d == expected))
        .await
        .is_ok_and(|r| r.is_ok());
    assert!(
        reached,
        "discovery never published {expected:?}; last: {:?}",
        *rx.borrow()
    );
}

#[tokio::test]
async fn lists_then_follows_watch_events() {
    let (api, discovery) = ApiServer::start(
        Some("ml"),
        vec![
            (
                Kind::ModelDeployments,
                ListAnswer::Items(vec![
                    md_json("ml", "llama", None),
                    md_json("ml", "smol", Some("smollm2")),
                ]),
            ),
            (
                Kind::EndpointSlices,
                ListAnswer::Items(vec![slice_json(
                    "ml",
                    "llama-abcde",
                    "llama",
                    grpc(),
                    vec![
                        ready("llama-g0-0", "10.0.0.1"),
                        ready("llama-g1-0", "10.0.1.1"),
                    ],
                )]),
            ),
        ],
    );
    assert!(!discovery.synced(), "nothing is listed yet");
    expect(
        &discovery,
        &[
            deployment(
                "llama",
                vec![
                    backend("ml/llama-g0-0", "http://10.0.0.1:50051"),
                    backend("ml/llama-g1-0", "http://10.0.1.1:50051"),
                ],
            ),
            deployment("smollm2", vec![]),
        ],
    )
    .await;
    assert!(discovery.synced());

    // smol's first group becomes ready in a new slice.
    api.event(
        Kind::EndpointSlices,
        "ADDED",
        slice_json(
            "ml",
            "smol-fghij",
            "smol",
            grpc(),
            vec![ready("smol-g0-0", "10.0.2.1")],
        ),
    );
    let smol = deployment(
        "smollm2",
        vec![backend("ml/smol-g0-0", "http://10.0.2.1:50051")],
    );
    expect(
        &discovery,
        &[
            deployment(
                "llama",
                vec![
                    backend("ml/llama-g0-0", "http://10.0.0.1:50051"),
                    backend("ml/llama-g1-0", "http://10.0.1.1:50051"),
                ],
            ),
            smol.clone(),
        ],
    )
    .await;

    // One llama group is being replaced: not ready, then terminating.
    api.event(
        Kind::EndpointSlices,
        "MODIFIED",
        slice_json(
            "ml",
            "llama-abcde",
            "llama",
            grpc(),
            vec![
                ready("llama-g0-0", "10.0.0.1"),
                endpoint(Some("llama-g1-0"), "10.0.1.1", Some(false), Some(true)),
            ],
        ),
    );
    expect(
        &discovery,
        &[
            deployment(
                "llama",
                vec![backend("ml/llama-g0-0", "http://10.0.0.1:50051")],
            ),
            smol.clone(),
        ],
    )
    .await;

    // llama is deleted; its slice is garbage-collected later.
    api.event(
        Kind::ModelDeployments,
        "DELETED",
        md_json("ml", "llama", None),
    );
    expect(&discovery, std::slice::from_ref(&smol)).await;

    let requests = api.requests();
    assert!(
        requests.iter().all(|r| r.contains("/namespaces/ml/")),
        "{requests:?}"
    );
    assert!(
        requests
            .iter()
            .any(|r| r.starts_with("/apis/shardserve.io/v1alpha1/namespaces/ml/modeldeployments?")),
        "{requests:?}"
    );
    assert!(
        requests.iter().any(|r| r
            .starts_with("/apis/discovery.k8s.io/v1/namespaces/ml/endpointslices?")
            && r.contains("labelSelector=kubernetes.io%2Fservice-name")),
        "{requests:?}"
    );
}

#[tokio::test]
async fn a_failed_list_is_retried_and_every_namespace_is_watched() {
    let (api, discovery) = ApiServer::start(
        None,
        vec![
            (
                Kind::ModelDeployments,
                ListAnswer::Error(StatusCode::FORBIDDEN),
            ),
            (
                Kind::ModelDeployments,
                ListAnswer::Items(vec![md_json("team-a", "smollm2", None)]),
            ),
            (
                Kind::EndpointSlices,
                ListAnswer::Items(vec![slice_json(
                    "team-a",
                    "smollm2-1",
                    "smollm2",
                    grpc(),
                    vec![ready("smollm2-g0-0", "fd00::7")],
                )]),
            ),
        ],
    );
    expect(
        &discovery,
        &[deployment(
            "smollm2",
            vec![backend("team-a/smollm2-g0-0", "http://[fd00::7]:50051")],
        )],
    )
    .await;
    assert!(discovery.synced());
    let requests = api.requests();
    let md_lists = requests
        .iter()
        .filter(|r| {
            r.starts_with("/apis/shardserve.io/v1alpha1/modeldeployments?")
                && !r.contains("watch=true")
        })
        .count();
    assert_eq!(md_lists, 2, "one failed LIST, one retried: {requests:?}");
    assert!(
        requests.iter().all(|r| !r.contains("/namespaces/")),
        "{requests:?}"
    );
}

#[tokio::test]
async fn no_model_deployments_is_synced_and_empty() {
    let (_api, discovery) = ApiServer::start(Some("ml"), vec![]);
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !discovery.synced() {
        assert!(tokio::time::Instant::now() < deadline, "never synced");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(discovery.watch().borrow().is_empty());
}
