//! The change feed end to end on the dev cluster: every committed change
//! once, in the Debezium envelope, resumable from any line's cursor with
//! nothing lost or repeated; a following feed sees a write made after it
//! began and a resolved mark past it; bad parameters are refused.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::{start_dev, Api};
use harbor_api::{ChangeLine, FeedLine, ResolvedLine};

/// A whole feed that ends (`follow=false`), line by line.
async fn feed(api: &Api, base: &str, query: &str) -> Vec<FeedLine> {
    let url = format!("{base}/v1/changefeed?{query}");
    let response = api.client.get(&url).send().await.unwrap();
    assert_eq!(response.status().as_u16(), 200, "{url}");
    assert_eq!(
        response.headers()["content-type"].to_str().unwrap(),
        "application/x-ndjson"
    );
    let text = response.text().await.unwrap();
    text.lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{line}: {e}")))
        .collect()
}

fn changes(lines: &[FeedLine]) -> Vec<&ChangeLine> {
    lines
        .iter()
        .filter_map(|l| match l {
            FeedLine::Change(c) => Some(c),
            _ => None,
        })
        .collect()
}

fn position(c: &ChangeLine) -> (u32, u64, u32) {
    (c.source.shard, c.source.index, c.source.sub)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_feed_carries_every_change_once_and_resumes_from_any_cursor() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = start_dev(dir.path()).await;
    let (madrid, newyork) = (cluster.url("madrid"), cluster.url("newyork"));
    let api = Api::new();
    assert_eq!(
        api.put_issuer(&madrid, "MUNI-77", "newyork", 1_000)
            .await
            .status,
        201
    );
    assert_eq!(
        api.reserve(&madrid, "tok-1", "MUNI-77", 600, "madrid-rates")
            .await
            .status,
        201
    );
    let refused = api
        .reserve(&madrid, "tok-2", "MUNI-77", 600, "madrid-rates")
        .await;
    assert_eq!(refused.code(), "insufficient_exposure");
    assert_eq!(
        api.reserve(&madrid, "tok-3", "MUNI-77", 300, "madrid-rates")
            .await
            .status,
        201
    );

    // Everything, through the other region's gateway.
    let lines = feed(&api, &newyork, "from=beginning&follow=false").await;
    let all = changes(&lines);
    let ops: Vec<(&str, Option<&str>)> = all
        .iter()
        .map(|c| (c.op.as_str(), c.reservation_token.as_deref()))
        .collect();
    assert_eq!(
        ops,
        [
            ("issuer_registered", None),
            ("reservation_created", Some("tok-1")),
            ("reservation_rejected", Some("tok-2")),
            ("reservation_created", Some("tok-3")),
        ]
    );
    let created = all[1];
    assert_eq!(created.key.issuer_id, "MUNI-77");
    assert_eq!(created.key.reservation_id.as_deref(), Some("MUNI-77:r1"));
    assert_eq!(created.source.region, "newyork");
    assert_eq!(created.before, None);
    assert_eq!(created.after.as_ref().unwrap()["amount"], 600);
    let positions: BTreeSet<_> = all.iter().map(|c| position(c)).collect();
    assert_eq!(positions.len(), all.len(), "one change per position");
    // A feed that ends closes with a resolved mark.
    assert!(
        matches!(lines.last(), Some(FeedLine::Resolved(_))),
        "{lines:?}"
    );

    // From each change's cursor: exactly the changes after it.
    for (i, change) in all.iter().enumerate() {
        let query = format!("from={}&follow=false", change.cursor);
        let rest = feed(&api, &madrid, &query).await;
        let rest: Vec<_> = changes(&rest).into_iter().map(position).collect();
        let expected: Vec<_> = all[i + 1..].iter().map(|c| position(c)).collect();
        assert_eq!(rest, expected, "resumed after change {i}");
    }

    // One group only.
    let shard = created.source.shard;
    let one = feed(
        &api,
        &madrid,
        &format!("from=beginning&follow=false&shards={shard}"),
    )
    .await;
    assert_eq!(changes(&one).len(), all.len());
    let empty = feed(
        &api,
        &madrid,
        &format!("from=beginning&follow=false&shards={}", (shard + 1) % 16),
    )
    .await;
    assert!(changes(&empty).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_following_feed_sees_new_writes_and_resolved_marks_past_them() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = start_dev(dir.path()).await;
    let (madrid, newyork) = (cluster.url("madrid"), cluster.url("newyork"));
    let api = Api::new();
    assert_eq!(
        api.put_issuer(&madrid, "MUNI-9", "madrid", 1_000)
            .await
            .status,
        201
    );

    let url = format!("{newyork}/v1/changefeed?from=now&resolved_ms=50");
    let mut response = api.client.get(&url).send().await.unwrap();
    assert_eq!(response.status().as_u16(), 200);
    assert_eq!(
        api.reserve(&madrid, "tok-9", "MUNI-9", 10, "madrid-rates")
            .await
            .status,
        201
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut text = String::new();
    let mut seen: Option<ChangeLine> = None;
    let mut resolved_after: Option<ResolvedLine> = None;
    while resolved_after.is_none() {
        assert!(
            Instant::now() < deadline,
            "no change and resolved mark: {text}"
        );
        let chunk = tokio::time::timeout(Duration::from_secs(5), response.chunk())
            .await
            .expect("the feed keeps talking")
            .unwrap()
            .expect("the feed does not end");
        text.push_str(std::str::from_utf8(&chunk).unwrap());
        while let Some(end) = text.find('\n') {
            let line: FeedLine = serde_json::from_str(&text[..end]).unwrap();
            text.drain(..=end);
            match line {
                FeedLine::Change(c) => {
                    assert!(seen.is_none(), "a second change: {c:?}");
                    assert_eq!(c.reservation_token.as_deref(), Some("tok-9"));
                    seen = Some(c);
                }
                FeedLine::Resolved(r) => {
                    if let Some(c) = &seen {
                        if r.resolved >= c.source.hlc {
                            resolved_after = Some(r);
                        }
                    }
                }
                FeedLine::Error(e) => panic!("{e:?}"),
            }
        }
    }
    // The consumer goes away mid-stream; the gateway carries on.
    drop(response);
    let health = api.get(format!("{newyork}/v1/health")).await;
    assert_eq!(health.status, 200);
    // The resolved line's cursor resumes after the change.
    let cursor = resolved_after.unwrap().cursor;
    let rest = feed(&api, &madrid, &format!("from={cursor}&follow=false")).await;
    assert!(changes(&rest).is_empty(), "{rest:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_feed_parameters_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = start_dev(dir.path()).await;
    let madrid = cluster.url("madrid");
    let api = Api::new();
    let cases = [
        ("from=bogus", "invalid_cursor"),
        ("from=c1.0-1", "invalid_cursor"),
        ("from=c1.99-1-e", "invalid_cursor"),
        ("shards=99", "invalid_query"),
        ("shards=x", "invalid_query"),
        ("resolved_ms=1", "invalid_query"),
        ("follow=maybe", "invalid_query"),
        ("frm=now", "invalid_query"),
    ];
    for (query, code) in cases {
        let reply = api.get(format!("{madrid}/v1/changefeed?{query}")).await;
        assert_eq!(
            (reply.status, reply.code()),
            (400, code),
            "{query}: {}",
            reply.body
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cursor_older_than_what_is_kept_is_refused_with_where_to_continue() {
    let dir = tempfile::tempdir().unwrap();
    let mut options = harbor::dev::DevOptions::new(dir.path().to_path_buf());
    options.port = 0;
    // Room for a handful of changes per replica.
    options.tune_node = |config| config.changes_retained_bytes = 4 << 10;
    let cluster = harbor::dev::DevCluster::start(options).await.unwrap();
    cluster.wait_ready(Duration::from_secs(30)).await.unwrap();
    let madrid = cluster.url("madrid");
    let api = Api::new();
    assert_eq!(
        api.put_issuer(&madrid, "MUNI-1", "madrid", 1_000_000)
            .await
            .status,
        201
    );
    for i in 0..40 {
        let reply = api
            .reserve(&madrid, &format!("tok-{i}"), "MUNI-1", 1, "madrid-rates")
            .await;
        assert_eq!(reply.status, 201);
    }
    let shard = changes(&feed(&api, &madrid, "from=now&follow=false").await)
        .first()
        .map(|c| c.source.shard);
    assert!(shard.is_none(), "nothing after now");
    // From the beginning, the log no longer reaches back: the group's
    // current rows come first (`op: snapshot`), then its changes.
    let all = feed(&api, &madrid, "from=beginning&follow=false").await;
    let rows: Vec<&ChangeLine> = changes(&all)
        .into_iter()
        .filter(|c| c.key.issuer_id == "MUNI-1")
        .collect();
    assert_eq!(rows[0].op, "snapshot", "{:?}", rows[0]);
    assert_eq!(rows[0].key.reservation_id, None, "the issuer's row first");
    let snapshot_tokens: BTreeSet<_> = rows
        .iter()
        .filter(|c| c.op == "snapshot")
        .filter_map(|c| c.reservation_token.clone())
        .collect();
    assert_eq!(snapshot_tokens.len(), 40, "every reservation as it stands");
    assert!(
        matches!(all.last(), Some(FeedLine::Resolved(_))),
        "{:?}",
        &all[all.len().saturating_sub(2)..]
    );
    let shard = rows[0].source.shard;
    // A cursor older than what is kept, past the beginning, is refused
    // with where to continue.
    let reply = api
        .get(format!(
            "{madrid}/v1/changefeed?from=c1.{shard}-1-e&follow=false"
        ))
        .await;
    assert_eq!(
        (reply.status, reply.code()),
        (410, "cursor_expired"),
        "{}",
        reply.body
    );
    let oldest = reply.body["oldest_cursor"].as_str().unwrap().to_string();
    // From there on, the feed goes on, and every line it sends is after
    // the expired group's oldest kept position.
    let rest = feed(&api, &madrid, &format!("from={oldest}&follow=false")).await;
    let rest = changes(&rest);
    assert!(!rest.is_empty());
    assert!(rest.iter().all(|c| c.key.issuer_id == "MUNI-1"));
    let tokens: BTreeSet<_> = rest
        .iter()
        .filter_map(|c| c.reservation_token.clone())
        .collect();
    assert!(
        tokens.contains("tok-39"),
        "the newest change is there: {tokens:?}"
    );
    assert!(
        !tokens.contains("tok-0"),
        "the oldest was evicted: {tokens:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kept_changes_survive_snapshots_and_a_restart_of_every_node() {
    let dir = tempfile::tempdir().unwrap();
    let options = || {
        let mut options = harbor::dev::DevOptions::new(dir.path().to_path_buf());
        options.port = 0;
        // A snapshot every few entries: the log alone no longer reaches
        // back to the first change, only the history kept with the
        // snapshots does.
        options.tune_node = |config| config.snapshot_interval_entries = 8;
        options
    };
    let cluster = harbor::dev::DevCluster::start(options()).await.unwrap();
    cluster.wait_ready(Duration::from_secs(30)).await.unwrap();
    let api = Api::new();
    let madrid = cluster.url("madrid");
    assert_eq!(
        api.put_issuer(&madrid, "MUNI-9", "madrid", 1_000_000)
            .await
            .status,
        201
    );
    for i in 0..40 {
        let reply = api
            .reserve(&madrid, &format!("tok-{i}"), "MUNI-9", 1, "madrid-rates")
            .await;
        assert_eq!(reply.status, 201);
    }
    let before = feed(&api, &madrid, "from=beginning&follow=false").await;
    let before: Vec<ChangeLine> = changes(&before).into_iter().cloned().collect();
    assert_eq!(
        before.len(),
        41,
        "{:?}",
        before.iter().map(|c| &c.op).collect::<Vec<_>>()
    );
    let cursor = before[10].cursor.clone();
    cluster.shutdown().await;

    let cluster = harbor::dev::DevCluster::start(options()).await.unwrap();
    cluster.wait_ready(Duration::from_secs(30)).await.unwrap();
    let madrid = cluster.url("madrid");
    // From the beginning: the same changes, not a scan of the rows.
    let after = feed(&api, &madrid, "from=beginning&follow=false").await;
    let after = changes(&after);
    let ops: Vec<&str> = after.iter().map(|c| c.op.as_str()).collect();
    assert!(
        !ops.contains(&"snapshot"),
        "a scan, not the kept changes: {ops:?}"
    );
    assert_eq!(
        after.iter().map(|c| position(c)).collect::<Vec<_>>(),
        before.iter().map(position).collect::<Vec<_>>()
    );
    assert_eq!(after[0].op, "issuer_registered");
    // A cursor taken before the restart continues right after its line.
    let rest = feed(&api, &madrid, &format!("from={cursor}&follow=false")).await;
    let rest = changes(&rest);
    assert_eq!(
        rest.iter().map(|c| position(c)).collect::<Vec<_>>(),
        before[11..].iter().map(position).collect::<Vec<_>>()
    );
    cluster.shutdown().await;
}
