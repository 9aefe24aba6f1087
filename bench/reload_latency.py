#!/usr/bin/env python3
"""Hot-reload latency: time from writing config.toml to the new configuration answering.

Starts `wsgate run` on a temporary config, then ROUNDS times adds a route `/rN/` (half the
rounds written in place, half by rename over the file) and polls `GET /rN/` through the
gateway every millisecond until it stops answering 404 (no route). Prints the median and
maximum of write -> in effect, and a JSON line. Loopback only; everything it starts, it stops.

    bench/reload_latency.py [--wsgate target/release/wsgate] [--rounds 20]
"""
import argparse, http.client, json, os, socket, statistics, subprocess, sys, tempfile, time

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

def status(port, path):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        conn.request("GET", path)
        return conn.getresponse().status
    except OSError:
        return None
    finally:
        conn.close()

def render(port, backend, routes):
    text = f'[gateway]\nworkers = 1\n[[listener]]\nbind = "127.0.0.1:{port}"\n'
    for r in routes:
        text += f'[[route]]\npath = "/{r}/"\nupstream = "u"\n'
    return text + f'[upstream.u]\nservers = ["{backend}"]\n'

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--wsgate", default=os.path.join(os.path.dirname(__file__), "..", "target", "release", "wsgate"))
    ap.add_argument("--rounds", type=int, default=20)
    args = ap.parse_args()
    port, backend_port = free_port(), free_port()
    # No backend listens there: a route answers 502 at once, a missing route 404; only the
    # route table is measured.
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "config.toml")
        routes = ["r0"]
        with open(path, "w") as f:
            f.write(render(port, f"127.0.0.1:{backend_port}", routes))
        gw = subprocess.Popen([args.wsgate, "run", "-c", path], stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 10
            while status(port, "/r0/") in (None, 404):
                if time.monotonic() > deadline:
                    sys.exit("wsgate did not start")
                time.sleep(0.02)
            times = []
            for n in range(1, args.rounds + 1):
                routes.append(f"r{n}")
                text = render(port, f"127.0.0.1:{backend_port}", routes)
                start = time.monotonic()
                if n % 2:
                    with open(path, "w") as f:
                        f.write(text)
                else:
                    tmp = path + ".tmp"
                    with open(tmp, "w") as f:
                        f.write(text)
                    os.rename(tmp, path)
                deadline = start + 5
                while status(port, f"/r{n}/") == 404:
                    if time.monotonic() > deadline:
                        sys.exit(f"round {n}: route not in effect after 5 s")
                    time.sleep(0.001)
                times.append((time.monotonic() - start) * 1000)
            med, worst = statistics.median(times), max(times)
            print(f"reload latency over {len(times)} reloads: median {med:.1f} ms, max {worst:.1f} ms")
            print(json.dumps({"test": "reload_latency", "rounds": len(times), "median_ms": round(med, 1), "max_ms": round(worst, 1)}))
        finally:
            gw.terminate()
            gw.wait(timeout=10)

if __name__ == "__main__":
    main()
