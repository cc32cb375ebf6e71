#![allow(dead_code)]

use std::time::Duration;

use harbor::dev::{DevCluster, DevOptions};

use serde_json::{json, Value};

pub struct Api {
    pub client: reqwest::Client,
}

pub struct Reply {
    pub status: u16,
    pub body: Value,
}

impl Reply {
    pub fn code(&self) -> &str {
        self.body["error"].as_str().unwrap_or("")
    }
}

impl Api {
    pub fn new() -> Api {
        Api {
            client: reqwest::Client::new(),
        }
    }

    pub async fn send(&self, method: reqwest::Method, url: String, body: Option<Value>) -> Reply {
        self.send_within(method, url, body, Duration::from_secs(20))
            .await
    }

    /// A POST answered within `timeout` (admin calls that take long).
    pub async fn post_within(&self, url: String, body: Value, timeout: Duration) -> Reply {
        self.send_within(reqwest::Method::POST, url, Some(body), timeout)
            .await
    }

    async fn send_within(
        &self,
        method: reqwest::Method,
        url: String,
        body: Option<Value>,
        timeout: Duration,
    ) -> Reply {
        let mut request = self.client.request(method, &url).timeout(timeout);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request
            .send()
            .await
            .unwrap_or_else(|e| panic!("{url}: {e}"));
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        let body = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{url} answered {status} with non-JSON {text:?}: {e}"));
        Reply { status, body }
    }

    pub async fn get(&self, url: String) -> Reply {
        self.send(reqwest::Method::GET, url, None).await
    }

    pub async fn post(&self, url: String, body: Value) -> Reply {
        self.send(reqwest::Method::POST, url, Some(body)).await
    }

    pub async fn put_issuer(&self, base: &str, issuer: &str, home: &str, limit: u64) -> Reply {
        self.send(
            reqwest::Method::PUT,
            format!("{base}/v1/issuers/{issuer}"),
            Some(json!({"home_region": home, "limit": limit})),
        )
        .await
    }

    pub async fn reserve(
        &self,
        base: &str,
        token: &str,
        issuer: &str,
        amount: u64,
        desk: &str,
    ) -> Reply {
        self.post(
            format!("{base}/v1/reservations"),
            json!({
                "reservation_token": token,
                "issuer_id": issuer,
                "amount": amount,
                "desk": desk,
                "trader": "t-17",
                "hold_ttl_ms": null,
            }),
        )
        .await
    }

    pub async fn issuer(&self, base: &str, issuer: &str) -> Reply {
        self.get(format!("{base}/v1/issuers/{issuer}?consistency=strong"))
            .await
    }

    pub async fn token(&self, base: &str, token: &str, issuer: &str) -> Reply {
        self.get(format!(
            "{base}/v1/reservation-tokens/{token}?issuer_id={issuer}"
        ))
        .await
    }
}

/// One write of a [`Load`]: when it was sent and answered (since the load
/// started), its status, and the reservation id (or the error body).
#[derive(Clone, Debug)]
pub struct Write {
    pub token: String,
    pub sent: Duration,
    pub answered: Duration,
    pub status: u16,
    pub id: Option<String>,
    pub body: Value,
}

/// Four writers reserving 1 each against one issuer, through the gateways
/// in turn, one request at a time, for a while.
pub struct Load {
    pub start: std::time::Instant,
    writes: std::sync::Arc<std::sync::Mutex<Vec<Write>>>,
    writers: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    pub fn start(
        api: &std::sync::Arc<Api>,
        urls: &[String],
        issuer: &str,
        prefix: &str,
        duration: Duration,
    ) -> Load {
        let start = std::time::Instant::now();
        let writes = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let writers = (0..4)
            .map(|w| {
                let (api, writes) = (api.clone(), writes.clone());
                let (url, issuer) = (urls[w % urls.len()].clone(), issuer.to_string());
                let prefix = prefix.to_string();
                tokio::spawn(async move {
                    let mut i = 0;
                    while start.elapsed() < duration {
                        let token = format!("{prefix}-{w}-{i}");
                        i += 1;
                        let sent = start.elapsed();
                        let r = api.reserve(&url, &token, &issuer, 1, "desk").await;
                        let write = Write {
                            token,
                            sent,
                            answered: start.elapsed(),
                            status: r.status,
                            id: r.body["reservation_id"].as_str().map(String::from),
                            body: r.body,
                        };
                        writes.lock().unwrap().push(write);
                    }
                })
            })
            .collect();
        Load {
            start,
            writes,
            writers,
        }
    }

    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }

    /// Waits for the writers to finish; every write, in completion order.
    pub async fn finish(self) -> Vec<Write> {
        for writer in self.writers {
            writer.await.unwrap();
        }
        let writes = self.writes.lock().unwrap().clone();
        writes
    }
}

/// When the first write sent after `t` was acknowledged.
pub fn first_ack_after(writes: &[Write], t: Duration) -> Option<Duration> {
    writes
        .iter()
        .filter(|w| w.status == 201 && w.sent > t)
        .map(|w| w.answered)
        .min()
}

/// Every acknowledged write is committed under its token to the reservation
/// it was acknowledged with, and no token has two open reservations.
/// Returns how many reservations are open.
pub async fn check_acknowledged(
    api: &std::sync::Arc<Api>,
    url: &str,
    issuer: &str,
    writes: &[Write],
) -> usize {
    use futures::StreamExt;
    let acked: Vec<&Write> = writes.iter().filter(|w| w.status == 201).collect();
    let lookups = futures::stream::iter(acked.iter().map(|w| {
        let api = api.clone();
        async move { (*w, api.token(url, &w.token, issuer).await) }
    }))
    .buffer_unordered(32)
    .collect::<Vec<_>>()
    .await;
    for (write, reply) in lookups {
        assert_eq!(
            reply.body["status"], "committed",
            "{}: {}",
            write.token, reply.body
        );
        assert_eq!(
            reply.body["reservation_id"].as_str(),
            write.id.as_deref(),
            "{}",
            write.token
        );
    }
    let open = api
        .get(format!(
            "{url}/v1/issuers/{issuer}/open-reservations?consistency=strong"
        ))
        .await
        .body;
    let list = open["reservations"].as_array().unwrap();
    let mut tokens: Vec<&str> = list
        .iter()
        .map(|r| r["reservation_token"].as_str().unwrap())
        .collect();
    tokens.sort();
    let all = tokens.len();
    tokens.dedup();
    assert_eq!(all, tokens.len(), "a token has two reservations");
    assert!(list.len() >= acked.len());
    list.len()
}

/// A dev cluster on free ports in `dir`, ready to serve.
pub async fn start_dev(dir: &std::path::Path) -> DevCluster {
    let mut options = DevOptions::new(dir.to_path_buf());
    options.port = 0;
    let cluster = DevCluster::start(options)
        .await
        .expect("dev cluster starts");
    cluster
        .wait_ready(Duration::from_secs(30))
        .await
        .expect("dev cluster ready");
    cluster
}
