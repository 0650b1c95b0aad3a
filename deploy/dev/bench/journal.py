"""Journal-mode phase (j): lag of single writes at rest, and catch-up after a load.

  lag  TOOL POOL IMG N PORT     (j1) N single 4 KiB writes, each flushed on the primary
  load TOOL POOL IMG TOTAL PORT (j2) rbd bench of TOTAL random 4 KiB writes, then a marker
Prints one JSON object. TOOL is engine (PORT: the replaying sidecar's metrics port) or
rbd-mirror (its `mirror image status` on site-b); the replica is read through librbd
without cache (a fresh read each time).
"""
import json
import os
import random
import re
import subprocess
import sys
import threading
import time

import rbd

import common


def connect(site):
    return common.connect(site, cache=False)


def behind(tool, ib, name, port):
    """(entries, bytes) the replica is behind, as the tool reports it (None: unknown)."""
    if tool == "engine":
        lines = common.engine_metrics(port)
        if lines is None:
            return None, None
        got = {}
        for line in lines:
            for m, k in (("csi_rbd_replicator_journal_behind_entries{", "e"),
                         ("csi_rbd_replicator_journal_behind_bytes{", "b")):
                if line.startswith(m) and f'image="{name}"' in line:
                    got[k] = int(float(line.rsplit(" ", 1)[1]))
        return got.get("e"), got.get("b")
    try:
        with rbd.Image(ib, name, read_only=True) as img:
            st = img.mirror_image_get_status()
    except rbd.Error:
        return None, None
    # The replica's own status: "replaying, {..."entries_behind_primary":N...}".
    m = re.search(r'"entries_behind_primary":\s*(\d+)', str(st.get("description", "")))
    return (int(m.group(1)) if m else None), None


def wait_on_replica(ib, name, off, data, timeout):
    """Seconds (epoch) when `data` is readable at `off` on the replica."""
    deadline = time.time() + timeout
    img = None
    while time.time() < deadline:
        try:
            if img is None:
                img = rbd.Image(ib, name, read_only=True)
            if img.read(off, len(data)) == data:
                t = time.time()
                img.close()
                return t
        except rbd.Error:
            if img is not None:
                img.close()
            img = None
            time.sleep(0.05)
        time.sleep(0.002)
    raise SystemExit(f"{name}: a write at {off} was not on the replica after {timeout}s")


def pct(v, p):
    v = sorted(v)
    return v[min(len(v) - 1, int(round(p / 100 * (len(v) - 1))))]


def main():
    cmd, tool, pool, name = sys.argv[1:5]
    arg, port, timeout = sys.argv[5], sys.argv[6], float(os.environ.get("BENCH_TIMEOUT", 120))
    a, b = connect("site-a"), connect("site-b")
    ia, ib = a.open_ioctx(pool), b.open_ioctx(pool)
    rnd = random.Random(7)
    size = rbd.Image(ia, name, read_only=True).size()
    if cmd == "lag":
        n = int(arg)
        lags = []
        with rbd.Image(ia, name) as img:
            # The first write takes the exclusive lock (a new journal tag).
            first = os.urandom(4096)
            img.write(first, 0)
            img.flush()
            wait_on_replica(ib, name, 0, first, timeout)
            lo, hi = (float(x) for x in os.environ.get("JBENCH_GAP", "0.1-0.3").split("-"))
            for i in range(n):
                time.sleep(rnd.uniform(lo, hi))
                off = rnd.randrange(1, size // 4096) * 4096
                data = os.urandom(4096)
                img.write(data, off)
                img.flush()
                t = time.time()
                lags.append(wait_on_replica(ib, name, off, data, timeout) - t)
        print(json.dumps({"n": n, "median": round(pct(lags, 50), 3), "p99": round(pct(lags, 99), 3),
                          "max": round(max(lags), 3), "min": round(min(lags), 3)}))
    elif cmd == "load":
        samples, stop = [], threading.Event()
        t0 = time.time()

        def sample():
            while not stop.is_set():
                e, by = behind(tool, ib, name, port)
                samples.append((round(time.time() - t0, 1), e, by))
                stop.wait(1.0)

        th = threading.Thread(target=sample, daemon=True)
        th.start()
        s = "A"
        out = subprocess.run(
            ["rbd", "-c", os.environ[f"CSIRR_SITE_{s}_CONF"], "--keyring",
             os.environ[f"CSIRR_SITE_{s}_KEYRING"], "bench", "--io-type", "write",
             "--io-pattern", "rand", "--io-size", "4K", "--io-threads", "16",
             "--io-total", arg, f"{pool}/{name}"], capture_output=True, text=True, check=True)
        t_stop = time.time()
        m = re.search(r"elapsed:\s*(\d+)\s+ops:\s*(\d+)\s+ops/sec:\s*([\d.]+)", out.stdout)
        # A marker written after the load: the replay is in journal order, so the
        # marker on the replica means the whole load is.
        data = os.urandom(4096)
        with rbd.Image(ia, name) as img:
            img.write(data, 0)
            img.flush()
            t_ack = time.time()
        t_seen = wait_on_replica(ib, name, 0, data, timeout * 3)
        time.sleep(1.5)
        stop.set()
        th.join()
        during = [x for x in samples if x[0] <= t_stop - t0]
        print(json.dumps({
            "bench_seconds": round(t_stop - t0, 2),
            "bench_ops": int(m.group(2)) if m else None,
            "bench_iops": float(m.group(3)) if m else None,
            "catch_up": round(t_seen - t_stop, 2),
            "marker_lag": round(t_seen - t_ack, 3),
            "max_entries_behind": max((x[1] for x in during if x[1] is not None), default=None),
            "max_bytes_behind": max((x[2] for x in during if x[2] is not None), default=None),
            "samples": samples,
        }))
    elif cmd == "burst":
        # (j3) BYTES of random 64 KiB writes, 16 in flight, from one client that
        # holds the image open, then a flushed 4 KiB marker: the last write of the
        # burst. The replay is in journal order, so the marker on the replica means
        # the whole burst is.
        total, io, depth = parse_size(arg), 64 << 10, 16
        with rbd.Image(ia, name) as img:
            first = os.urandom(4096)
            img.write(first, 0)
            img.flush()
            wait_on_replica(ib, name, 0, first, timeout)
            slots = threading.Semaphore(depth)
            errors = []

            def done(completion):
                if completion.get_return_value() < 0:
                    errors.append(completion.get_return_value())
                slots.release()

            buf = os.urandom(io)
            t0 = time.time()
            for _ in range(total // io):
                slots.acquire()
                img.aio_write(buf, rnd.randrange(1, size // io) * io, done)
            for _ in range(depth):
                slots.acquire()
            img.flush()
            if errors:
                raise SystemExit(f"{name}: burst writes failed: {errors[:3]}")
            t_burst = time.time()
            data = os.urandom(4096)
            img.write(data, 0)
            img.flush()
            t_ack = time.time()
        t_seen = wait_on_replica(ib, name, 0, data, timeout * 3)
        print(json.dumps({"bytes": total, "burst_seconds": round(t_burst - t0, 3),
                          "lag": round(t_seen - t_ack, 3),
                          "after_burst": round(t_seen - t_burst, 3)}))
    else:
        raise SystemExit(f"unknown command {cmd}")


def parse_size(text):
    """Bytes of a size like 64M, 8M, 4096."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)


main()
