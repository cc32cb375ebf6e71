//! `harbor status --url URL`: the cluster view of `GET /v1/admin/cluster`
//! as tables.

use std::fmt::Write;

use anyhow::{bail, Context};
use harbor_gateway::ClusterView;

pub async fn status(url: &str, json: bool) -> anyhow::Result<()> {
    let endpoint = format!("{}/v1/admin/cluster", url.trim_end_matches('/'));
    let client = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(10))
        .build()?;
    let response = client
        .get(&endpoint)
        .send()
        .await
        .with_context(|| format!("asking {endpoint}"))?;
    let code = response.status();
    let text = response.text().await?;
    if !code.is_success() {
        bail!("{endpoint} answered {code}: {text}");
    }
    if json {
        println!("{text}");
        return Ok(());
    }
    let view: ClusterView = serde_json::from_str(&text)
        .with_context(|| format!("{endpoint} answered something that is not a cluster view"))?;
    print!("{}", render(&view));
    let base = url.trim_end_matches('/');
    match crate::projection::projection_status(&client, base, "reservations").await {
        Ok(p) => println!(
            "\nprojection {} ({}): {}, {} of {} groups scanning, {} reservations, {} changes applied",
            p.projection,
            p.region,
            match (p.watermark, p.lag_ms) {
                (Some(w), Some(lag)) => format!(
                    "watermark {}.{} (complete up to {lag} ms ago)",
                    w.wall_ms, w.logical
                ),
                _ => "being built (no watermark yet)".to_string(),
            },
            p.groups_scanning,
            p.groups,
            p.reservations,
            p.changes_applied
        ),
        Err(e) => println!("\nprojection: {e:#}"),
    }
    match hot_buckets(&client, base).await {
        Ok(text) => print!("\n{text}"),
        Err(e) => println!("\nhot buckets: {e:#}"),
    }
    Ok(())
}

/// Each group's load and the hottest buckets, from
/// `GET /v1/admin/buckets/hot?top=5`.
async fn hot_buckets(client: &reqwest::Client, base: &str) -> anyhow::Result<String> {
    let endpoint = format!("{base}/v1/admin/buckets/hot?top=5");
    let response = client.get(&endpoint).send().await?;
    let code = response.status();
    let body: serde_json::Value = response.json().await?;
    if !code.is_success() {
        bail!("{endpoint} answered {code}: {body}");
    }
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<8} {:<10} {:>9} {:>11} {:>8}  HOTTEST BUCKETS (writes/s, share of the group's)",
        "GROUP", "HOME", "WRITES/S", "BYTES/S", "READS/S"
    );
    for g in body["groups"].as_array().into_iter().flatten() {
        let shard = g["shard"].as_str().unwrap_or("?");
        if let Some(error) = g["error"].as_str() {
            let _ = writeln!(out, "{shard:<8} no load report: {error}");
            continue;
        }
        let hottest: Vec<String> = (g["buckets"].as_array().into_iter().flatten())
            .take(3)
            .map(|b| {
                format!(
                    "{} {}/s {}%",
                    b["bucket"], b["writes_per_s"], b["share_of_group_writes_percent"]
                )
            })
            .collect();
        let _ = writeln!(
            out,
            "{shard:<8} {:<10} {:>9} {:>11} {:>8}  {}",
            g["home_region"].as_str().unwrap_or("?"),
            // (A `Value`'s `Display` ignores widths.)
            g["writes_per_s"].to_string(),
            g["bytes_per_s"].to_string(),
            g["reads_per_s"].to_string(),
            hottest.join(", ")
        );
    }
    let rebalancer = &body["rebalancer"];
    let _ = writeln!(
        out,
        "rebalancer {} (this gateway's region){}",
        if rebalancer["enabled"] == true {
            "on"
        } else {
            "off"
        },
        match rebalancer["last"].as_object() {
            Some(last) => {
                let outcome = &last["outcome"];
                let outcome = match outcome["error"].as_str() {
                    Some(error) => format!("failed: {error}"),
                    None => format!("pause {} ms", outcome["pause_ms"]),
                };
                format!(
                    "; last moved bucket {} from {} to {} ({outcome}): {}",
                    last["bucket"],
                    last["from"].as_str().unwrap_or("?"),
                    last["to"].as_str().unwrap_or("?"),
                    last["reason"].as_str().unwrap_or("")
                )
            }
            None => String::new(),
        }
    );
    Ok(out)
}

/// The view as two tables: nodes, then groups with their followers' lag.
/// (Ids are turned into strings first: their `Display` ignores widths.)
pub fn render(view: &ClusterView) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "map version {}, regions {}, gathered by {} in {} ms",
        view.map_version,
        view.regions
            .iter()
            .map(|r| r.to_string())
            .collect::<Vec<_>>()
            .join(", "),
        view.gateway,
        view.gathered_ms
    );
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "{:<14} {:<10} {:<12} REPLICAS",
        "NODE", "REGION", "HEALTH"
    );
    for n in &view.nodes {
        let _ = writeln!(
            out,
            "{:<14} {:<10} {:<12} {}/{} answering",
            n.node.to_string(),
            n.region.to_string(),
            n.health,
            n.replicas_answering,
            n.replicas
        );
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "{:<8} {:<10} {:<14} {:>4} {:<6} {:>8}  FOLLOWERS (lag entries/ms, staleness ms)",
        "GROUP", "HOME", "LEADER", "GEN", "READY", "COMMIT"
    );
    for g in &view.groups {
        let followers = if g.followers.is_empty() {
            "leader not answering".to_string()
        } else {
            g.followers
                .iter()
                .map(|f| {
                    // As the follower itself sees it: how old its state may be.
                    let staleness = g
                        .replicas
                        .iter()
                        .find(|r| r.node == f.node)
                        .and_then(|r| r.staleness_ms)
                        .map_or("-".to_string(), |s| s.to_string());
                    format!(
                        "{}{} {}/{}, {}",
                        f.node,
                        if f.local { "" } else { "*" },
                        f.lag_entries,
                        f.lag_ms,
                        staleness
                    )
                })
                .collect::<Vec<_>>()
                .join("  ")
        };
        let _ = writeln!(
            out,
            "{:<8} {:<10} {:<14} {:>4} {:<6} {:>8}  {}",
            format!("shard{}", g.shard),
            g.home_region,
            g.leader,
            g.generation,
            if g.leader_ready { "yes" } else { "no" },
            g.commit_index.map_or("-".into(), |c| c.to_string()),
            followers
        );
    }
    let _ = writeln!(out, "(* = remote, asynchronous follower)");
    out
}
