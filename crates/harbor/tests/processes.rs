//! A real cluster as separate OS processes (three `harbor meta`, six
//! `harbor node`, configured like `deploy/`): the leader of an issuer's group
//! is killed with SIGKILL under load; writes resume on a new leader, nothing
//! acknowledged is lost, no token has two reservations. A planned transfer
//! goes through a gateway to the metadata leader. Then every metadata voter
//! is killed and restarted: the map, the generations and the directory
//! survive. A node whose disk was replaced catches up over TCP from a
//! snapshot larger than a frame, in chunks, while its groups commit.
//! Voters start in any order and at any speed, and one given a
//! changed topology refuses to start with a clear error.

mod common;

use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{check_acknowledged, first_ack_after, Api, Load};
use serde_json::Value;

const NODES: [&str; 6] = [
    "madrid-1",
    "madrid-2",
    "madrid-3",
    "newyork-1",
    "newyork-2",
    "newyork-3",
];

/// The cluster's processes; all of them are killed when it is dropped.
struct Processes {
    dir: PathBuf,
    children: Vec<(String, Child)>,
}

impl Processes {
    /// The three voters and the six nodes configured in `dir`.
    fn start_all(dir: &Path) -> Processes {
        let mut processes = Processes {
            dir: dir.to_path_buf(),
            children: Vec::new(),
        };
        for id in 1..=3 {
            processes.spawn(&format!("meta-{id}"), "meta");
        }
        for node in NODES {
            processes.spawn(node, "node");
        }
        processes
    }

