#!/usr/bin/env python3
"""The report of one deploy/dev/bench.sh run, from the figures the run collected.

    python3 deploy/dev/bench/report.py FIGURES.json [RESULTS.json]

FIGURES.json is what driver.py dumps at the end of a run: per tool and scenario the
seconds ("res"), the (b) ranges, peak RSS (over the run and per phase), CPU seconds
per phase, the serial per-call latencies, the space the replicas of (c) allocate,
the engine's copy times and timelines, phase (j)'s figures, and the run's settings.
Prints the side-by-side table and the notes; with RESULTS.json, also writes the
figures bench/medians.py reads (BENCH_RUNS).
"""
import json
import os
import sys

TOOLS = ("engine", "rbd-mirror", "export-diff")
ROW = "{:<38} {:>10} {:>10} {:>11} {:>10} {:>10} {:>9} {:>7}"
JROW = "{:<52} {:>28} {:>28}"


def secs(v):
    return "-" if v is None else f"{float(v):.2f} s"


def ratio(native, engine):
    """How many times faster the engine is than a native tool."""
    if native is None or engine is None:
        return "-"
    return f"{float(native) / float(engine):.2f}x" if float(engine) > 0 else "-"


def verdict(value, target):
    if value is None:
        return "-"
    return "met" if float(value) <= float(target) else "MISSED"


def titles_of(f):
    """The scenario titles, the (b) rows marked as medians over the rounds."""
    t = dict(f["titles"])
    for s in t:
        if s.startswith("b"):
            t[s] = t[s].replace(" (median)", "") + " (median)"
    return t


def table(f, titles):
    res, targets = f["res"], f["targets"]
    print(ROW.format("scenario", *TOOLS, "vs mirror", "vs export", "target", ""))
    for s in f["scenarios"]:
        e, m, x = (res.get(f"{t}.{s}") for t in TOOLS)
        # rbd-mirror starts copying before its snapshot call returns: no ratio from
        # the snapshot existing (compare (b) from taking it).
        vs_mirror = "n/a" if s == "b0" and m is not None else ratio(m, e)
        target, met = "-", "-"
        if s in targets:
            target, met = f"<= {targets[s]} s", verdict(e, targets[s])
        print(ROW.format(titles[s], secs(e), secs(m), secs(x), vs_mirror, ratio(x, e),
                         target, met))
    rss, rss_target = f["rss"], int(f["rss_target"])
    met = "-" if "engine" not in rss else ("met" if int(rss["engine"]) < rss_target else "MISSED")
    print(ROW.format("peak RSS (MiB)", rss.get("engine", "-"), rss.get("rbd-mirror", "-"), "-",
                     "", "", f"< {rss_target}", met))
    print("(vs X = X's time / engine's time: above 1.00x the engine is faster)")


def per_phase(f, titles):
    rng = f["range"]
    for s in ("b", "b0"):
        print(f"{titles[s]}, range over {f['b_rounds']} rounds: engine {rng.get('engine.' + s, '-')} s,"
              f" rbd-mirror {rng.get('rbd-mirror.' + s, '-')} s,"
              f" export-diff {rng.get('export-diff.' + s, '-')} s")
    for t in ("engine", "rbd-mirror"):
        line = "".join(f" ({p}) {f['prss'][f'{t}.{p}']}" for p in ("m1", "mt", "n")
                       if f"{t}.{p}" in f["prss"])
        if line:
            print(f"peak RSS (MiB) of {t}, fresh process per phase:{line}")
    for t in ("engine", "rbd-mirror"):
        line = "".join(f" ({p}) {f['pcpu'][f'{t}.{p}']}" for p in f["phases"]
                       if f"{t}.{p}" in f["pcpu"])
        if line:
            print(f"CPU seconds of {t} per phase (engine: site-a sidecar + site-b sidecar):{line}")
    for t in ("engine", "rbd-mirror"):
        if t in f["calls"]:
            calls = json.loads(f["calls"][t])
            print(f"per-call latency in (d) serial, p50/p99/max ms, {t}: "
                  + ", ".join(f"{k} {v}" for k, v in calls.items()))
    if "rbd-mirror" in f["calls"]:
        print("  (rbd-mirror's counterparts: enable = mirror image enable; promote of a primary ="
              " mirror image info, what ceph-csi reads; info = mirror image status)")
    alloc = f["alloc"]
    print("space the replica of (c) allocates (256 MiB written on the primary):"
          f" engine {alloc.get('c') or '-'} MiB, rbd-mirror {f['alloc_mirror'] or '-'} MiB,"
          f" export-diff {f['alloc_export'] or '-'} MiB")


