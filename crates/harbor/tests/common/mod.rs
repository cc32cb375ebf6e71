#![allow(dead_code)]

use std::time::Duration;

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
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(20))
                .build()
                .unwrap(),
        }
    }

    pub async fn send(&self, method: reqwest::Method, url: String, body: Option<Value>) -> Reply {
        let mut request = self.client.request(method, &url);
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
        self.get(format!("{base}/v1/issuers/{issuer}")).await
    }

    pub async fn token(&self, base: &str, token: &str, issuer: &str) -> Reply {
        self.get(format!(
            "{base}/v1/reservation-tokens/{token}?issuer_id={issuer}"
        ))
        .await
    }
}
