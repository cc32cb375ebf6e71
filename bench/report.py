#!/usr/bin/env python3
"""Turn a bench/compare run into bench/RESULTS.md (Markdown on stdout).

Reads harbor-N.jsonl and postgres-N.jsonl (one JSON line per row and pass)
from --work, takes each row's median over the passes, and prints the table
of both systems with the Harbor / PostgreSQL ratios.
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


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--work", required=True)
    p.add_argument("--passes", type=int, required=True)
    p.add_argument("--seconds", type=int, required=True)
    p.add_argument("--elapsed", type=int, required=True)
    p.add_argument("--command", required=True)
    p.add_argument("--commit", required=True)
    a = p.parse_args()

    pg = median_rows(load(a.work, "postgres"), lambda r: (r["mode"], r["issuers"], r["clients"]))
    hb = median_rows(load(a.work, "harbor"), lambda r: (r["mode"], r["issuers"], r["clients"], r["batch"]))
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
    keys = sorted({(k[1], k[2]) for k in pg} | {(k[1], k[2]) for k in hb if k[3] == 1},
                  key=lambda k: (-k[0], k[1]))
    for issuers, clients in keys:
        inter = pg.get(("interactive", issuers, clients))
        func = pg.get(("function", issuers, clients))
        mine = hb.get(("single", issuers, clients, 1))
        cell = lambda r: "-" if r is None else (
            f"{r['tps']:,.0f}, {fmt(r['p50_ms'], '.2f')} / {fmt(r['p99_ms'], '.1f')}"
            + (f" ({r['errors']} errors)" if r["errors"] else ""))
        ratio = lambda r: "-" if r is None or mine is None or not r["tps"] else f"{mine['tps'] / r['tps']:.2f}x"
        workload = f"{issuers:,} issuers" if issuers > 10 else f"{issuers} hot issuers"
        print(f"| {workload} | {clients} | {cell(inter)} | {cell(func)} | {cell(mine)} | "
              f"{ratio(inter)} | {ratio(func)} |")
    batches = [(k, r) for k, r in hb.items() if k[3] > 1]
    if batches:
        print("\nBatch API (`POST /v1/reservations:batch`, `harbor bench --batch K`):\n")
        print("| Workload | Clients | Reservations per request | Reservations/s | Request p50 / p99 ms |")
        print("|---|---|---|---|---|")
        for (mode, issuers, clients, batch), r in sorted(batches):
            print(f"| {issuers:,} issuers | {clients} | {batch} | {r['tps']:,.0f} | "
                  f"{fmt(r['p50_ms'], '.1f')} / {fmt(r['p99_ms'], '.1f')} |")
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