def timelines(f, titles):
    res = f["res"]
    if not any(f"engine.{s}" in res for s in ("a", "c", "d")):
        return
    print()
    print("engine, where the time goes (t0 = trigger; all from the sidecar log and"
          " GetVolumeReplicationInfo):")
    for s in f["scenarios"]:
        if f"engine.{s}" not in res or s not in f["copy"]:
            continue
        print(f"  {titles[s]}: lastSyncDuration {f['copy'][s]}s (max over images);"
              f" {f['notes'].get(s, '')}")
        path = os.path.join(f["work"], f"timeline-{s}.txt")
        if os.path.exists(path):
            for line in open(path).read().splitlines():
                print(f"    {line}")


def journal(f):
    j = f["jres"]
    if "engine.j1" not in j and "rbd-mirror.j1" not in j:
        return

    def row(label, key):
        print(JROW.format(label, j.get(f"engine.{key}", "-"), j.get(f"rbd-mirror.{key}", "-")))

    print()
    print("journal mode (j), engine vs rbd-mirror (what each figure includes: the header of"
          " deploy/dev/bench.sh):")
    print(JROW.format("scenario", "engine", "rbd-mirror"))
    row(f"(j0) idle CPU, {int(f['j_idle']) + 1} journal images (% of a core)", "j0")
    row("(j1) 4 KiB write lag, median / p99 / max (s)", "j1")
    row("(j1) the same, 6 writes 2.5-3.5 s apart", "j1q")
    row(f"(j2) catch-up after rbd bench {f['j_total']} rand 4K (s)", "j2c")
    for b in f["j_bursts"]:
        row(f"(j3) {b} burst rand 64K: last write lag (after end) s", f"j3.{b}")
    row("(j4) primary MiB/s, journaling off -> on", "j4")
    for t in ("engine", "rbd-mirror"):
        if f"{t}.j2" in j:
            print(f"  {t} (j2): {j[t + '.j2']}; entries behind every second: {j.get(t + '.j2s', '')}")


def number(text):
    """A figure as JSON has it: 100 stays an integer, 2.5 a float."""
    v = float(text)
    return int(v) if v.is_integer() else v


def results(f, titles):
    """The figures medians.py reads."""
    num = {k: {n: number(v) for n, v in f[k].items()} for k in ("res", "rss", "prss", "targets")}
    return {**num, "rss_target": number(f["rss_target"]), "titles": titles,
            "scenarios": f["scenarios"]}


def main(argv):
    f = json.load(open(argv[0]))
    titles = titles_of(f)
    print()
    extra = "".join(f", {what}: {f[k]}" for k, what in
                    (("engine_args", "engine flags"), ("engine_env", "engine env")) if f[k])
    print(f"csi-rbd-replicator benchmark, {f['date']}, {f['cores']} cores,"
          f" replayer poll {f['poll']}{extra}")
    table(f, titles)
    per_phase(f, titles)
    timelines(f, titles)
    journal(f)
    if "s" in f["notes"]:
        print(f"engine {titles['s']}: {f['notes']['s']}")
    for note in f["busy_notes"]:
        print(f"NOTE: {note}")
    print(f"total benchmark time: {f['seconds']} s")
    if len(argv) > 1:
        with open(argv[1], "w") as out:
            json.dump(results(f, titles), out)


if __name__ == "__main__":
    main(sys.argv[1:])
