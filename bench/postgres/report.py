#!/usr/bin/env python3
"""Turn one pgbench run into a JSON result row, and result rows into a table.

  report.py row --logdir DIR --stdout FILE --stderr FILE [meta...]   -> one JSON line
  report.py table RESULTS.jsonl                                       -> text table

Latency percentiles are exact: pgbench -l writes one line per transaction
(client_id transaction_no time_us script_no epoch epoch_us ...), and we sort
all of them. Failed transactions have "failed" instead of a time and are
counted as errors, not as latencies.
"""
import argparse
import glob
import json
import math
import os
import re
import sys


def percentile(sorted_values, p):
    """Nearest-rank percentile: the smallest value with at least p% at or below it."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(p / 100.0 * len(sorted_values)))
    return sorted_values[rank - 1]


def read_latencies(logdir):
    latencies_us, failed, skipped = [], 0, 0
    files = glob.glob(os.path.join(logdir, "*"))
    if not files:
        # pgbench died before logging anything; the row still gets recorded.
        print(f"report.py: warning: no pgbench log files in {logdir}", file=sys.stderr)
    for path in files:
        with open(path) as f:
            for line in f:
                fields = line.split()
                if len(fields) < 3:
                    continue
                t = fields[2]
                if t == "failed":
                    failed += 1
                elif t == "skipped":
                    skipped += 1
                else:
                    latencies_us.append(int(t))
    latencies_us.sort()
    return latencies_us, failed, skipped


def parse_stdout(text):
    def grab(pattern, cast=float, default=None):
        m = re.search(pattern, text, re.MULTILINE)
        return cast(m.group(1)) if m else default

    return {
        "tps": grab(r"^tps = ([0-9.]+)"),
        "processed": grab(r"^number of transactions actually processed: (\d+)", int, 0),
        "failed": grab(r"^number of failed transactions: (\d+)", int, 0),
        "avg_ms": grab(r"^latency average = ([0-9.]+) ms"),
    }


def cmd_row(a):
    with open(a.stdout) as f:
        out = parse_stdout(f.read())
    with open(a.stderr) as f:
        err = f.read()
    # A client that hits an error pgbench cannot retry (anything but a
    # serialization failure or deadlock) is aborted; count those too.
    aborted = len(re.findall(r"client \d+ .*aborted", err))
    lat, failed_logged, _ = read_latencies(a.logdir)
    ms = lambda us: None if us is None else round(us / 1000.0, 3)
    row = {
        "system": "postgres",
        "mode": a.mode,
        "workload": a.workload,
        "issuers": a.issuers,
        "clients": a.clients,
        "threads": a.threads,
        "seconds": a.seconds,
        "tps": None if out["tps"] is None else round(out["tps"], 1),
        "transactions": out["processed"],
        "p50_ms": ms(percentile(lat, 50)),
        "p90_ms": ms(percentile(lat, 90)),
        "p99_ms": ms(percentile(lat, 99)),
        "p999_ms": ms(percentile(lat, 99.9)),
        "max_ms": ms(lat[-1] if lat else None),
        "avg_ms": out["avg_ms"],
        "errors": max(out["failed"], failed_logged) + aborted,
        "aborted_clients": aborted,
        "pgbench_exit": a.exit_code,
        "reservations_committed": a.reservations,
        "consistent": a.consistent == "true",
        "disturbed_by_build": a.disturbed,
        "pg_version": a.pg_version,
        "date": a.date,
        "command": a.command,
    }
    print(json.dumps(row))
    print(f"[pg-bench]   -> {row['tps']} tps, p50 {row['p50_ms']} ms, "
          f"p99 {row['p99_ms']} ms, errors {row['errors']}", file=sys.stderr)


def fmt(v, spec):
    return "-" if v is None else format(v, spec)


def cmd_table(a):
    rows = []
    with open(a.results) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    head = f"{'mode':<12} {'workload':<22} {'clients':>7} {'tps':>9} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6}  notes"
    print(head)
    print("-" * len(head))
    for r in rows:
        notes = []
        if not r.get("consistent", True):
            notes.append("INCONSISTENT")
        if r.get("disturbed_by_build"):
            notes.append("a build ran meanwhile")
        if r.get("pgbench_exit"):
            notes.append(f"pgbench exit {r['pgbench_exit']}")
        print(f"{r['mode']:<12} {r['workload']:<22} {r['clients']:>7} "
              f"{fmt(r['tps'], ',.0f'):>9} {fmt(r['p50_ms'], '.2f'):>8} "
              f"{fmt(r['p99_ms'], '.1f'):>8} {r['errors']:>6}  {', '.join(notes)}")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("row")
    r.add_argument("--logdir", required=True)
    r.add_argument("--stdout", required=True)
    r.add_argument("--stderr", required=True)
    r.add_argument("--mode", required=True)
    r.add_argument("--workload", required=True)
    r.add_argument("--issuers", type=int, required=True)
    r.add_argument("--clients", type=int, required=True)
    r.add_argument("--threads", type=int, required=True)
    r.add_argument("--seconds", type=int, required=True)
    r.add_argument("--exit-code", type=int, default=0)
    r.add_argument("--reservations", type=int)
    r.add_argument("--consistent", default="true")
    r.add_argument("--disturbed", action="store_true")
    r.add_argument("--pg-version", default="")
    r.add_argument("--date", default="")
    r.add_argument("--command", default="")
    t = sub.add_parser("table")
    t.add_argument("results")
    a = p.parse_args()
    {"row": cmd_row, "table": cmd_table}[a.cmd](a)


if __name__ == "__main__":
    main()
