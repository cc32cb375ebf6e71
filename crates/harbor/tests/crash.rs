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

/// Runs `harbor dev` on `dir` expecting it to refuse to start: returns its
/// stderr once it exited with an error (panics if it serves instead).
fn dev_refuses(dir: &std::path::Path, port: u16) -> String {
    let mut child = Command::new(env!("CARGO_BIN_EXE_harbor"))
        .args(["dev", "--port", &port.to_string(), "--data-dir"])
        .arg(dir)
        .env("RUST_BACKTRACE", "0")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("harbor dev starts");
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("harbor dev kept running on {}", dir.display());
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(!status.success(), "harbor dev exited 0: {stderr}");
    stderr
}

/// Every file under `dir` with its bytes, to show a refusal changed nothing.
fn tree(dir: &std::path::Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(at) = stack.pop() {
        for entry in std::fs::read_dir(&at).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                out.push((path.clone(), std::fs::read(&path).unwrap()));
            }
        }
    }
    out.sort();
    out
}

/// Rewrites every record of every WAL segment under `dir` as format
/// version `version`, checksums recomputed: what another release would
/// have written.
fn rewrite_wal_records_as_version(dir: &std::path::Path, version: u8) -> usize {
    let mut rewritten = 0;
    for (path, mut bytes) in tree(dir) {
        if path.extension().and_then(|e| e.to_str()) != Some("seg") {
            continue;
        }
        let mut at = 0;
        while at + 32 <= bytes.len() && bytes[at + 8] != 0 {
            let len = u32::from_le_bytes(bytes[at + 4..at + 8].try_into().unwrap()) as usize;
            let end = at + 32 + len;
            bytes[at + 9] = version;
            let crc = crc32c::crc32c(&bytes[at + 4..end]);
            bytes[at..at + 4].copy_from_slice(&crc.to_le_bytes());
            at = end;
            rewritten += 1;
        }
        std::fs::write(&path, &bytes).unwrap();
    }
    rewritten
}

/// A second `harbor dev` on a directory in use, data of a format this
/// binary does not know (the directory's marker, or the WAL's records), are
/// refused with a clear error, and the data is left as it was; the first
/// process keeps serving, and the cluster comes back on its own data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_directory_in_use_or_of_another_format_is_refused_and_left_as_it_was() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port_pair();
    let madrid = format!("http://127.0.0.1:{port}");
    let api = Arc::new(Api::new());
    let mut process = DevProcess::spawn(dir.path(), port);
    wait_healthy(&api, &madrid).await;
    let r = api.put_issuer(&madrid, "FMT-1", "madrid", 1_000).await;
    assert_eq!(r.status, 201, "{}", r.body);
    let r = api.reserve(&madrid, "fmt-tok", "FMT-1", 7, "desk").await;
    assert_eq!(r.status, 201, "{}", r.body);

    // A second process on the same directory.
    let stderr = dev_refuses(dir.path(), free_port_pair());
    assert!(
        stderr.contains("in use by another Harbor process"),
        "{stderr}"
    );
    let view = api
        .get(format!("{madrid}/v1/issuers/FMT-1?consistency=strong"))
        .await;
    assert_eq!(view.status, 200, "{}", view.body);
    assert_eq!(view.body["reserved"], 7);
    process.kill();

    // WAL records of another format version: never a torn tail to cut.
    let saved = tree(&dir.path().join("nodes"));
    assert!(rewrite_wal_records_as_version(&dir.path().join("nodes"), 2) > 0);
    let rewritten = tree(&dir.path().join("nodes"));
    let stderr = dev_refuses(dir.path(), port);
    assert!(stderr.contains("format version 2"), "{stderr}");
    assert!(
        tree(&dir.path().join("nodes")) == rewritten,
        "the replicas' data changed"
    );
    for (path, bytes) in &saved {
        std::fs::write(path, bytes).unwrap();
    }

    // The directory's own marker names another format.
    let marker = dir.path().join("HARBOR_FORMAT");
    let original = std::fs::read_to_string(&marker).unwrap();
    std::fs::write(&marker, original.replace("format = 1", "format = 2")).unwrap();
    let before = tree(dir.path());
    let stderr = dev_refuses(dir.path(), port);
    assert!(stderr.contains("holds data of format 2"), "{stderr}");
    assert!(tree(dir.path()) == before, "the data directory changed");
    std::fs::write(&marker, original).unwrap();

    // Put back as it was, the cluster serves its data again.
    let _process = DevProcess::spawn(dir.path(), port);
    wait_healthy(&api, &madrid).await;
    let view = api
        .get(format!("{madrid}/v1/issuers/FMT-1?consistency=strong"))
        .await;
    assert_eq!(view.status, 200, "{}", view.body);
    assert_eq!(view.body["reserved"], 7);
}
