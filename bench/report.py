#!/usr/bin/env python3
"""Turn a bench/compare run into bench/RESULTS.md (Markdown on stdout).

Reads harbor-N.jsonl and postgres-N.jsonl (one JSON line per row and pass)
and cost.json from --work, takes each row's median over the passes, and
prints the table of both systems with the Harbor / PostgreSQL ratios, the
batch rows, throughput by number of groups, and the cost figures.
"""
import argparse
import glob
import json
import os
import platform
import statistics
import subprocess


def load(work, system):
    rows = []
    for path in sorted(glob.glob(os.path.join(work, f"{system}-*.jsonl"))):
        with open(path) as f:
            rows += [json.loads(line) for line in f if line.strip()]
    return rows


def median_rows(rows, key):
    """Groups rows by key(row) and keeps, per group, the median of each figure."""
    groups = {}
    for r in rows:
        groups.setdefault(key(r), []).append(r)
    out = {}
    for k, rs in groups.items():
        pick = lambda field: statistics.median([r[field] for r in rs if r.get(field) is not None] or [0])
        out[k] = {"tps": pick("tps"), "p50_ms": pick("p50_ms"), "p99_ms": pick("p99_ms"),
                  "errors": sum(r.get("errors") or 0 for r in rs), "passes": len(rs),
                  "command": rs[0].get("command", "")}
    return out


def machine():
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = ""
    try:
        with open("/proc/meminfo") as f:
            kb = int(f.readline().split()[1])
            mem = f", {kb / 1024 / 1024:.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        pass
    return f"{os.cpu_count()} cores ({cpu}){mem}, {platform.system()} {platform.release()}"


def fmt(v, spec):
    return "-" if v is None else format(v, spec)


