//! `harbor bench cdc`: how soon an acknowledged write shows on the change
//! feed of the other region's gateway, and whether the feed keeps up. It
//! follows `GET /v1/changefeed?from=now` on the reader gateway while
//! writers load the issuers' home region through the batch API, and
//! measures, per reservation, the time from its acknowledgement to the
//! arrival of its `reservation_created` line (a line that arrives before
//! the acknowledgement counts as 0). Every acknowledged reservation must
//! arrive exactly once.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use harbor_api::FeedLine;
use serde_json::json;

use super::{histogram, micros, BenchCluster, Latency};

#[derive(Clone, Debug)]
pub struct CdcOptions {
    /// The gateway the feed is read from; `None` (with `writer`): start a
    /// dev cluster and read through `newyork`.
    pub reader: Option<String>,
    /// A gateway in the issuers' home region.
    pub writer: Option<String>,
    pub home_region: String,
    pub issuers: usize,
    pub writers: usize,
    /// Reservations per request (the batch API).
    pub batch: usize,
    pub seconds: u64,
    pub json: Option<PathBuf>,
    /// Run the dev cluster's gateways without their projections (to
    /// measure what the projections cost); no search is probed.
    pub without_projections: bool,
    /// How often the dev cluster's gateways save their projections.
    pub projection_save_ms: u64,
}

#[derive(Default)]
struct Seen {
    /// Token → when its change line arrived.
    arrived: HashMap<String, Instant>,
    repeated: u64,
    changes: u64,
    resolved: u64,
}

