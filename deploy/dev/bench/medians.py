#!/usr/bin/env python3
"""Medians over several runs of deploy/dev/bench.sh (BENCH_RUNS=N).

    python3 deploy/dev/bench/medians.py RUN1.json RUN2.json ...

Each file is one run's figures as report.py writes them with BENCH_RESULTS_JSON:
"res" (tool.scenario -> seconds), "rss" (tool -> peak MiB over the run's phases),
"prss" (tool.phase -> peak MiB), and the run's targets, titles and scenario order.
Prints, per scenario, each tool's median and range over the runs, the engine's
median against its target, and the same for the peak RSS. Exit code 0; the verdicts
are in the table.
"""

import json
import statistics
import sys

TOOLS = ("engine", "rbd-mirror", "export-diff")


def med(values, digits=2):
    """Median and 'lo-hi' range of a list of numbers, the range with `digits`
    decimals (None when empty)."""
    if not values:
        return None, ""
    m = statistics.median(values)
    rng = f"{min(values):.{digits}f}-{max(values):.{digits}f}" if len(values) > 1 else ""
    return m, rng


def cell(values, unit="s"):
    """Seconds with two decimals, MiB whole."""
    digits = 2 if unit == "s" else 0
    m, rng = med(values, digits)
    if m is None:
        return "-"
    text = f"{m:.{digits}f} {unit}"
    return f"{text} ({rng})" if rng else text


def main(paths):
    runs = [json.load(open(p)) for p in paths]
    if not runs:
        sys.exit("no runs")
    first = runs[0]
    scenarios = first.get("scenarios", [])
    titles = first.get("titles", {})
    targets = first.get("targets", {})
    print()
    print(f"csi-rbd-replicator benchmark: medians over {len(runs)} runs (range in brackets)")
    row = "{:<40} {:>22} {:>22} {:>22} {:>9} {:>7}"
    print(row.format("scenario", *TOOLS, "target", ""))
    for s in scenarios:
        per_tool = [[r.get("res", {}).get(f"{t}.{s}") for r in runs] for t in TOOLS]
        per_tool = [[v for v in vs if v is not None] for vs in per_tool]
        if not any(per_tool):
            continue
        target, verdict = "-", "-"
        if s in targets:
            target = f"<= {targets[s]} s"
            m, _ = med(per_tool[0])
            verdict = "-" if m is None else ("met" if m <= targets[s] else "MISSED")
        print(row.format(titles.get(s, s), *(cell(v) for v in per_tool), target, verdict))
    rss = [[r.get("rss", {}).get(t) for r in runs] for t in TOOLS]
    rss = [[v for v in vs if v is not None] for vs in rss]
    rss_target = first.get("rss_target", 100)
    m, _ = med(rss[0])
    verdict = "-" if m is None else ("met" if m < rss_target else "MISSED")
    print(row.format("peak RSS (MiB), max over a run's phases",
                     *(cell(v, "MiB") for v in rss), f"< {rss_target}", verdict))
    phases = sorted({k for r in runs for k in r.get("prss", {})})
    for k in phases:
        vals = [r["prss"][k] for r in runs if k in r.get("prss", {})]
        print(f"  peak RSS {k}: {cell(vals, 'MiB')}")


if __name__ == "__main__":
    main(sys.argv[1:])
