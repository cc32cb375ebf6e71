#!/usr/bin/env python3
"""One client, one reservation at a time, against a running `harbor dev`.

A rough latency/throughput probe until `harbor bench` exists:
    python3 scripts/one-client-loop.py [--url http://127.0.0.1:7400] [--home madrid] [--count 2000]
"""
import argparse, http.client, json, statistics, time, urllib.parse, uuid

p = argparse.ArgumentParser()
p.add_argument("--url", default="http://127.0.0.1:7400")
p.add_argument("--home", default="madrid", help="home region of the issuer reserved against")
p.add_argument("--count", type=int, default=2000)
a = p.parse_args()
u = urllib.parse.urlparse(a.url)
conn = http.client.HTTPConnection(u.hostname, u.port)
run = uuid.uuid4().hex[:8]
issuer = f"PROBE-{run}"

def call(method, path, body):
    conn.request(method, path, json.dumps(body), {"content-type": "application/json"})
    r = conn.getresponse()
    return r.status, json.loads(r.read())

status, body = call("PUT", f"/v1/issuers/{issuer}", {"home_region": a.home, "limit": 10**15})
assert status == 201, body
lat = []
start = time.perf_counter()
for i in range(a.count):
    t = time.perf_counter()
    status, body = call("POST", "/v1/reservations", {"reservation_token": f"{run}-{i}", "issuer_id": issuer,
                                                   "amount": 1, "desk": "probe", "trader": "probe"})
    lat.append((time.perf_counter() - t) * 1000)
    assert status == 201, body
elapsed = time.perf_counter() - start
lat.sort()
print(f"{a.count} reservations from one client via {a.url} to an issuer homed in {a.home}: "
      f"{a.count / elapsed:.0f}/s, p50 {lat[len(lat)//2]:.2f} ms, p99 {lat[int(len(lat)*0.99)]:.2f} ms, max {lat[-1]:.2f} ms")
