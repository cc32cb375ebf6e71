//! The end of a run: liveness (the cluster converges once faults heal)
//! and the final checks of every replica's state.

use super::clients::{status, token_outcome};
use super::*;

impl World {
    pub(super) fn quiet(&self) -> bool {
        self.operator.idle()
            && self
                .clients
                .iter()
                .all(|c| c.inflight.is_none() && c.unknown.is_empty())
    }

    /// What still differs between replicas, or None once every group's
    /// replicas have applied the same prefix under a ready leader.
    pub(super) fn convergence_gap(&self) -> Option<String> {
        for (shard, group) in &self.groups {
            let leader = &self.nodes[group.leader()];
            let Some(driver) = leader.replicas.get(shard).filter(|_| leader.up) else {
                return Some(format!("{shard}: leader {} is down", group.leader()));
            };
            if !driver.group().is_ready() {
                return Some(format!(
                    "{shard}: {} is not leading, or has not applied its generation's first entry",
                    group.leader()
                ));
            }
            let commit = driver.group().replica().commit_index();
            for member in &group.members {
                let node = &self.nodes[member];
                let Some(replica) = node.replicas.get(shard).filter(|_| node.up) else {
                    return Some(format!("{shard}: {member} is down"));
                };
                if replica.group().applied_index() != commit
                    || replica.group().replica().commit_index() != commit
                {
                    return Some(format!(
                        "{shard}: {member} applied {} of {commit}",
                        replica.group().applied_index()
                    ));
                }
            }
        }
        None
    }

    pub(super) fn start_liveness(&mut self) {
        self.safety = false;
        self.partitions.clear();
        self.isolated.clear();
        let names: Vec<NodeId> = self.nodes.keys().cloned().collect();
        for name in names {
            let node = self.nodes.get_mut(&name).unwrap();
            node.paused_until = 0;
            node.skew_ms = 0;
            node.wall_step_ms = 0;
            let failed = node
                .replicas
                .values()
                .any(|r| r.group().failure().is_some());
            if !node.up {
                self.restart(&name);
            } else if failed {
                self.crash(&name);
                self.restart(&name);
            }
        }
        for i in 0..self.clients.len() {
            self.schedule(self.now + 1, Event::ClientStep(i));
        }
    }

    /// The end: every replica's state machine checks its invariants, replicas
    /// of a group hold identical state, and each issuer's final state goes
    /// into the history.
    pub(super) fn finish(&mut self) {
        self.record_buckets();
        self.check_projection();
        self.settle_projection();
        self.check_feed();
        for (shard, group) in &self.groups {
            let mut reference: Option<(NodeId, Vec<u8>)> = None;
            for member in &group.members {
                let replica = &self.nodes[member].replicas[shard];
                replica.group().machine().check_invariants();
                let bytes = replica.group().machine().snapshot();
                match &reference {
                    None => reference = Some((member.clone(), bytes)),
                    Some((first, expected)) if *expected != bytes => {
                        self.violations.push(format!(
                            "replicas diverge: {shard} on {member} differs from {first} at the same applied index"
                        ));
                    }
                    Some(_) => {}
                }
            }
        }
        // Every issuer the metadata placed, registered or not (a
        // registration whose outcome was unknown may have committed).
        let placed: Vec<(IssuerId, ShardId)> = self
            .directory
            .values()
            .map(|e| {
                (
                    e.issuer_id.clone(),
                    self.placement.shard_of_bucket(e.bucket),
                )
            })
            .collect();
        for (issuer, shard) in placed {
            let leader = self.groups[&shard].leader().clone();
            let machine = self.nodes[&leader].replicas[&shard].group().machine();
            let Some(view) = machine.issuer(&issuer) else {
                continue;
            };
            let mut reservations = Vec::new();
            for seq in 1.. {
                let Some(r) = machine.reservation(&ReservationId::new(issuer.clone(), seq)) else {
                    break;
                };
                reservations.push(FinalReservation {
                    reservation_id: r.reservation_id,
                    token: r.reservation_token,
                    amount: r.amount,
                    status: status(r.status),
                });
            }
            let mut tokens = BTreeMap::new();
            for client in &self.clients {
                for used in client.used.iter().filter(|u| u.issuer == issuer) {
                    if let Some(view) = machine.token(&issuer, &used.token) {
                        let (status, reservation_id) = token_outcome(&view);
                        let token = FinalToken {
                            token: used.token.clone(),
                            status,
                            reservation_id,
                        };
                        tokens.insert(used.token.to_string(), token);
                    }
                }
            }
            let line = FinalLine {
                time_ms: self.now,
                issuer_id: issuer,
                shard,
                limit: view.limit,
                reserved: view.reserved,
                reservations,
                tokens: tokens.into_values().collect(),
            };
            self.recorder.final_state(line);
        }
        self.finished = true;
    }
}
