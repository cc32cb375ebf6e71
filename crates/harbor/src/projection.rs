//! `harbor projection rebuild NAME`: drops a gateway's projection and
//! follows its rebuild (a scan of every group, then the tail) until it is
//! complete again, with a progress line every second.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use harbor_api::ProjectionStatus;

pub async fn rebuild(url: &str, name: &str, timeout: Duration) -> anyhow::Result<()> {
    let base = url.trim_end_matches('/');
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?;
    let endpoint = format!("{base}/v1/admin/projections/{name}/rebuild");
    let response = client
        .post(&endpoint)
        .send()
        .await
        .with_context(|| format!("asking {endpoint}"))?;
    let code = response.status();
    let text = response.text().await?;
    if !code.is_success() {
        bail!("{endpoint} answered {code}: {text}");
    }
    let started = Instant::now();
    eprintln!("rebuilding projection {name} on {base} from a scan of every group ...");
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let status = projection_status(&client, base, name).await?;
        let secs = started.elapsed().as_secs();
        if status.groups_scanning == 0 && status.watermark.is_some() {
            println!(
                "[{secs:>4} s] rebuilt: {} reservations and {} issuers from {} rows scanned, complete up to {} ms ago",
                status.reservations,
                status.issuers,
                status.rows_scanned,
                status.lag_ms.unwrap_or_default()
            );
            return Ok(());
        }
        eprintln!(
            "[{secs:>4} s] {} of {} groups still scanning, {} rows read, {} changes applied",
            status.groups_scanning, status.groups, status.rows_scanned, status.changes_applied
        );
        if started.elapsed() > timeout {
            bail!(
                "projection {name} was not complete after {} s (a group may be unavailable); it goes on rebuilding",
                timeout.as_secs()
            );
        }
    }
}

/// `GET /v1/admin/projections`, the one named `name`.
pub async fn projection_status(
    client: &reqwest::Client,
    base: &str,
    name: &str,
) -> anyhow::Result<ProjectionStatus> {
    #[derive(serde::Deserialize)]
    struct Answer {
        projections: Vec<ProjectionStatus>,
    }
    let endpoint = format!("{base}/v1/admin/projections");
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
    let answer: Answer =
        serde_json::from_str(&text).with_context(|| format!("{endpoint} answered {text}"))?;
    answer
        .projections
        .into_iter()
        .find(|p| p.projection == name)
        .with_context(|| format!("{base} keeps no projection {name:?}"))
}