    fn spawn(&mut self, name: &str, verb: &str) {
        let log = fs::File::create(self.dir.join(format!("{name}.log"))).unwrap();
        let mut command = Command::new(env!("CARGO_BIN_EXE_harbor"));
        command
            .args([verb, "--config"])
            .arg(self.dir.join(format!("{name}.toml")))
            .env("RUST_BACKTRACE", "0")
            .stdout(Stdio::null())
            .stderr(log);
        // Should the test process die without dropping us, its children
        // die with it instead of holding ports.
        unsafe {
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = command.spawn().unwrap();
        self.children.push((name.to_string(), child));
    }

    fn kill(&mut self, name: &str) {
        let i = self
            .children
            .iter()
            .position(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("no process {name}"));
        let (_, mut child) = self.children.remove(i);
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
    }

    /// The processes that have exited, with their status.
    fn exited(&mut self) -> Vec<(String, std::process::ExitStatus)> {
        self.children
            .iter_mut()
            .filter_map(|(name, child)| Some((name.clone(), child.try_wait().unwrap()?)))
            .collect()
    }

    fn log(&self, name: &str) -> String {
        fs::read_to_string(self.dir.join(format!("{name}.log"))).unwrap_or_default()
    }
}

impl Drop for Processes {
    fn drop(&mut self) {
        for (_, child) in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<std::net::TcpListener> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect()
}

/// Writes the cluster file and one config per process; returns the two
/// gateway URLs and the voters' HTTP addresses.
fn write_configs(dir: &Path) -> (Vec<String>, Vec<String>) {
    write_configs_with(dir, "")
}

/// As [`write_configs`], with `extra` appended to the cluster file.
fn write_configs_with(dir: &Path, extra: &str) -> (Vec<String>, Vec<String>) {
    let ports = free_ports(3 * 2 + 6 + 2 * 2);
    let mut p = ports.into_iter();
    let mut cluster = String::from(
        "[topology]\nregions = [\"madrid\", \"newyork\"]\nnodes_per_region = 3\n\
         groups_per_region = 8\nlocal_replicas = 3\nremote_replicas = 1\nbuckets = 2048\n\n",
    );
    let mut voters = Vec::new();
    for id in 1..=3 {
        let (http, control) = (p.next().unwrap(), p.next().unwrap());
        voters.push(format!("127.0.0.1:{http}"));
        cluster.push_str(&format!(
            "[[meta.voters]]\nid = {id}\nhttp = \"127.0.0.1:{http}\"\ncontrol = \"127.0.0.1:{control}\"\n\n"
        ));
        fs::write(
            dir.join(format!("meta-{id}.toml")),
            format!(
                "cluster = \"cluster.toml\"\nid = {id}\ndata_dir = \"{}\"\n",
                dir.join(format!("data/meta-{id}")).display()
            ),
        )
        .unwrap();
    }
    cluster.push_str("[nodes]\n");
    for node in NODES {
        cluster.push_str(&format!("{node} = \"127.0.0.1:{}\"\n", p.next().unwrap()));
        fs::write(
            dir.join(format!("{node}.toml")),
            format!(
                "cluster = \"cluster.toml\"\nname = \"{node}\"\ndata_dir = \"{}\"\n",
                dir.join(format!("data/{node}")).display()
            ),
        )
        .unwrap();
    }
    cluster.push_str("\n[gateways]\n");
    let mut urls = Vec::new();
    for region in ["madrid", "newyork"] {
        let (http, transport) = (p.next().unwrap(), p.next().unwrap());
        urls.push(format!("http://127.0.0.1:{http}"));
        cluster.push_str(&format!(
            "{region} = {{ host = \"{region}-1\", http = \"127.0.0.1:{http}\", transport = \"127.0.0.1:{transport}\" }}\n"
        ));
    }
    cluster.push_str(extra);
    fs::write(dir.join("cluster.toml"), cluster).unwrap();
    (urls, voters)
}

/// Waits for 200 from `/v1/health` (refused connections included: the
/// gateway's process may still be starting).
async fn wait_healthy(url: &str, processes: &Processes, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let status = reqwest::get(format!("{url}/v1/health"))
            .await
            .map(|r| r.status().as_u16())
            .ok();
        if status == Some(200) {
            return;
        }
        if Instant::now() > deadline {
            panic!(
                "not healthy after {timeout:?}\nmeta-1: {}\nmadrid-1: {}",
                processes.log("meta-1"),
                processes.log("madrid-1")
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn meta_state(voter: &str) -> Option<Value> {
    let response = reqwest::get(format!("http://{voter}/meta/state"))
        .await
        .ok()?;
    response.json().await.ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_leader_process_fails_over_and_metadata_survives_voter_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let (urls, voters) = write_configs(dir.path());
    let mut processes = Processes::start_all(dir.path());
    let api = Arc::new(Api::new());
    wait_healthy(&urls[0], &processes, Duration::from_secs(90)).await;

    // An issuer whose group leader does not host a gateway.
    let mut chosen = None;
    for i in 0..64 {
        let issuer = format!("PROC-{i}");
        assert_eq!(
            api.put_issuer(&urls[0], &issuer, "madrid", 1_000_000)
                .await
                .status,
            201
        );
        let view = api.issuer(&urls[0], &issuer).await.body;
        let leader = view["node"].as_str().unwrap().to_string();
        if leader != "madrid-1" {
            chosen = Some((issuer, leader, view["shard"].as_u64().unwrap()));
            break;
        }
    }
    let (issuer, leader, shard) = chosen.expect("every issuer led by the gateway host");
    let generation_before = api.issuer(&urls[0], &issuer).await.body["generation"]
        .as_u64()
        .unwrap();

    let load = Load::start(&api, &urls, &issuer, "proc", Duration::from_secs(9));
    tokio::time::sleep(Duration::from_millis(2000)).await;
    let killed_at = load.elapsed();
    processes.kill(&leader);
    let writes = load.finish().await;
    let acked = writes.iter().filter(|w| w.status == 201).count();
    let first_after =
        first_ack_after(&writes, killed_at).expect("writes never resumed after the SIGKILL");
    println!(
        "shard{shard}: {leader} killed at {killed_at:?}; first write sent after it was acknowledged {:?} later; {acked} acknowledged",
        first_after - killed_at,
    );
    let view = api.issuer(&urls[0], &issuer).await.body;
    assert_ne!(view["node"], leader.as_str(), "the leader did not move");
    assert!(view["generation"].as_u64().unwrap() > generation_before);

    // The killed node comes back on its data and catches up.
    processes.spawn(&leader, "node");
    wait_healthy(&urls[0], &processes, Duration::from_secs(60)).await;

    // Every acknowledged reservation is there once.
    check_acknowledged(&api, &urls[0], &issuer, &writes).await;

    // A planned transfer through a gateway reaches the metadata leader's
    // control loop.
    let view = api.issuer(&urls[0], &issuer).await.body;
    let current = view["node"].as_str().unwrap().to_string();
    let target = ["madrid-1", "madrid-2", "madrid-3"]
        .into_iter()
        .find(|n| *n != current)
        .unwrap();
    // A transfer whose target did not catch up within the drain is given
    // up, retryable (a loaded 2-core machine may see that): ask again, as
    // an operator would.
    let mut moved = None;
    for _ in 0..5 {
        let answer = api
            .post(
                format!("{}/v1/admin/groups/{shard}/transfer-leader", urls[1]),
                serde_json::json!({ "to": target }),
            )
            .await;
        let abandoned = answer.status == 503 && answer.code() == "transfer_abandoned";
        moved = Some(answer);
        if !abandoned {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let moved = moved.unwrap();
    assert_eq!(moved.status, 200, "{}", moved.body);
    println!("transfer of shard{shard}: {}", moved.body);
    let after_transfer = api
        .reserve(&urls[0], "proc-after-transfer", &issuer, 1, "desk")
        .await;
    if after_transfer.status != 201 {
        let view = api.get(format!("{}/v1/admin/cluster", urls[1])).await.body;
        let group = view["groups"]
            .as_array()
            .unwrap()
            .iter()
            .find(|g| g["shard"] == shard)
            .cloned();
        let madrid = api.get(format!("{}/v1/admin/cluster", urls[0])).await.body;
        panic!(
            "write after the transfer: {}\ngroup: {group:?}\nmap versions: madrid {} newyork {}\nmadrid-2: {}\nmadrid-1: {}",
            after_transfer.body,
            madrid["map_version"],
            view["map_version"],
            processes.log("madrid-2"),
            processes.log("madrid-1")
        );
    }
    assert_eq!(after_transfer.body["node"], target);

    // Every metadata voter dies and restarts: nothing of the map is lost.
    let before = meta_state(&voters[0]).await.expect("a voter answers")["state"].clone();
    for id in 1..=3 {
        processes.kill(&format!("meta-{id}"));
    }
    for id in 1..=3 {
        processes.spawn(&format!("meta-{id}"), "meta");
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let states = futures::future::join_all(voters.iter().map(|v| meta_state(v))).await;
        let led = states.iter().flatten().any(|s| !s["leader"].is_null());
        let same = states.iter().flatten().filter(|s| {
            let (now, then) = (&s["state"], &before);
            now["directory"] == then["directory"]
                && now["map"]["groups"][shard.to_string()]["generation"]
                    .as_u64()
                    .unwrap_or(0)
                    >= then["map"]["groups"][shard.to_string()]["generation"]
                        .as_u64()
                        .unwrap()
        });
        if led && same.count() == 3 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the voters did not recover the metadata: {}",
            processes.log("meta-1")
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // And the cluster still takes writes.
    let after = api
        .reserve(&urls[1], "proc-after-meta-restart", &issuer, 1, "desk")
        .await;
    assert_eq!(after.status, 201, "{}", after.body);
}

/// Every order of the three voters, with random gaps between their starts:
/// all of them stay up and agree on the bootstrapped map (a voter used to
/// compare the topology with its own copy before it had applied the
/// bootstrap, and exit). Then a voter restarted with a changed topology
/// exits with a clear error, and the cluster file's author learns why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn voters_start_in_any_order_and_refuse_a_changed_topology() {
    let orders = [
        [1, 2, 3],
        [3, 2, 1],
        [2, 3, 1],
        [3, 1, 2],
        [2, 1, 3],
        [1, 3, 2],
    ];
    let mut rng = 0x9e37_79b9_7f4a_7c15_u64;
    for (round, order) in orders.iter().enumerate() {
        let dir = tempfile::tempdir().unwrap();
        let (_, voters) = write_configs(dir.path());
        let mut processes = Processes {
            dir: dir.path().to_path_buf(),
            children: Vec::new(),
        };
        for id in order {
            processes.spawn(&format!("meta-{id}"), "meta");
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            tokio::time::sleep(Duration::from_millis(rng % 400)).await;
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let exited = processes.exited();
            assert!(
                exited.is_empty(),
                "round {round} (order {order:?}): {exited:?} exited: {}",
                exited
                    .iter()
                    .map(|(name, _)| processes.log(name))
                    .collect::<Vec<_>>()
                    .join("\n")
            );
            let states = futures::future::join_all(voters.iter().map(|v| meta_state(v))).await;
            let bootstrapped = states
                .iter()
                .flatten()
                .filter(|s| s["state"]["map"]["groups"].as_object().map(|g| g.len()) == Some(16))
                .count();
            // A voter that failed does so right after its bootstrap write.
            if bootstrapped == 3 {
                tokio::time::sleep(Duration::from_millis(500)).await;
                let exited = processes.exited();
                assert!(exited.is_empty(), "round {round}: {exited:?} exited");
                break;
            }
            assert!(
                Instant::now() < deadline,
                "round {round} (order {order:?}): not every voter bootstrapped: {}",
                processes.log("meta-1")
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if round + 1 < orders.len() {
            continue;
        }
        // The last round: meta-2 comes back with one group per region.
        processes.kill("meta-2");
        let cluster = fs::read_to_string(dir.path().join("cluster.toml")).unwrap();
        let changed = cluster.replace("groups_per_region = 8", "groups_per_region = 1");
        assert_ne!(changed, cluster);
        fs::write(dir.path().join("cluster.toml"), changed).unwrap();
        processes.spawn("meta-2", "meta");
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some((_, status)) = processes.exited().into_iter().find(|(n, _)| n == "meta-2") {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "meta-2 kept running on a changed topology"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert!(!status.success());
        let log = processes.log("meta-2");
        assert!(
            log.contains("topology differs from the one this cluster was created with"),
            "{log}"
        );
    }
}

/// A follower node's disk is replaced (SIGKILL, its data directory deleted,
/// started again) in a deployment whose frames are limited to 2 MiB and
/// whose leaders keep only a few entries for laggards: it must catch up
/// from a snapshot of some 30,000 reservations, larger than any frame, sent
/// in 64 KiB chunks, while its groups keep committing. It says it is
/// recovering until it has, and nothing acknowledged is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_disk_was_replaced_catches_up_from_a_snapshot_larger_than_a_frame() {
    let dir = tempfile::tempdir().unwrap();
    let limits = "\n[limits]\nframe_bytes_max = 2097152\nsnapshot_chunk_bytes_max = 65536\n\
                  append_bytes_max = 262144\nsnapshot_interval_entries = 20\nretained_entries_max = 10\n";
    let (urls, _) = write_configs_with(dir.path(), limits);
    let mut processes = Processes::start_all(dir.path());
    let api = Arc::new(Api::new());
    wait_healthy(&urls[0], &processes, Duration::from_secs(90)).await;
    let r = api
        .put_issuer(&urls[0], "BIG-1", "madrid", 1_000_000_000)
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let shard = r.body["shard"].as_u64().unwrap();
    for batch in 0..4 {
        let items: Vec<Value> = (0..8_000)
            .map(|i| {
                serde_json::json!({
                    "reservation_token": format!("big-{batch}-{i}"), "issuer_id": "BIG-1",
                    "amount": 1, "desk": "desk-with-a-name", "trader": "trader-with-a-name",
                })
            })
            .collect();
        let reply = api
            .post(
                format!("{}/v1/reservations:batch", urls[0]),
                serde_json::json!({ "reservations": items }),
            )
            .await;
        assert_eq!(reply.status, 200, "{}", reply.body);
        assert_eq!(reply.body["reserved"], 8_000, "{}", reply.body["failed"]);
    }
    let leader = api.issuer(&urls[0], "BIG-1").await.body["node"]
        .as_str()
        .unwrap()
        .to_string();
    let wiped = ["madrid-2", "madrid-3"]
        .into_iter()
        .find(|n| *n != leader)
        .unwrap();
    processes.kill(wiped);
    fs::remove_dir_all(dir.path().join("data").join(wiped)).unwrap();
    processes.spawn(wiped, "node");

    // Writes go on while it catches up.
    let load = Load::start(&api, &urls, "BIG-1", "during", Duration::from_secs(4));
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut seen_recovering = false;
    loop {
        let view = api.get(format!("{}/v1/admin/cluster", urls[0])).await.body;
        let mine: Vec<&Value> = view["groups"]
            .as_array()
            .map(|g| {
                g.iter()
                    .flat_map(|g| g["replicas"].as_array().unwrap().iter())
                    .filter(|r| r["node"] == wiped)
                    .collect()
            })
            .unwrap_or_default();
        seen_recovering |= mine.iter().any(|r| r["recovering"] == true);
        let done = !mine.is_empty()
            && mine
                .iter()
                .all(|r| r["answering"] == true && r["recovering"] == false);
        if done && seen_recovering {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{wiped} did not catch up: {mine:?}\n{}",
            processes.log(wiped)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let writes = load.finish().await;
    assert!(
        writes.iter().any(|w| w.status == 201),
        "no write went through"
    );
    // Every acknowledged write is committed under its token (the issuer's
    // open reservations are too many to list in one answer).
    for write in writes.iter().filter(|w| w.status == 201) {
        let reply = api.token(&urls[1], &write.token, "BIG-1").await;
        assert_eq!(
            reply.body["status"], "committed",
            "{}: {}",
            write.token, reply.body
        );
    }
    // It caught up through a snapshot (larger than a frame) in chunks.
    let replica_dir = dir
        .path()
        .join("data")
        .join(wiped)
        .join(format!("shard-{shard}"));
    let snapshot = fs::read_dir(&replica_dir)
        .unwrap()
        .filter_map(Result::ok)
        .find(|e| e.file_name().to_string_lossy().ends_with(".snap"))
        .unwrap_or_else(|| panic!("no snapshot installed in {}", replica_dir.display()));
    let size = snapshot.metadata().unwrap().len();
    assert!(size > 2 << 20, "the snapshot ({size} bytes) fits a frame");
    println!("{wiped} caught up from a {size}-byte snapshot");
    for name in NODES {
        let log = processes.log(name);
        assert!(!log.contains("panicked"), "{name} panicked:\n{log}");
        assert!(!log.contains("over the frame limit"), "{name}:\n{log}");
    }
}
