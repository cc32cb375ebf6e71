//! `harbor move bucket N --to shardX`: moves a bucket to another group of
//! its home region through a gateway, printing the move's phase and
//! progress every half second, then the result (the write pause, what was
//! copied).

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::Value;

pub async fn move_bucket(url: &str, bucket: u32, to: &str) -> anyhow::Result<()> {
    let base = url.trim_end_matches('/').to_string();
    // The move answers when it is over: a cutover waits at most a few
    // seconds, a copy at most a minute, an abort as long again.
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(300))
        .build()?;
    let endpoint = format!("{base}/v1/admin/buckets/{bucket}/move");
    let started = Instant::now();
    eprintln!("moving bucket {bucket} to {to} through {base} ...");
    let request = client
        .post(&endpoint)
        .json(&serde_json::json!({ "to": to }))
        .send();
    tokio::pin!(request);
    let progress = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()?;
    let response = loop {
        tokio::select! {
            response = &mut request => break response.with_context(|| format!("asking {endpoint}"))?,
            _ = tokio::time::sleep(Duration::from_millis(500)) => {
                if let Some(line) = progress_line(&progress, &base, bucket).await {
                    eprintln!("[{:>5.1} s] {line}", started.elapsed().as_secs_f64());
                }
            }
        }
    };
    let code = response.status();
    let text = response.text().await?;
    let body: Value = serde_json::from_str(&text).unwrap_or(Value::String(text.clone()));
    if !code.is_success() {
        bail!("{endpoint} answered {code}: {text}");
    }
    println!(
        "moved bucket {bucket} from {} to {} in {} ms: write pause {} ms, {} reservations ({} rows, {} bytes) copied in {} passes; map version {}",
        body["from"].as_str().unwrap_or("?"),
        body["to"].as_str().unwrap_or("?"),
        body["took_ms"],
        body["pause_ms"],
        body["copied_reservations"],
        body["copied_rows"],
        body["copied_bytes"],
        body["passes"],
        body["map_version"],
    );
    Ok(())
}

/// The move of `bucket` under way, as `GET /v1/admin/moves` shows it.
async fn progress_line(client: &reqwest::Client, base: &str, bucket: u32) -> Option<String> {
    let answer: Value = client
        .get(format!("{base}/v1/admin/moves"))
        .send()
        .await
        .ok()?
        .json()
        .await
        .ok()?;
    let moves = answer["moves"].as_array()?;
    let m = moves.iter().find(|m| m["bucket"] == bucket)?;
    let progress = &m["progress"];
    Some(format!(
        "move {} {} → {}: {} ({}), {} rows copied in {} passes",
        m["id"],
        m["from"].as_str().unwrap_or("?"),
        m["to"].as_str().unwrap_or("?"),
        m["phase"].as_str().unwrap_or("?"),
        m["step"].as_str().unwrap_or("driven elsewhere"),
        progress["copied_rows"],
        progress["passes"],
    ))
}
