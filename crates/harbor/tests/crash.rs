//! `harbor dev` as a child process, killed with SIGKILL under load and
//! restarted on its data directory: every reservation that got a 201 before
//! the kill is still there, under its token.

mod common;

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::Api;

/// Two consecutive free loopback ports (the dev gateways use P and P+1).
fn free_port_pair() -> u16 {
    for _ in 0..100 {
        let first = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = first.local_addr().unwrap().port();
        if port < u16::MAX && TcpListener::bind(("127.0.0.1", port + 1)).is_ok() {
            return port;
        }
    }
    panic!("no two consecutive free ports");
}

struct DevProcess {
    child: Child,
}

impl DevProcess {
    fn spawn(dir: &std::path::Path, port: u16) -> DevProcess {
        let child = Command::new(env!("CARGO_BIN_EXE_harbor"))
            .args(["dev", "--port", &port.to_string(), "--data-dir"])
            .arg(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("harbor dev starts");
        DevProcess { child }
    }

    fn kill(&mut self) {
        // std's kill is SIGKILL on Unix: no chance to flush anything.
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for DevProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn wait_healthy(api: &Api, base: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(r) = api.client.get(format!("{base}/v1/health")).send().await {
            if r.status() == 200 {
                return;
            }
        }
        assert!(Instant::now() < deadline, "harbor dev never became healthy");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_under_load_loses_no_acknowledged_reservation() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port_pair();
    let madrid = format!("http://127.0.0.1:{port}");
    let newyork = format!("http://127.0.0.1:{}", port + 1);
    let api = Arc::new(Api::new());

    let mut process = DevProcess::spawn(dir.path(), port);
    wait_healthy(&api, &madrid).await;
    let issuers = ["K-1", "K-2", "K-3", "K-4"];
    for (i, issuer) in issuers.iter().enumerate() {
        let home = if i % 2 == 0 { "madrid" } else { "newyork" };
        let r = api.put_issuer(&madrid, issuer, home, 1_000_000).await;
        assert_eq!(r.status, 201, "{}", r.body);
    }

    let acknowledged = Arc::new(Mutex::new(Vec::new()));
    let mut writers = Vec::new();
    for w in 0..8 {
        let api = api.clone();
        let acknowledged = acknowledged.clone();
        let base = if w % 2 == 0 {
            madrid.clone()
        } else {
            newyork.clone()
        };
        writers.push(tokio::spawn(async move {
            for i in 0.. {
                let token = format!("w{w}-{i}");
                let issuer = issuers[(w + i) % issuers.len()];
                let body = serde_json::json!({
                    "reservation_token": token, "issuer_id": issuer, "amount": 3,
                    "desk": "d", "trader": "t",
                });
                let sent = api
                    .client
                    .post(format!("{base}/v1/reservations"))
                    .json(&body)
                    .send()
                    .await;
                let Ok(response) = sent else { return };
                if response.status().as_u16() == 201 {
                    let Ok(body) = response.json::<serde_json::Value>().await else {
                        return;
                    };
                    acknowledged.lock().unwrap().push((
                        token,
                        issuer,
                        body["reservation_id"].as_str().unwrap().to_string(),
                    ));
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    process.kill();
    for writer in writers {
        let _ = writer.await;
    }
    let acknowledged = acknowledged.lock().unwrap().clone();
    assert!(
        acknowledged.len() > 20,
        "too little load before the kill: {}",
        acknowledged.len()
    );

    let _process = DevProcess::spawn(dir.path(), port);
    wait_healthy(&api, &madrid).await;
    for (token, issuer, id) in &acknowledged {
        let reply = api.token(&newyork, token, issuer).await;
        assert_eq!(reply.body["status"], "committed", "{token}: {}", reply.body);
        assert_eq!(reply.body["reservation_id"].as_str(), Some(id.as_str()));
        let reservation = api
            .get(format!("{madrid}/v1/reservations/{id}?consistency=strong"))
            .await;
        assert_eq!(reservation.status, 200, "{}", reservation.body);
        assert_eq!(
            reservation.body["reservation_token"].as_str(),
            Some(token.as_str())
        );
    }
    // And the books balance: every committed token is counted once.
    for issuer in issuers {
        let view = api.issuer(&madrid, issuer).await.body;
        let open = api
            .get(format!(
                "{madrid}/v1/issuers/{issuer}/open-reservations?consistency=strong"
            ))
            .await
            .body;
        let sum: u64 = open["reservations"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["amount"].as_u64().unwrap())
            .sum();
        assert_eq!(view["reserved"].as_u64().unwrap(), sum);
    }
}
