//! A scripted API server for tests (kube-rs's `tower-test` pattern): a test plays
//! the server, taking each request the code under test makes, checking it and
//! answering it. Events are answered on the side and kept by reason and note.

use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use kube::Client;
use kube::client::Body;
use serde::Serialize;
use serde_json::Value;
use tower_test::mock::{Handle, SendResponse};

/// Where events are posted (the tests' namespace is `models`).
const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/models/events";

/// A client whose requests `ApiServer` answers.
pub fn pair() -> (Client, ApiServer) {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, "models");
    (
        client,
        ApiServer {
            handle,
            events: Vec::new(),
        },
    )
}

/// A request the reconcile made, and the way to answer it.
pub struct Call {
    pub method: Method,
    pub path: String,
    pub query: String,
    pub body: Value,
    pub respond: SendResponse<Response<Body>>,
}

impl Call {
    pub fn reply(self, status: StatusCode, body: &impl Serialize) {
        let bytes = serde_json::to_vec(body).unwrap();
        let response = Response::builder()
            .status(status)
            .body(Body::from(bytes))
            .unwrap();
        self.respond.send_response(response);
    }

    /// Answers a server-side apply as the API server does: the object.
    pub fn echo(self) -> Value {
        let body = self.body.clone();
        self.reply(StatusCode::OK, &body);
        body
    }
}

/// The scripted API server.
pub struct ApiServer {
    pub handle: Handle<Request<Body>, Response<Body>>,
    /// `(reason, note)` of every event published.
    pub events: Vec<(String, String)>,
}

impl ApiServer {
    /// The next request that is not an event.
    pub async fn next(&mut self) -> Call {
        loop {
            let (request, respond) =
                tokio::time::timeout(Duration::from_secs(5), self.handle.next_request())
                    .await
                    .expect("the reconcile stopped making requests")
                    .expect("the client is gone");
            let method = request.method().clone();
            let uri = request.uri().clone();
            let bytes = request.into_body().collect_bytes().await.unwrap();
            let body: Value = if bytes.is_empty() {
                Value::Null
            } else {
                serde_json::from_slice(&bytes).unwrap()
            };
            if method == Method::POST && uri.path() == EVENTS {
                let field = |k: &str| body[k].as_str().unwrap_or_default().to_string();
                self.events.push((field("reason"), field("note")));
                let call = Call {
                    method,
                    path: uri.path().into(),
                    query: String::new(),
                    body: body.clone(),
                    respond,
                };
                call.reply(StatusCode::CREATED, &body);
                continue;
            }
            return Call {
                method,
                path: uri.path().into(),
                query: uri.query().unwrap_or_default().into(),
                body,
                respond,
            };
        }
    }

    /// The next request, which must be `method path`.
    pub async fn expect(&mut self, method: Method, path: &str) -> Call {
        let call = self.next().await;
        assert_eq!(
            (&call.method, call.path.as_str()),
            (&method, path),
            "unexpected request (query {:?})",
            call.query
        );
        call
    }

    /// Nothing more is asked.
    pub async fn done(mut self) -> Vec<(String, String)> {
        let more =
            tokio::time::timeout(Duration::from_millis(100), self.handle.next_request()).await;
        if let Ok(Some((request, _))) = more {
            panic!("unexpected request {} {}", request.method(), request.uri());
        }
        self.events
    }
}
