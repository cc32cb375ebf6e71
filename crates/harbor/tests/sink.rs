//! `harbor changefeed` into a real nats-server (JetStream): every change
//! stored once, across a sink that crashes mid-stream and starts again
//! before its first checkpoint (everything it published is published
//! again). `.ci/run` installs Debian's nats-server.

mod common;

use std::collections::BTreeSet;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{start_dev, Api};
use harbor::sink::{run_sink, SinkOptions, SinkStats, SinkTarget};
use harbor_api::FeedLine;
use tokio::sync::watch;

/// A nats-server with JetStream on a free loopback port, stopped on drop.
struct Nats {
    child: Child,
    url: String,
}

impl Nats {
    fn start(dir: &std::path::Path) -> Nats {
        let binary = ["/usr/sbin/nats-server", "/usr/bin/nats-server"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .expect("nats-server is installed (.ci/run installs Debian's nats-server)");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(binary)
            .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server starts");
        Nats {
            child,
            url: format!("nats://127.0.0.1:{port}"),
        }
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Every change position the cluster holds now, from its own feed.
async fn positions(api: &Api, base: &str) -> BTreeSet<String> {
    let url = format!("{base}/v1/changefeed?from=beginning&follow=false");
    let text = api
        .client
        .get(&url)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .filter_map(|line| match serde_json::from_str(line).unwrap() {
            FeedLine::Change(c) => Some(format!(
                "{}-{}-{}",
                c.source.shard, c.source.index, c.source.sub
            )),
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_nats_sink_stores_every_change_once_across_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let nats = Nats::start(&dir.path().join("nats"));
    let cluster = start_dev(&dir.path().join("cluster")).await;
    let madrid = cluster.url("madrid");
    let api = Api::new();
    for issuer in ["A-1", "A-2", "A-3"] {
        assert_eq!(
            api.put_issuer(&madrid, issuer, "madrid", 1_000_000)
                .await
                .status,
            201
        );
    }
    let write = |from: usize, to: usize| {
        let (api, madrid) = (&api, &madrid);
        async move {
            for i in from..to {
                let issuer = ["A-1", "A-2", "A-3"][i % 3];
                let reply = api
                    .reserve(madrid, &format!("tok-{i}"), issuer, 10, "madrid-rates")
                    .await;
                assert_eq!(reply.status, 201, "{}", reply.body);
            }
        }
    };
    write(0, 30).await;

    // nats-server takes a moment to listen.
    let deadline = Instant::now() + Duration::from_secs(20);
    let client = loop {
        match async_nats::connect(&nats.url).await {
            Ok(client) => break client,
            Err(e) => {
                assert!(
                    Instant::now() < deadline,
                    "nats-server does not answer: {e}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    let options = SinkOptions {
        urls: vec![madrid.clone()],
        target: SinkTarget::Nats {
            url: nats.url.clone(),
            stream: "HARBOR".into(),
            subject_prefix: "harbor".into(),
            duplicate_window: Duration::from_secs(120),
        },
        checkpoint: dir.path().join("sink.cursor"),
        from: "beginning".into(),
        shards: None,
    };

    // A first sink, killed mid-stream (no goodbye, no final checkpoint)
    // once it published something.
    let first = Arc::new(SinkStats::default());
    let (_stop_first, stop) = watch::channel(false);
    let task = tokio::spawn(run_sink(options.clone(), first.clone(), stop));
    let deadline = Instant::now() + Duration::from_secs(20);
    while first.published.load(Ordering::Relaxed) < 10 {
        assert!(Instant::now() < deadline, "the sink published nothing");
        assert!(!task.is_finished(), "the sink stopped: {:?}", task.await);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    task.abort();
    let _ = task.await;
    // The worst crash: everything it published after its first line was
    // stored, but no checkpoint was: the next sink starts over.
    let _ = std::fs::remove_file(&options.checkpoint);
    write(30, 60).await;

    // A second one resumes from the checkpoint.
    let second = Arc::new(SinkStats::default());
    let (stop_second, stop) = watch::channel(false);
    let task = tokio::spawn(run_sink(options.clone(), second.clone(), stop));
    let expected = positions(&api, &madrid).await;
    assert!(expected.len() >= 63, "{} changes", expected.len());
    let js = async_nats::jetstream::new(client);
    let deadline = Instant::now() + Duration::from_secs(30);
    let stored = loop {
        let mut stream = js.get_stream("HARBOR").await.unwrap();
        let info = stream.info().await.unwrap();
        let mut ids = Vec::new();
        for seq in 1..=info.state.last_sequence {
            let message = stream.get_raw_message(seq).await.unwrap();
            if message.subject.starts_with("harbor.changes.") {
                let id = message
                    .headers
                    .get("Nats-Msg-Id")
                    .unwrap()
                    .as_str()
                    .to_string();
                ids.push(id);
            }
        }
        if ids.len() >= expected.len() || Instant::now() >= deadline {
            break ids;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    stop_second.send(true).unwrap();
    task.await.unwrap().unwrap();
    let unique: BTreeSet<String> = stored.iter().cloned().collect();
    assert_eq!(unique.len(), stored.len(), "a change stored twice");
    assert_eq!(
        unique, expected,
        "JetStream holds every change, and only those"
    );
    // What the first sink stored (at least what it saw acknowledged), the
    // second published again and JetStream dropped by its Nats-Msg-Id.
    assert!(
        second.duplicates.load(Ordering::Relaxed) >= first.published.load(Ordering::Relaxed),
        "duplicates {}, first published {}",
        second.duplicates.load(Ordering::Relaxed),
        first.published.load(Ordering::Relaxed)
    );
    println!(
        "first sink: {} published; second: {} published, {} duplicates dropped",
        first.published.load(Ordering::Relaxed),
        second.published.load(Ordering::Relaxed),
        second.duplicates.load(Ordering::Relaxed)
    );
}

/// A webhook receiver that refuses every third batch: what it kept, by
/// position, and how many lines came twice.
#[derive(Default)]
struct Receiver {
    positions: BTreeSet<String>,
    repeats: u64,
    batches: u64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_webhook_sink_delivers_every_change_through_refused_batches() {
    use axum::routing::post;
    use std::sync::Mutex;

    let dir = tempfile::tempdir().unwrap();
    let cluster = start_dev(dir.path()).await;
    let madrid = cluster.url("madrid");
    let api = Api::new();
    assert_eq!(
        api.put_issuer(&madrid, "W-1", "madrid", 1_000_000)
            .await
            .status,
        201
    );
    for i in 0..40 {
        let reply = api
            .reserve(&madrid, &format!("w-{i}"), "W-1", 1, "madrid-rates")
            .await;
        assert_eq!(reply.status, 201);
    }
    let received = Arc::new(Mutex::new(Receiver::default()));
    let app = axum::Router::new().route(
        "/hook",
        post({
            let received = received.clone();
            move |body: axum::Json<serde_json::Value>| {
                let received = received.clone();
                async move {
                    let mut r = received.lock().unwrap();
                    r.batches += 1;
                    if r.batches % 3 == 0 {
                        return axum::http::StatusCode::SERVICE_UNAVAILABLE;
                    }
                    for line in body["lines"].as_array().unwrap() {
                        if line["kind"] == "change" {
                            let s = &line["source"];
                            let id = format!("{}-{}-{}", s["shard"], s["index"], s["sub"]);
                            if !r.positions.insert(id) {
                                r.repeats += 1;
                            }
                        }
                    }
                    axum::http::StatusCode::NO_CONTENT
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook = format!("http://{}/hook", listener.local_addr().unwrap());
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    let options = SinkOptions {
        urls: vec![madrid.clone()],
        target: SinkTarget::Webhook { url: hook },
        checkpoint: dir.path().join("hook.cursor"),
        from: "beginning".into(),
        shards: None,
    };
    let stats = Arc::new(SinkStats::default());
    let (stop_tx, stop) = watch::channel(false);
    let task = tokio::spawn(run_sink(options, stats.clone(), stop));
    let expected = positions(&api, &madrid).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    // Resolved marks keep batches coming, so some are refused.
    let done = || {
        let r = received.lock().unwrap();
        r.positions.len() >= expected.len() && r.batches >= 4
    };
    while !done() {
        assert!(
            Instant::now() < deadline,
            "the webhook did not get every change"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop_tx.send(true).unwrap();
    task.await.unwrap().unwrap();
    server.abort();
    let r = received.lock().unwrap();
    assert_eq!(r.positions, expected, "every change, and only those");
    assert_eq!(
        r.repeats, 0,
        "a refused batch was not kept, so nothing came twice"
    );
}
