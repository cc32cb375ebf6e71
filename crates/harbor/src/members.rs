//! `harbor members add|remove GROUP NODE` and `harbor drain NODE`: a
//! group's replicas changed through a gateway's admin API, with progress
//! printed while a change (or a drain, which may take minutes) runs.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::{json, Value};

/// Adds (`add`) or removes a replica of `group` on `node`.
pub async fn change(url: &str, group: &str, node: &str, add: bool) -> anyhow::Result<()> {
    let base = url.trim_end_matches('/');
    let group = group.strip_prefix("shard").unwrap_or(group);
    let endpoint = format!("{base}/v1/admin/groups/{group}/members");
    let body = match add {
        true => json!({ "add": node }),
        false => json!({ "remove": node }),
    };
    let what = if add { "adding" } else { "removing" };
    eprintln!("{what} the replica of shard{group} on {node} through {base} ...");
    let answer = post_with_progress(&endpoint, &body, base, node).await?;
    println!(
        "shard{group}: {} {node} in {} ms; voters now {} (membership epoch {})",
        if add { "added" } else { "removed" },
        answer["took_ms"],
        answer["members"],
        answer["members_epoch"],
    );
    Ok(())
}

/// Takes every replica off `node`.
pub async fn drain(url: &str, node: &str) -> anyhow::Result<()> {
    let base = url.trim_end_matches('/');
    let endpoint = format!("{base}/v1/admin/nodes/{node}/drain");
    eprintln!("draining {node} through {base} ...");
    let answer = post_with_progress(&endpoint, &json!({}), base, node).await?;
    for step in answer["steps"].as_array().into_iter().flatten() {
        println!(
            "  {:<8} {:<8} {:<14} {} ms",
            format!("shard{}", step["shard"]),
            step["action"].as_str().unwrap_or("?"),
            step["to"].as_str().or(step["node"].as_str()).unwrap_or("?"),
            step["took_ms"],
        );
    }
    println!("drained {node} in {} ms", answer["took_ms"]);
    Ok(())
}

/// POSTs `body`, printing every 2 s how many groups still hold a replica
/// on `node` and which are changing members; the answer's body.
async fn post_with_progress(
    endpoint: &str,
    body: &Value,
    base: &str,
    node: &str,
) -> anyhow::Result<Value> {
    // A change answers when it is over: an addition may wait minutes for
    // its replica to catch up, and a drain is many changes.
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(3600))
        .build()?;
    let progress = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()?;
    let started = Instant::now();
    let request = client.post(endpoint).json(body).send();
    tokio::pin!(request);
    let response = loop {
        tokio::select! {
            response = &mut request => break response.with_context(|| format!("asking {endpoint}"))?,
            _ = tokio::time::sleep(Duration::from_secs(2)) => {
                if let Some(line) = progress_line(&progress, base, node).await {
                    eprintln!("[{:>5.1} s] {line}", started.elapsed().as_secs_f64());
                }
            }
        }
    };
    let code = response.status();
    let text = response.text().await?;
    if !code.is_success() {
        bail!("{endpoint} answered {code}: {text}");
    }
    Ok(serde_json::from_str(&text)?)
}

async fn progress_line(client: &reqwest::Client, base: &str, node: &str) -> Option<String> {
    let view: Value = (client.get(format!("{base}/v1/admin/cluster")).send().await)
        .ok()?
        .json()
        .await
        .ok()?;
    let groups = view["groups"].as_array()?;
    let names = |g: &Value, field: &str| {
        g[field]
            .as_array()
            .is_some_and(|l| l.iter().any(|n| n == node))
    };
    let holding = (groups.iter())
        .filter(|g| names(g, "members") || names(g, "learners"))
        .count();
    let changing: Vec<String> = (groups.iter())
        .filter(|g| {
            g["learners"].as_array().is_some_and(|l| !l.is_empty())
                || g["leaving"].as_array().is_some_and(|l| !l.is_empty())
        })
        .map(|g| {
            format!(
                "shard{} (learners {}, leaving {})",
                g["shard"], g["learners"], g["leaving"]
            )
        })
        .collect();
    Some(format!(
        "{holding} group(s) hold a replica on {node}; changing: {}",
        if changing.is_empty() {
            "none".to_string()
        } else {
            changing.join(", ")
        }
    ))
}
