//! Asking every router pod for its `/metrics`: the ready endpoints of the router
//! Service's EndpointSlices, all at once, each within [`ASK_TIMEOUT`].

use std::net::Ipv6Addr;
use std::time::Duration;

use futures::future::join_all;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Client;
use kube::api::{Api, ListParams};

use super::RouterLoad;

/// How long one router may take to answer.
const ASK_TIMEOUT: Duration = Duration::from_secs(2);
/// The router Service's ports that serve `/metrics`, in order of preference (the
/// chart names them so): `metrics` is plain HTTP even when the API speaks TLS.
const METRICS_PORT_NAMES: [&str; 2] = ["metrics", "http"];
/// The standard label naming the Service an EndpointSlice belongs to.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// The routers behind one Service.
pub struct RouterScraper {
    slices: Api<EndpointSlice>,
    service: String,
    http: reqwest::Client,
}

impl RouterScraper {
    /// The routers behind Service `namespace/service`.
    pub fn new(client: Client, namespace: &str, service: &str) -> Self {
        Self {
            slices: Api::namespaced(client, namespace),
            service: service.to_string(),
            http: reqwest::Client::builder()
                .timeout(ASK_TIMEOUT)
                .build()
                .unwrap_or_default(),
        }
    }

    /// The Service, as `namespace/name`, for logs.
    pub fn service(&self) -> String {
        format!(
            "{}/{}",
            self.slices.namespace().unwrap_or_default(),
            self.service
        )
    }

    /// Every ready router's load, summed; a router that does not answer counts as
    /// asked and not answered.
    pub async fn scrape(&self) -> Result<RouterLoad, kube::Error> {
        let params =
            ListParams::default().labels(&format!("{SERVICE_NAME_LABEL}={}", self.service));
        let slices = self.slices.list(&params).await?;
        let urls = metrics_urls(&slices.items);
        let answers = join_all(urls.iter().map(|url| self.ask(url))).await;
        let mut total = RouterLoad::default();
        for (url, answer) in urls.iter().zip(answers) {
            match answer {
                Ok(text) => total.add(RouterLoad::from_metrics(&text)),
                Err(e) => {
                    tracing::warn!(router = %url, "a router did not give its metrics: {e}");
                    total.asked += 1;
                }
            }
        }
        Ok(total)
    }

    async fn ask(&self, url: &str) -> Result<String, reqwest::Error> {
        self.http
            .get(url)
            .send()
            .await?
            .error_for_status()?
            .text()
            .await
    }
}

/// `http://address:port/metrics` of every ready endpoint, once each.
fn metrics_urls(slices: &[EndpointSlice]) -> Vec<String> {
    let mut urls = Vec::new();
    for slice in slices {
        let named = |name: &str| {
            slice
                .ports
                .iter()
                .flatten()
                .find(|p| p.name.as_deref() == Some(name))
                .and_then(|p| p.port)
        };
        let Some(port) = METRICS_PORT_NAMES.into_iter().find_map(named) else {
            continue;
        };
        for endpoint in &slice.endpoints {
            let conditions = endpoint.conditions.as_ref();
            let ready = conditions.and_then(|c| c.ready).unwrap_or(true);
            let terminating = conditions.and_then(|c| c.terminating).unwrap_or(false);
            // A terminating router still finishes streams: its requests are load.
            if !(ready || terminating) {
                continue;
            }
            if let Some(address) = endpoint.addresses.first() {
                let host = match address.parse::<Ipv6Addr>() {
                    Ok(_) => format!("[{address}]"),
                    Err(_) => address.clone(),
                };
                let url = format!("http://{host}:{port}/metrics");
                if !urls.contains(&url) {
                    urls.push(url);
                }
            }
        }
    }
    urls
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn ready_and_terminating_routers_are_asked_on_their_http_port() {
        let slice: EndpointSlice = serde_json::from_value(json!({
            "metadata": {"name": "r-1", "namespace": "shardserve"},
            "addressType": "IPv4",
            "ports": [{"name": "grpc", "port": 50051}, {"name": "http", "port": 8080}],
            "endpoints": [
                {"addresses": ["10.0.0.1"], "conditions": {"ready": true}},
                {"addresses": ["10.0.0.2"], "conditions": {"ready": false, "terminating": true}},
                {"addresses": ["10.0.0.3"], "conditions": {"ready": false}},
                {"addresses": ["fd00::4"]},
            ],
        }))
        .unwrap();
        assert_eq!(
            metrics_urls(&[slice.clone(), slice.clone()]),
            [
                "http://10.0.0.1:8080/metrics",
                "http://10.0.0.2:8080/metrics",
                "http://[fd00::4]:8080/metrics"
            ]
        );
        // The chart's routers serve /metrics on a port of its own (plain HTTP while
        // the API may speak TLS).
        let mut with_metrics = slice;
        with_metrics
            .ports
            .as_mut()
            .unwrap()
            .push(serde_json::from_value(json!({"name": "metrics", "port": 9090})).unwrap());
        assert_eq!(
            metrics_urls(&[with_metrics])[0],
            "http://10.0.0.1:9090/metrics"
        );
    }
}
