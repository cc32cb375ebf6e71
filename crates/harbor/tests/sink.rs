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
use harbor::sink::{run_sink, SinkOptions, SinkStats};
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
        nats: nats.url.clone(),
        stream: "HARBOR".into(),
        subject_prefix: "harbor".into(),
        checkpoint: dir.path().join("sink.cursor"),
        from: "beginning".into(),
        shards: None,
        duplicate_window: Duration::from_secs(120),
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