pub async fn cdc(options: CdcOptions) -> anyhow::Result<()> {
    let mut dev = None;
    let (reader, writer) = match (&options.reader, &options.writer) {
        (Some(r), Some(w)) => (
            r.trim_end_matches('/').to_string(),
            w.trim_end_matches('/').to_string(),
        ),
        (None, None) => {
            let (without, save_ms) = (options.without_projections, options.projection_save_ms);
            let started = BenchCluster::start(|o| {
                o.gateway.projections = !without;
                o.gateway.projection_save_ms = save_ms;
            })
            .await?;
            let other = if options.home_region == "madrid" {
                "newyork"
            } else {
                "madrid"
            };
            let urls = (
                started.cluster.url(other),
                started.cluster.url(&options.home_region),
            );
            dev = Some(started);
            urls
        }
        _ => bail!("give both --reader and --writer, or neither (a dev cluster is started)"),
    };
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .build()?;
    let issuers: Vec<String> = (0..options.issuers)
        .map(|i| format!("CDC-{}-{i}", options.home_region.to_uppercase()))
        .collect();
    super::register_issuers(&http, &writer, &issuers, &options.home_region).await?;

    // The feed, from now, on the other region's gateway.
    let seen = Arc::new(Mutex::new(Seen::default()));
    let mut feed = http
        .get(format!("{reader}/v1/changefeed?from=now&resolved_ms=100"))
        .send()
        .await
        .with_context(|| format!("opening the feed on {reader}"))?;
    if !feed.status().is_success() {
        bail!(
            "the feed on {reader} answered {}: {}",
            feed.status(),
            feed.text().await?
        );
    }
    let reading = {
        let seen = seen.clone();
        tokio::spawn(async move {
            let mut text = String::new();
            while let Ok(Some(chunk)) = feed.chunk().await {
                let now = Instant::now();
                text.push_str(&String::from_utf8_lossy(&chunk));
                let mut seen = seen.lock().unwrap();
                while let Some(end) = text.find('\n') {
                    let raw: String = text.drain(..=end).collect();
                    match serde_json::from_str::<FeedLine>(raw.trim_end()) {
                        Ok(FeedLine::Change(c)) => {
                            seen.changes += 1;
                            if c.op == "reservation_created" {
                                let token = c.reservation_token.unwrap_or_default();
                                if seen.arrived.insert(token, now).is_some() {
                                    seen.repeated += 1;
                                }
                            }
                        }
                        Ok(FeedLine::Resolved(_)) => seen.resolved += 1,
                        Ok(FeedLine::Error(e)) => {
                            eprintln!("the feed stopped: {} {}", e.error, e.message);
                            return;
                        }
                        Err(e) => {
                            eprintln!("a line that is not a feed line: {e}");
                            return;
                        }
                    }
                }
            }
        })
    };

    eprintln!(
        "{} writers, batches of {}, {} s; the feed is read through {reader} ...",
        options.writers, options.batch, options.seconds
    );
    let acked: Arc<Mutex<Vec<Acked>>> = Arc::default();
    let started = Instant::now();
    let until = started + Duration::from_secs(options.seconds);
    let searching = tokio::spawn(probe_search(
        http.clone(),
        reader.clone(),
        acked.clone(),
        if options.without_projections {
            started
        } else {
            until
        },
    ));
    let mut tasks = Vec::new();
    for w in 0..options.writers {
        let (http, writer, issuers, acked) =
            (http.clone(), writer.clone(), issuers.clone(), acked.clone());
        let batch = options.batch.max(1);
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            let mut errors = 0u64;
            while Instant::now() < until {
                let items: Vec<_> = (0..batch)
                    .map(|i| {
                        n += 1;
                        let issuer = &issuers[(n as usize + i) % issuers.len()];
                        json!({"reservation_token": format!("cdc-{w}-{n}"), "issuer_id": issuer,
                               "amount": 1, "desk": "bench", "trader": "cdc"})
                    })
                    .collect();
                let tokens: Vec<String> = items
                    .iter()
                    .map(|i| i["reservation_token"].as_str().unwrap().to_string())
                    .collect();
                let answer = http
                    .post(format!("{writer}/v1/reservations:batch"))
                    .json(&json!({ "reservations": items }))
                    .send()
                    .await;
                let now = Instant::now();
                let Ok(answer) = answer else {
                    errors += 1;
                    continue;
                };
                let Ok(body) = answer.json::<harbor_api::BatchAnswer>().await else {
                    errors += 1;
                    continue;
                };
                let mut acked = acked.lock().unwrap();
                for (item, token) in body.results.iter().zip(tokens) {
                    match &item.outcome {
                        harbor_api::BatchOutcome::Reserved(r) if item.ok => acked.push(Acked {
                            token,
                            at: now,
                            issuer: r.issuer_id.clone(),
                            commit_token: r.created.map(|c| c.to_string()).unwrap_or_default(),
                        }),
                        _ => errors += 1,
                    }
                }
            }
            errors
        }));
    }
    let mut errors = 0;
    for task in tasks {
        errors += task.await?;
    }
    let wrote_for = started.elapsed();
    let acked: Vec<(String, Instant)> = std::mem::take(&mut *acked.lock().unwrap())
        .into_iter()
        .map(|a| (a.token, a.at))
        .collect();
    let search = searching.await??;
    let search_latency = Latency::of(&search.visible);
    // Give the feed time to deliver the last writes.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let missing = {
            let seen = seen.lock().unwrap();
            acked
                .iter()
                .filter(|(t, _)| !seen.arrived.contains_key(t))
                .count()
        };
        if missing == 0 || Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    reading.abort();
    let seen = std::mem::take(&mut *seen.lock().unwrap());
    let mut visible = histogram();
    let mut missing = 0u64;
    for (token, at) in &acked {
        match seen.arrived.get(token) {
            Some(arrived) => {
                visible.record(micros(arrived.saturating_duration_since(*at)))?;
            }
            None => missing += 1,
        }
    }
    let latency = Latency::of(&visible);
    let secs = wrote_for.as_secs_f64();
    println!(
        "wrote {} reservations in {secs:.1} s ({:.0}/s, {errors} errors); the feed on {reader} carried {} changes ({:.0}/s) and {} resolved marks",
        acked.len(),
        acked.len() as f64 / secs,
        seen.changes,
        seen.changes as f64 / secs,
        seen.resolved,
    );
    println!(
        "acknowledged -> on the other region's feed: p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, max {:.1} ms; {missing} missing, {} repeated",
        latency.p50_ms, latency.p90_ms, latency.p99_ms, latency.max_ms, seen.repeated
    );
    println!(
        "acknowledged -> found by the other region's search (min_as_of, {} probes): p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, max {:.1} ms; {} not found, {} refused",
        search.visible.len(),
        search_latency.p50_ms,
        search_latency.p90_ms,
        search_latency.p99_ms,
        search_latency.max_ms,
        search.not_found,
        search.refused
    );
    if let Some(path) = &options.json {
        let doc = json!({
            "command": std::env::args().collect::<Vec<_>>().join(" "),
            "reader": reader, "writer": writer, "home_region": options.home_region,
            "issuers": options.issuers, "writers": options.writers, "batch": options.batch,
            "seconds": secs, "reservations": acked.len(), "errors": errors,
            "feed_changes": seen.changes, "resolved_marks": seen.resolved,
            "missing": missing, "repeated": seen.repeated, "visible_latency": latency,
            "search_probes": search.visible.len(), "search_not_found": search.not_found,
            "search_refused": search.refused, "search_visible_latency": search_latency,
        });
        std::fs::write(path, serde_json::to_string_pretty(&doc)? + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(dev) = dev {
        dev.stop().await;
    }
    if search.not_found > 0 || search.refused > 0 {
        bail!(
            "the search did not find {} acknowledged reservations it said it included, and refused {} probes",
            search.not_found,
            search.refused
        );
    }
    if missing > 0 || seen.repeated > 0 {
        bail!(
            "the feed lost {missing} acknowledged reservations and repeated {}",
            seen.repeated
        );
    }
    Ok(())
}

/// An acknowledged reservation.
struct Acked {
    token: String,
    at: Instant,
    issuer: String,
    commit_token: String,
}

/// What the search prober saw.
struct SearchProbes {
    /// Acknowledgement to the search's answer that includes it.
    visible: hdrhistogram::Histogram<u64>,
    /// Answers that said they included the write but did not show it.
    not_found: u64,
    /// Probes answered with an error (`not_yet_visible` after 5 s, ...).
    refused: u64,
}

/// Every 50 ms until `until`, asks the reader's search for the newest
/// acknowledged reservation with `min_as_of` its commit token, and times
/// its acknowledgement to the answer.
async fn probe_search(
    http: reqwest::Client,
    reader: String,
    acked: Arc<Mutex<Vec<Acked>>>,
    until: Instant,
) -> anyhow::Result<SearchProbes> {
    let mut probes = Vec::new();
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let newest = acked.lock().unwrap().last().map(|a| {
            (
                a.token.clone(),
                a.at,
                a.issuer.clone(),
                a.commit_token.clone(),
            )
        });
        let Some((token, at, issuer, commit_token)) = newest else {
            continue;
        };
        let url = format!(
            "{reader}/v1/search/reservations?issuer_id={issuer}&limit=1000&min_as_of={commit_token}&wait_ms=5000"
        );
        let http = http.clone();
        probes.push(tokio::spawn(async move {
            let answer = http.get(&url).send().await.ok()?;
            let arrived = Instant::now();
            if !answer.status().is_success() {
                return Some(None);
            }
            let body: harbor_api::SearchAnswer = answer.json().await.ok()?;
            let found = body
                .reservations
                .iter()
                .any(|r| r.reservation_token == token);
            Some(Some((found, arrived.saturating_duration_since(at))))
        }));
    }
    let mut result = SearchProbes {
        visible: histogram(),
        not_found: 0,
        refused: 0,
    };
    for probe in probes {
        match probe.await? {
            Some(Some((true, waited))) => result.visible.record(micros(waited))?,
            Some(Some((false, _))) => result.not_found += 1,
            _ => result.refused += 1,
        }
    }
    Ok(result)
}