def print_cost(c, root):
    mib = lambda b: b / (1 << 20)
    copies = c["replicas_per_group"]
    command = c["command"].replace(root + "/", "")
    command = command.split(" --json ")[0]
    print(f"\nCost (`{command}`): reservations of amount 1 loaded through the batch API "
          f"({c['batch']} per request) into {c['groups']} groups of {copies} replicas, "
          f"{c['issuers']:,} issuers, all in one process; after each step the process's "
          "resident memory and the bytes on disk, then a restart of every node (stop, "
          "then start until every group's leader is ready again), which replays the "
          "log since the last snapshot; the restarted cluster must hold every "
          "acknowledged reservation.\n")
    print("| Reservations | Log entries | Resident memory MiB | WAL MiB | Snapshots MiB | "
          "Preallocated MiB | Restart s |")
    print("|---|---|---|---|---|---|---|")
    for s in c["steps"]:
        d = s["disk"]
        print(f"| {s['reservations']:,} | {s['log_entries']:,} | {mib(s['rss_bytes']):,.0f} | "
              f"{mib(d['wal_bytes']):,.1f} | {mib(d['snapshot_bytes']):,.1f} | "
              f"{mib(d['preallocated_bytes']):,.1f} | {s['restart_seconds']:.2f} |")
    mem, disk = mib(c["rss_bytes_per_million"]), mib(c["disk_bytes_per_million"])
    print(f"\nPer million reservations: **{mem:,.0f} MiB of memory** ({mem / copies:,.0f} MiB per "
          f"replica) and **{disk:,.0f} MiB on disk** ({disk / copies:,.0f} MiB per replica), "
          f"over a baseline of {mib(c['baseline_rss_bytes']):,.0f} MiB resident.")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--work", required=True)
    p.add_argument("--passes", type=int, required=True)
    p.add_argument("--seconds", type=int, required=True)
    p.add_argument("--elapsed", type=int, required=True)
    p.add_argument("--command", required=True)
    p.add_argument("--commit", required=True)
    p.add_argument("--root", required=True)
    a = p.parse_args()

    pg = median_rows(load(a.work, "postgres"), lambda r: (r["mode"], r["issuers"], r["clients"]))
    hb = median_rows(load(a.work, "harbor"),
                     lambda r: (r["mode"], r["issuers"], r["clients"], r["batch"], r.get("groups")))
    pg_version = next((r.get("pg_version") for r in load(a.work, "postgres") if r.get("pg_version")), "?")

    print("# Harbor vs PostgreSQL: reservations on one machine\n")
    print(f"Produced by `{a.command.strip()}` at commit `{a.commit}` "
          f"({a.passes} pass(es) of {a.seconds} s per row, {a.elapsed} s in all), on "
          f"{machine()}. PostgreSQL {pg_version}.\n")
    print("Same durability on both sides: a reservation is acknowledged once it is "
          "fsynced on the primary (Harbor: the group's leader) and flushed on a "
          "synchronous standby (Harbor: one same-region follower). Harbor runs as "
          "`harbor bench` against a dev cluster it starts itself "
          "(`--wan-delay-ms 0 --local-replicas 2 --remote-replicas 0`: 16 groups, each "
          "a leader and one synchronous follower); PostgreSQL as `bench/postgres/run.sh` "
          "(pgbench, primary + synchronous streaming standby on loopback). Clients run "
          "on the same machine as the servers in both cases. Each figure is the median "
          "over the passes.\n")
    print("| Workload | Clients | PostgreSQL interactive: tps, p50 / p99 ms | "
          "PostgreSQL stored function: tps, p50 / p99 ms | Harbor: tps, p50 / p99 ms | "
          "Harbor / interactive | Harbor / function |")
    print("|---|---|---|---|---|---|---|")
    keys = sorted({(k[1], k[2]) for k in pg} | {(k[1], k[2]) for k in hb if k[0] == "single"},
                  key=lambda k: (-k[0], k[1]))
    for issuers, clients in keys:
        inter = pg.get(("interactive", issuers, clients))
        func = pg.get(("function", issuers, clients))
        mine = hb.get(("single", issuers, clients, 1, None))
        cell = lambda r: "-" if r is None else (
            f"{r['tps']:,.0f}, {fmt(r['p50_ms'], '.2f')} / {fmt(r['p99_ms'], '.1f')}"
            + (f" ({r['errors']} errors)" if r["errors"] else ""))
        ratio = lambda r: "-" if r is None or mine is None or not r["tps"] else f"{mine['tps'] / r['tps']:.2f}x"
        workload = f"{issuers:,} issuers" if issuers > 10 else f"{issuers} hot issuers"
        print(f"| {workload} | {clients} | {cell(inter)} | {cell(func)} | {cell(mine)} | "
              f"{ratio(inter)} | {ratio(func)} |")
    batches = [(k, r) for k, r in hb.items() if k[0] == "batch"]
    if batches:
        print("\nBatch API (`POST /v1/reservations:batch`, `harbor bench --batch K`):\n")
        print("| Workload | Clients | Reservations per request | Reservations/s | Request p50 / p99 ms |")
        print("|---|---|---|---|---|")
        for (mode, issuers, clients, batch, _), r in sorted(batches):
            print(f"| {issuers:,} issuers | {clients} | {batch} | {r['tps']:,.0f} | "
                  f"{fmt(r['p50_ms'], '.1f')} / {fmt(r['p99_ms'], '.1f')} |")
    groups = sorted((k[4], r) for k, r in hb.items() if k[0] == "groups")
    if groups:
        print("\nThroughput as the groups grow (Harbor, 64 clients, 1,000 issuers; "
              "`--groups-per-region G`: G groups take the writes, as many more idle in "
              "the other region):\n")
        print("| Groups taking writes | Reservations/s | p50 / p99 ms |")
        print("|---|---|---|")
        for g, r in groups:
            print(f"| {g} | {r['tps']:,.0f} | {fmt(r['p50_ms'], '.2f')} / {fmt(r['p99_ms'], '.1f')} |")
    cost_path = os.path.join(a.work, "cost.json")
    if os.path.exists(cost_path):
        print_cost(json.load(open(cost_path)), a.root)
    print("\nWhere Harbor's time goes, and what would remove each limit: "
          "[bench/README.md](README.md).\n")
    print("Exact commands (of the first pass; later passes differ only in `run=`):\n")
    print("```sh")
    seen = set()
    for r in list(pg.values()) + list(hb.values()):
        if r["command"] and r["command"] not in seen:
            seen.add(r["command"])
            print(r["command"])
    print("```")


if __name__ == "__main__":
    main()
