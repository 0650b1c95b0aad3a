#!/usr/bin/env python3
"""The benchmark's driver: runs every tool's phases on the local pair and collects the figures.

    deploy/dev/bench.sh    (the wrapper: pair up, the lock, the build, then this driver)

deploy/dev/bench.sh documents the scenarios, what each figure includes and the
environment (BENCH_*). Per tool, each phase runs in a fresh pool on both sites,
deleted afterwards, with the tool's daemons up for that phase only:

    prepare   the pool (mirroring in image mode, peers bootstrapped), the primaries
              written on site-a (`Bench.write_images`), the tool's daemons started
    trigger   the phase's entry in the tool's table (`Tool.phases`): the helper in
              timing.py or journal.py that triggers the scenario and times it
    measure   the replaying process's peak RSS and CPU seconds, the daemons stopped,
              the pool deleted and its space given back

The figures go to $WORK/figures.json; report.py prints the report from it, and
medians.py the medians over BENCH_RUNS runs.
"""
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import rbd

from common import connect, engine_metrics

HERE = os.path.dirname(os.path.abspath(__file__))
SITES = ("site-a", "site-b")
GIB = 1 << 30
TOOLS = ("engine", "rbd-mirror", "export-diff")
SCENARIOS = ("a", "b", "b0", "c", "d", "ds", "g", "m1", "mt", "n", "s")
# issue 19's targets where it set them ((a), (b) from the snapshot existing, (d) both
# ways), issue 3's for (c); (b) from taking the snapshot is there to compare.
TARGETS = {"a": 2.5, "b0": 0.5, "c": 2.5, "d": 3.5, "ds": 3.5}
RSS_TARGET = 100
# Worst cases per site in GiB a phase needs below the nearfull ratio (site-b, engine
# (c): a replica that allocates whole objects, 4 GiB): an OSD of this pair that runs
# out of space crashes (bluestore ENOSPC) and takes the pair down for everyone.
NEED = {"ab": (1.2, 1.2), "c": (0.4, 4.3), "d": (1.4, 1.4), "ds": (1.4, 1.4),
        "m1": (0.2, 0.3), "mt": (0.2, 0.3), "n": (1.0, 1.0), "j": (0.8, 0.8),
        "g": (0.7, 0.7), "s": (0.8, 0.8)}


def log(msg):
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class BenchError(Exception):
    """A run that cannot go on; its message says why."""


def die(msg):
    raise BenchError(msg)


def site_key(site):
    return "A" if site == "site-a" else "B"


def sh(cmd, check=True, quiet=False, env=None):
    """Runs `cmd` and returns its stdout; `quiet` drops its stderr; with `check` a
    failure ends the run."""
    p = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env,
                       stderr=subprocess.DEVNULL if quiet else None)
    if check and p.returncode != 0:
        die(f"`{shlex.join(cmd)}` exited with {p.returncode}")
    return p.stdout


# --- settings and names ------------------------------------------------------------------
class Settings:
    """What the environment asks of the run (deploy/dev/bench.sh lists it)."""

    def __init__(self, env):
        self.tools = env.get("BENCH_TOOLS", " ".join(TOOLS)).split()
        for t in self.tools:
            if t not in TOOLS:
                die(f"unknown tool {t}")
        self.pool = env.get("BENCH_POOL") or f"csirr-bench-{os.getpid()}"
        self.poll = env.get("BENCH_POLL", "5s")
        self.engine_args = env.get("BENCH_ENGINE_ARGS", "")
        self.engine_env = env.get("BENCH_ENGINE_ENV", "")
        self.timeout = int(env.get("BENCH_TIMEOUT", "120"))
        self.keep = env.get("BENCH_KEEP") == "1"
        self.bin = env.get("BENCH_BIN") or die("BENCH_BIN is not set (deploy/dev/bench.sh sets it)")
        self.phases = env.get("BENCH_PHASES", "ab c d ds g m1 mt n s j").split()
        self.perf = bool(env.get("BENCH_PERF"))
        self.runs = int(env.get("BENCH_RUNS", "1"))
        self.results_json = env.get("BENCH_RESULTS_JSON") or None
        self.min_free_gib = int(env.get("BENCH_MIN_FREE_GIB", "16"))
        self.max_busy = int(env.get("BENCH_MAX_BUSY", "30"))
        self.quiet_wait = int(env.get("BENCH_QUIET_WAIT", "90"))
        self.settle = float(env.get("BENCH_SETTLE", "3"))
        self.b_rounds = int(env.get("BENCH_B_ROUNDS", "3"))
        self.n_multi, self.n_group = 20, 10
        self.n_many = int(env.get("BENCH_MANY", "200"))
        self.n_switch = int(env.get("BENCH_S_IMAGES", "20"))
        self.s_write_seconds = env.get("BENCH_S_WRITE_SECONDS", "5")
        self.j_writes = env.get("BENCH_J_WRITES", "20")
        self.j_total = env.get("BENCH_J_TOTAL", "64M")
        self.j_bursts = env.get("BENCH_J_BURSTS", "8M 64M").split()
        self.j_idle = int(env.get("BENCH_J_IDLE", "10"))
        self.j_idle_seconds = int(env.get("BENCH_J_IDLE_SECONDS", "20"))
        self.j_port = env.get("BENCH_J_PORT", "9473")

    def titles(self):
        return {
            "a": "(a) 1 GiB seq, first sync",
            "b": "(b) 64 MiB rand 64K delta",
            "b0": "(b) same, from snap existing",
            "c": "(c) 4 GiB/256 MiB rand 64K, first",
            "d": "(d) 20 x 64 MiB, first sync",
            "ds": "(d) same, serial Enable+Promote",
            "g": "(g) group 10 x 64 MiB, 1st cut",
            "m1": "(e) 1 GiB, 64 MiB in 256 spread writes",
            "mt": "(e) 1 TiB sparse, the same writes",
            "n": f"(f) {self.n_many} x 4 MiB enabled at once",
            "s": f"(s) migration switch, {self.n_switch} images",
        }

    # The images of each phase, by the tool's prefix.
    def multi(self, p):
        return [f"{p}d{i:02d}" for i in range(1, self.n_multi + 1)]

    def switch(self, p):
        return [f"{p}s{i:02d}" for i in range(1, self.n_switch + 1)]

    def group(self, p):
        return [f"{p}g{i:02d}" for i in range(1, self.n_group + 1)]

    def journal_idle(self, p):
        return [f"{p}ji{i:02d}" for i in range(1, self.j_idle + 1)]

    def many(self, p):
        """The images of (f), as timing.py's create-many names them."""
        return [f"{p}n{i:03d}" for i in range(1, self.n_many + 1)]


# --- processes --------------------------------------------------------------------------
def cpu_seconds(pid):
    """User + system CPU seconds the process used so far (None once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(") ", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_used(pid, since):
    """CPU seconds the process used since `since` (cpu_seconds), as the report shows them."""
    now = cpu_seconds(pid)
    return "?" if now is None or since is None else f"{now - since:.1f}"


def vmhwm_mib(pid):
    """The process's peak resident memory in MiB (None once it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024)
    except OSError:
        pass
    return None


def bench_ops_per_second(out):
    """The ops/sec of `rbd bench`'s summary line ("elapsed: ... ops/sec: N ..."), or None."""
    for line in out.splitlines():
        if line.startswith("elapsed:"):
            words = line.split()
            if "ops/sec:" in words[:-1]:
                return float(words[words.index("ops/sec:") + 1])
    return None


def cpu_busy():
    """The share of all cores busy over one second, in percent, from /proc/stat."""
    def sample():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return v[0] + v[1] + v[2] + v[5] + v[6], v[3] + v[4]

    (b0, i0), _, (b1, i1) = sample(), time.sleep(1), sample()
    total = (b1 - b0) + (i1 - i0)
    return int(100 * (b1 - b0) / total) if total > 0 else 0


class Procs:
    """The daemons the run started; each is stopped when its phase ends, and all are
    when the run ends however it ends."""

    def __init__(self):
        self.live = []

    def start(self, cmd, out, env=None, cwd=None):
        p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                             stdin=subprocess.DEVNULL)
        self.live.append(p)
        return p

    def stop(self, p):
        """SIGTERM, then SIGKILL after 20 s."""
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                log(f"warning: pid {p.pid} ignored SIGTERM for 20 s; killing it")
                p.kill()
                p.wait()
        if p in self.live:
            self.live.remove(p)

    def stop_all(self):
        for p in list(self.live):
            self.stop(p)


# --- the pair ---------------------------------------------------------------------------
class Pair:
    """The two clusters through their CLIs, and the run's pool on both."""

    def __init__(self, settings, work):
        self.s, self.work, self.pool = settings, work, settings.pool
        self.made = False
        self.used_before = {}

    def cli(self, tool, site, *args):
        """The command line of `rbd` or `ceph` (`tool`) on one site."""
        k = site_key(site)
        return [tool, "-c", os.environ[f"CSIRR_SITE_{k}_CONF"], "--keyring",
                os.environ[f"CSIRR_SITE_{k}_KEYRING"], *args]

    def rbd(self, site, *args, **kw):
        return sh(self.cli("rbd", site, *args), **kw)

    def ceph(self, site, *args, **kw):
        return sh(self.cli("ceph", site, *args), **kw)

    def rbd_json(self, site, *args):
        """`rbd ... --format json`, parsed; None when it fails."""
        out = self.rbd(site, *args, "--format", "json", check=False, quiet=True)
        try:
            return json.loads(out)
        except ValueError:
            return None

    def df(self, site):
        return json.loads(self.ceph(site, "df", "-f", "json"))

    def pools(self, site):
        return self.ceph(site, "osd", "pool", "ls").split()

    def image(self, name):
        return f"{self.pool}/{name}"

    def create(self, site, name, size, features=None):
        extra = ["--image-feature", features] if features else []
        self.rbd(site, "create", "--size", size, *extra, self.image(name))

    def bench_cmd(self, name, pattern, size, total, threads=None):
        """`rbd bench` writing on site-a, as a command line."""
        extra = ["--io-threads", str(threads)] if threads else []
        return self.cli("rbd", "site-a", "bench", "--io-type", "write", "--io-pattern", pattern,
                        "--io-size", size, *extra, "--io-total", total, self.image(name))

    def write(self, name, pattern, size, total):
        sh(self.bench_cmd(name, pattern, size, total))

    def pool_create(self, peers):
        """The pool on both sites, mirroring in image mode; `peers` bootstraps them."""
        self.pool_delete(wait=False)
        for site in SITES:
            self.used_before[site] = self.df(site)["stats"]["total_used_raw_bytes"]
        self.made = True
        for site in SITES:
            self.ceph(site, "osd", "pool", "create", self.pool, "16", "16", "replicated", quiet=True)
            self.ceph(site, "osd", "pool", "set", self.pool, "min_size", "1", check=False, quiet=True)
            self.rbd(site, "pool", "init", self.pool)
            self.rbd(site, "mirror", "pool", "enable", self.pool, "image", "--site-name", site)
        if not peers:
            return
        token = self.rbd("site-a", "mirror", "pool", "peer", "bootstrap", "create",
                         "--site-name", "site-a", self.pool)
        path = os.path.join(self.work, "token")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(token)
            self.rbd("site-b", "mirror", "pool", "peer", "bootstrap", "import", "--site-name",
                     "site-b", "--direction", "rx-tx", self.pool, path, quiet=True)
        finally:
            os.unlink(path)
        for site in SITES:
            info = self.rbd_json(site, "mirror", "pool", "info", self.pool, "--all") or {}
            if sum(1 for p in info.get("peers", []) if p.get("mon_host")) != 1:
                die(f"{site}: pool {self.pool} has no peer with mon_host after bootstrap")

    def pool_delete(self, wait=True):
        """Deletes the pool on both sites (its mirror peers first, so that their
        config-keys go too); with `wait`, until the OSDs have given the space back, so
        the next phase does not compete with the deletion."""
        for site in SITES:
            if self.pool not in self.pools(site):
                continue
            info = self.rbd_json(site, "mirror", "pool", "info", self.pool) or {}
            for peer in info.get("peers", []):
                self.rbd(site, "mirror", "pool", "peer", "remove", self.pool, peer["uuid"],
                         check=False, quiet=True)
            if subprocess.run(self.cli("ceph", site, "osd", "pool", "rm", self.pool, self.pool,
                                       "--yes-i-really-really-mean-it"),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode:
                log(f"warning: cannot delete pool {self.pool} on {site}")
        self.made = False
        if wait:
            for site in SITES:
                self._wait_space_back(site)

    def _wait_space_back(self, site):
        # The OSD removes the pool's PGs in the background: wait until the site is back to
        # (about) where it was before the phase. Others' tests may write meanwhile: stop
        # waiting also once usage stops falling for 5 s.
        used = lambda: self.df(site)["stats"]["total_used_raw_bytes"]  # noqa: E731
        before = self.used_before.get(site, 0)
        low, stalled = used(), 0
        for _ in range(60):
            if stalled >= 5:
                break
            time.sleep(1)
            cur = used()
            if cur <= before + (256 << 20):
                break
            if cur < low:
                low, stalled = cur, 0
            else:
                stalled += 1

    def room_for(self, phase):
        for site, need in zip(SITES, NEED[phase]):
            st = self.df(site)["stats"]
            if st["total_used_raw_bytes"] + need * GIB > 0.85 * st["total_bytes"]:
                log(f"warning: {site} has no room for phase ({phase}) (needs {need} GiB below"
                    " 85% full): skipped")
                return False
        return True

    def allocated_mib(self, site):
        """MiB the pool holds on SITE, as the OSD accounts it (`rbd du` and `rbd diff`
        count whole objects on fast-diff images and cannot show sparseness inside
        objects). PG stats reach the mgr every few seconds: wait for them."""
        time.sleep(8)
        pools = self.df(site).get("pools", [])
        return sum(p["stats"]["stored"] for p in pools if p["name"] == self.pool) // (1 << 20)


# --- the figures ------------------------------------------------------------------------
def median(values):
    """The lower median, as the report has always taken it."""
    v = sorted(values)
    return v[(len(v) + 1) // 2 - 1] if v else None


class Figures:
    """Every figure of one run, in the form report.py reads (figures.json)."""

    def __init__(self, settings):
        self.s = settings
        self.titles = settings.titles()
        self.res, self.range, self.copy, self.rss, self.notes = {}, {}, {}, {}, {}
        self.alloc, self.calls, self.jres, self.prss, self.pcpu = {}, {}, {}, {}, {}
        self.busy_notes = []
        self.alloc_mirror = self.alloc_export = ""
        self._b, self._b0 = {}, {}

    def record(self, tool, scenario, out):
        self.res[f"{tool}.{scenario}"] = out["seconds"]
        t = out.get("trigger_seconds")
        of = f" (of which {t}s creating the primary snapshot)" if t is not None else ""
        log(f"{tool} {self.titles[scenario]}: {out['seconds']}s{of}")

    def record_b(self, tool, out):
        """One round of (b): counted from taking the snapshot and from it existing."""
        s, t = out["seconds"], out.get("trigger_seconds") or 0
        self._b.setdefault(tool, []).append(s)
        self._b0.setdefault(tool, []).append(round(s - t, 3))
        log(f"{tool} {self.titles['b']}: {s}s (of which {t}s creating the primary snapshot)")

    def finish_b(self, tool):
        """(b)'s median over the rounds, and the range beside it."""
        for key, vals in (("b", self._b.get(tool)), ("b0", self._b0.get(tool))):
            if not vals:
                continue
            self.res[f"{tool}.{key}"] = median(vals)
            if len(vals) > 1:
                self.range[f"{tool}.{key}"] = f"{min(vals):.2f}-{max(vals):.2f}"

    def phase_done(self, tool, phase, rss, cpu):
        if rss is not None:
            self.prss[f"{tool}.{phase}"] = rss
            self.rss[tool] = max(rss, self.rss.get(tool, 0))
        self.pcpu[f"{tool}.{phase}"] = cpu

    def dump(self, path, started):
        """figures.json: what report.py reads; empty figures are left out."""
        clean = lambda d: {k: v for k, v in d.items() if v not in (None, "")}  # noqa: E731
        s = self.s
        f = {
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "cores": os.cpu_count(),
            "poll": s.poll, "engine_args": s.engine_args, "engine_env": s.engine_env,
            "b_rounds": s.b_rounds, "j_idle": s.j_idle, "j_total": s.j_total,
            "work": os.path.dirname(path), "seconds": round(time.time() - started),
            "rss_target": RSS_TARGET, "alloc_mirror": self.alloc_mirror,
            "alloc_export": self.alloc_export, "j_bursts": s.j_bursts, "phases": s.phases,
            "scenarios": list(SCENARIOS), "busy_notes": self.busy_notes,
            "titles": self.titles, "targets": TARGETS,
        }
        for k in ("res", "range", "rss", "prss", "pcpu", "calls", "alloc", "copy", "notes",
                  "jres"):
            f[k] = clean(getattr(self, k))
        with open(path, "w") as out:
            json.dump(f, out, indent=1)


# --- the run ----------------------------------------------------------------------------
class Bench:
    """One run: the pair, the work directory, the daemons and the figures."""

    def __init__(self, settings, work):
        self.s, self.work = settings, work
        self.pair = Pair(settings, work)
        self.procs = Procs()
        self.fig = Figures(settings)

    def wait_quiet(self):
        """The machine is shared (2 cores): before each timed scenario wait, up to
        BENCH_QUIET_WAIT s, until the cores are at most BENCH_MAX_BUSY % busy, so that
        builds or tests of others do not end up in the figures; say so when they might."""
        b = 0
        for _ in range(self.s.quiet_wait):
            b = cpu_busy()
            if b <= self.s.max_busy:
                return
        log(f"warning: the cores are still {b}% busy with other work; measuring anyway")
        self.fig.busy_notes.append(f"a scenario started with the cores {b}% busy with other work")

    def _python(self, script, *args, env=None):
        out = sh(["/usr/bin/python3", os.path.join(HERE, script), *map(str, args)],
                 env={**os.environ, "BENCH_TIMEOUT": str(self.s.timeout), **(env or {})})
        lines = [line for line in out.splitlines() if line.strip()]
        return json.loads(lines[-1]) if lines else die(f"{script} {args[0]} printed nothing")

    def timing(self, cmd, *args, quiet=True):
        """timing.py CMD: triggers one scenario and times it; `quiet` waits for quiet
        cores first."""
        if quiet:
            self.wait_quiet()
        return self._python("timing.py", cmd, self.s.pool, self.s.timeout, *args)

    def journal(self, cmd, tool, image, arg, env=None):
        """journal.py CMD: one of phase (j)'s measurements."""
        self.wait_quiet()
        return self._python("journal.py", cmd, tool, self.s.pool, image, arg, self.s.j_port,
                            env=env)

    def settle(self):
        """Data written through librbd may still be flushed by the OSD: a moment."""
        time.sleep(self.s.settle)

    def write_images(self, p, phase):
        """The primaries of one phase on site-a, written before any daemon starts."""
        log(f"{p}: writing the primaries of ({phase}) on site-a")
        pair, s = self.pair, self.s
        if phase == "ab":
            pair.create("site-a", f"{p}a", "1G")
            pair.write(f"{p}a", "seq", "4M", "1G")
        elif phase == "c":
            pair.create("site-a", f"{p}c", "4G")
            pair.write(f"{p}c", "rand", "64K", "256M")
        elif phase in ("m1", "mt"):
            self.timing("write-spread", f"{p}{phase}", GIB if phase == "m1" else GIB << 10,
                        quiet=False)
        elif phase == "n":
            self.timing("create-many", f"{p}n", s.n_many, 4 << 20, quiet=False)
        elif phase == "j":
            journaled = "layering,exclusive-lock,journaling"
            pair.create("site-a", f"{p}j", "256M", journaled)
            pair.write(f"{p}j", "seq", "4M", "32M")
            for name in s.journal_idle(p):
                pair.create("site-a", name, "16M", journaled)
            # (j4)'s baseline: the same size and layout without journaling, never replicated.
            pair.create("site-a", f"{p}jplain", "256M", "layering,exclusive-lock")
            pair.write(f"{p}jplain", "seq", "4M", "256M")
        elif phase == "s":
            # rbd-mirror's runbook mirrors journals: its images get journaling.
            feat = "layering,exclusive-lock,object-map,fast-diff"
            if p == "mir-":
                feat += ",journaling"
            for name in s.switch(p):
                pair.create("site-a", name, "32M", feat)
                pair.write(name, "seq", "4M", "8M")
        elif phase in ("d", "ds", "g"):
            names = s.group(p) if phase == "g" else s.multi(p)
            for name in names:
                pair.create("site-a", name, "64M")
            # Four at a time: these writes only prepare the scenario.
            for i in range(0, len(names), 4):
                batch = [subprocess.Popen(pair.bench_cmd(n, "seq", "4M", "64M"),
                                          stdout=subprocess.DEVNULL) for n in names[i:i + 4]]
                if any(b.wait() != 0 for b in batch):
                    die("rbd bench failed")
        self.settle()

    def delta_writes(self, name):
        self.pair.write(name, "rand", "64K", "64M")
        self.settle()

    def journal_phase(self, tool, p, pid, replaying):
        """Phase (j) once the caller enabled the images: waits until every replica
        replays (`replaying(images)` counts those that do), then (j0) idle CPU of PID, (j1) single-write lag,
        (j2) load, (j3) bursts and (j4) the primary's throughput."""
        s, j = self.s, self.fig.jres
        names = [f"{p}j", *s.journal_idle(p)]
        start, ready = time.time(), 0
        while time.time() - start < s.timeout:
            ready = replaying(names)
            if ready == len(names):
                break
            time.sleep(0.2)
        if ready != len(names):
            die(f"{tool}: only {ready} of {len(names)} journal replicas replay after {s.timeout}s")
        log(f"{tool}: {len(names)} journal-mode replicas replaying after {time.time() - start:.0f} s")
        time.sleep(5)
        self.wait_quiet()
        c0 = cpu_seconds(pid)
        time.sleep(s.j_idle_seconds)
        c1 = cpu_seconds(pid)
        if c0 is None or c1 is None:
            die(f"{tool}: the replaying process (pid {pid}) exited during (j0)")
        j[f"{tool}.j0"] = f"{100 * (c1 - c0) / s.j_idle_seconds:.1f}"
        log(f"{tool} (j0): CPU of the idle replaying process with {len(names)} journal images:"
            f" {j[tool + '.j0']}% of a core")
        trio = lambda o: f"{o['median']} / {o['p99']} / {o['max']}"  # noqa: E731
        j[f"{tool}.j1"] = trio(self.journal("lag", tool, f"{p}j", s.j_writes))
        log(f"{tool} (j1): lag of {s.j_writes} single 4 KiB writes, median / p99 / max s:"
            f" {j[tool + '.j1']}")
        # The same after quiet spells (the engine probes less often once it found
        # nothing for 2 s: --journal-idle-probe-interval).
        j[f"{tool}.j1q"] = trio(self.journal("lag", tool, f"{p}j", 6, env={"JBENCH_GAP": "2.5-3.5"}))
        log(f"{tool} (j1): lag of 6 single 4 KiB writes 2.5-3.5 s apart, median / p99 / max s:"
            f" {j[tool + '.j1q']}")
        o = self.journal("load", tool, f"{p}j", s.j_total)
        dash = lambda v: "-" if v is None else v  # noqa: E731
        j[f"{tool}.j2"] = (f"rbd bench {o['bench_ops']} writes in {o['bench_seconds']} s"
                           f" ({int(o['bench_iops'])} IOPS); catch-up {o['catch_up']} s after it"
                           f" exited; max behind during the load: {dash(o.get('max_entries_behind'))}"
                           f" entries, {dash(o.get('max_bytes_behind'))} bytes")
        j[f"{tool}.j2c"] = o["catch_up"]
        j[f"{tool}.j2s"] = " ".join(f"{t}s:{dash(v)}" for t, v, *_ in o["samples"])
        log(f"{tool} (j2): {j[tool + '.j2']}")
        log(f"{tool} (j2): entries behind over time: {j[tool + '.j2s']}")
        for burst in s.j_bursts:
            o = self.journal("burst", tool, f"{p}j", burst)
            j[f"{tool}.j3.{burst}"] = f"{o['lag']} ({o['after_burst']})"
            log(f"{tool} (j3): {burst} burst of random 64 KiB writes in {o['burst_seconds']} s;"
                f" its last write on the replica after {j[f'{tool}.j3.{burst}']} s (from the"
                " burst's end)")
        self.journal_overhead(tool, p)

    def journal_overhead(self, tool, p):
        """(j4) What journaling costs the primary while TOOL replays: rbd bench of
        BENCH_J_TOTAL random 64 KiB writes (16 in flight) on the replicated journaled
        image and on one of the same size and layout without journaling, alternated
        three times; medians of the write throughput, and the throughput lost."""
        rates = {f"{p}jplain": [], f"{p}j": []}
        for _ in range(3):
            for name, got in rates.items():
                self.wait_quiet()
                out = sh(self.pair.bench_cmd(name, "rand", "64K", self.s.j_total, threads=16))
                ops = bench_ops_per_second(out)
                if ops is None:
                    die(f"{tool}: rbd bench on {name} printed no throughput")
                got.append(ops * 65536)
        plain, journaled = (median(v) / (1 << 20) for v in rates.values())
        self.fig.jres[f"{tool}.j4"] = (f"{plain:.1f} -> {journaled:.1f} MiB/s"
                                       f" (-{100 * (1 - journaled / plain):.0f}%)")
        log(f"{tool} (j4): primary write throughput, rbd bench {self.s.j_total} rand 64K,"
            f" without -> with journaling: {self.fig.jres[tool + '.j4']}")

    def remove_leftovers(self):
        """Pools of earlier runs that died (the caller holds the bench lock: no other
        run is using them)."""
        for site in SITES:
            for old in self.pair.pools(site):
                if old == "csirr-bench" or (old.startswith("csirr-bench-")
                                            and old[len("csirr-bench-"):].isdigit()):
                    log(f"removing pool {old} left by an earlier run on {site}")
                    self.pair.ceph(site, "osd", "pool", "rm", old, old,
                                   "--yes-i-really-really-mean-it", check=False, quiet=True)
            avail = self.pair.df(site)["stats"]["total_avail_bytes"] // GIB
            if avail < 2:
                die(f"{site} has only {avail} GiB free; the benchmark needs 2 (remove old test images)")

    def run(self):
        s = self.s
        self.remove_leftovers()
        log(f"tools: {' '.join(s.tools)}; pool {s.pool}; replayer poll interval {s.poll};"
            f" work dir {self.work}")
        with open("/proc/loadavg") as f:
            log(f"load before the run: {' '.join(f.read().split()[:3])}")
        started = time.time()
        for t in s.tools:
            {"engine": Engine, "rbd-mirror": Mirror, "export-diff": Export}[t](self).run()
        path = os.path.join(self.work, "figures.json")
        self.fig.dump(path, started)
        extra = [s.results_json] if s.results_json else []
        report = sh(["/usr/bin/python3", os.path.join(HERE, "report.py"), path, *extra])
        with open(os.path.join(self.work, "report.txt"), "w") as f:
            f.write(report)
        sys.stdout.write(report)
        sys.stdout.flush()

    def close(self, ok):
        """Stops what is still running and deletes the pool (unless BENCH_KEEP); keeps
        the work directory when asked or when the run failed."""
        self.procs.stop_all()
        if self.pair.made and not self.s.keep:
            try:
                self.pair.pool_delete()
            except (BenchError, OSError, ValueError) as e:
                log(f"warning: deleting pool {self.s.pool}: {e}")
        if self.s.keep or not ok:
            log(f"logs and helper kept in {self.work}")
        else:
            shutil.rmtree(self.work, ignore_errors=True)


# --- the tools --------------------------------------------------------------------------
class Tool:
    """One tool's run: per phase, prepare, trigger and measure (the module's doc).
    Subclasses name themselves, their image prefix, whether their pool needs mirror
    peers, and their table of phases."""

    name = prefix = title = ""
    peers = True
    skipped = {}  # phase -> why the tool has no such phase (None: said in the doc only)

    def __init__(self, bench):
        self.b, self.s, self.pair, self.fig = bench, bench.s, bench.pair, bench.fig

    def phases(self):
        """The tool's table: phase -> the trigger that runs and times it."""
        raise NotImplementedError

    def start(self, phase):
        """Starts the tool's daemons for a phase; returns the replaying process's pid."""
        return None

    def stop(self, phase):
        """Stops the daemons; returns the CPU seconds they used in the phase, as text."""
        return None

    def run(self):
        log(f"=== {self.title} ===")
        table = self.phases()
        for phase in self.s.phases:
            if phase not in table:
                why = self.skipped.get(phase)
                if why:
                    log(f"{self.name}: ({phase}) skipped: {why}")
                continue
            if not self.pair.room_for(phase):
                continue
            self.pair.pool_create(self.peers)
            self.b.write_images(self.prefix, phase)
            pid = self.start(phase)
            table[phase]()
            rss = vmhwm_mib(pid) if pid else None
            cpu = self.stop(phase)
            if pid:
                self.fig.phase_done(self.name, phase, rss, cpu)
                log(f"{self.name}: peak RSS of the replaying process in phase ({phase}):"
                    f" {rss if rss is not None else '?'} MiB")
            self.pair.pool_delete()
        if self.name in self.fig.rss:
            log(f"{self.name}: peak RSS of the replaying process {self.fig.rss[self.name]} MiB")

    def ab(self, enable, snap, after_first=lambda out: None):
        """(a), then (b)'s rounds: each delta written, then timed by `snap`."""
        p = self.prefix
        self.fig.record(self.name, "a", enable(f"{p}a"))
        for r in range(1, self.s.b_rounds + 1):
            self.b.delta_writes(f"{p}a")
            out = snap(r)
            self.fig.record_b(self.name, out)
            if r == 1:
                after_first(out)
        self.fig.finish_b(self.name)


class Engine(Tool):
    """This engine: a sidecar per site, site-b's replaying."""

    name, prefix, title = "engine", "eng-", "engine"

    def __init__(self, bench):
        super().__init__(bench)
        self.sa = os.path.join(bench.work, "a.sock")
        self.sb = os.path.join(bench.work, "b.sock")
        self.log_b = os.path.join(bench.work, "sidecar-b.log")

    def phases(self):
        p, s, t = self.prefix, self.s, self.b.timing
        return {
            "ab": lambda: self.ab(
                lambda img: self.enable("a", img),
                lambda r: t("engine-snap", f"{p}a"),
                lambda out: self.note("b", out, [f"{p}a"])),
            "c": self.phase_c,
            "d": lambda: self.fig.record("engine", "d", self.enable("d", *s.multi(p))),
            "ds": lambda: self.serial(s.multi(p)),
            "g": lambda: self.fig.record("engine", "g", t("engine-group", self.sa, *s.group(p))),
            "m1": lambda: self.fig.record("engine", "m1", t("engine-enable", self.sa, f"{p}m1")),
            "mt": lambda: self.fig.record("engine", "mt", t("engine-enable", self.sa, f"{p}mt")),
            "n": lambda: self.fig.record("engine", "n", t("engine-enable", self.sa, *s.many(p))),
            "s": self.switch,
            "j": self.phase_j,
        }

    def sidecar(self, site, sock, log_path, *args):
        """A `serve` for SITE on SOCK, once its Probe answers ready."""
        env = dict(os.environ, NO_COLOR="1", RUST_LOG="info")
        env.update(kv.split("=", 1) for kv in self.s.engine_env.split() if "=" in kv)
        secret_dir = os.environ[f"CSIRR_SITE_{site_key(site)}_SECRET_DIR"]
        cmd = [self.s.bin, "serve", "--endpoint", f"unix://{sock}",
               "--drivername", "bench.rbd.csi.ceph.com",
               "--csi-config", os.environ["CSIRR_CSI_CONFIG"],
               "--cluster-mapping", os.environ["CSIRR_CLUSTER_MAPPING"],
               "--cluster-id", site, "--secret-dir", secret_dir, "--pools", self.s.pool, *args]
        with open(log_path, "w") as out:
            proc = self.b.procs.start(cmd, out, env=env)
        for _ in range(300):
            probe = subprocess.run(["grpcurl", "-plaintext", "-unix", "-authority", "localhost",
                                    sock, "identity.Identity/Probe"], stdout=subprocess.PIPE,
                                   stderr=subprocess.DEVNULL, text=True)
            if '"ready": true' in probe.stdout:
                return proc
            if proc.poll() is not None:
                die(f"sidecar for {site} exited; log: {log_path}")
            time.sleep(0.2)
        die(f"sidecar for {site} not ready in 60s; log: {log_path}")

    def start(self, phase):
        # Site-a replays nothing; in (s) its scheduler takes the migration's sync points.
        a_args = ["--poll-interval", self.s.poll] if phase == "s" else ["--no-replayer"]
        self.a = self.sidecar("site-a", self.sa, os.path.join(self.b.work, "sidecar-a.log"),
                              *a_args)
        b_args = ["--poll-interval", self.s.poll, *shlex.split(self.s.engine_args)]
        if phase == "j":
            b_args += ["--metrics-address", f"127.0.0.1:{self.s.j_port}"]
        self.bproc = self.sidecar("site-b", self.sb, self.log_b, *b_args)
        self.perf = []
        if self.s.perf:
            for proc, side in ((self.bproc, "b"), (self.a, "a")):
                data = os.path.join(self.b.work, f"perf-{side}-{phase}.data")
                self.perf.append(subprocess.Popen(
                    ["perf", "record", "-F", "499", "-g", "-p", str(proc.pid), "-o", data],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        self.cpu0 = (cpu_seconds(self.a.pid), cpu_seconds(self.bproc.pid))
        return self.bproc.pid

    def stop(self, phase):
        a0, b0 = self.cpu0
        cpu = f"{cpu_used(self.a.pid, a0)}+{cpu_used(self.bproc.pid, b0)}"
        log(f"engine: CPU seconds of the sidecars in phase ({phase}) after the images were"
            f" written: site-a+site-b {cpu}")
        for perf in self.perf:
            perf.send_signal(signal.SIGINT)
            perf.wait()
        self.b.procs.stop(self.bproc)
        self.b.procs.stop(self.a)
        with open(self.log_b) as src, open(self.log_b.replace(".log", ".all.log"), "a") as dst:
            shutil.copyfileobj(src, dst)
        return cpu

    def grpc(self, method, request):
        """One call to site-a's sidecar through grpcurl; its answer parsed (None when
        it failed)."""
        p = subprocess.run(["grpcurl", "-plaintext", "-unix", "-authority", "localhost", "-d",
                            json.dumps(request), self.sa, f"replication.Controller/{method}"],
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        return json.loads(p.stdout or "{}") if p.returncode == 0 else None

    def copy_seconds(self, names):
        """The largest lastSyncDuration over the images, as GetVolumeReplicationInfo
        reports it."""
        most = 0.0
        for n in names:
            info = self.grpc("GetVolumeReplicationInfo",
                             {"replication_source": {"volume": {"volume_id": self.pair.image(n)}}})
            most = max(most, float((info or {}).get("lastSyncDuration", "0s").rstrip("s") or 0))
        return most

    def note(self, scenario, out, names):
        """The engine's copy time and a timeline of the sync from site-b's log."""
        self.fig.copy[scenario] = self.copy_seconds(names)
        tl = self.b.timing("timeline", self.log_b, out["t0"], *names, quiet=False)
        last = f", last image +{tl['pickup_last']}s" if tl["pickup_last"] != tl["pickup"] else ""
        self.fig.notes[scenario] = (
            f"pickup (first log line of the image) +{tl['pickup']}s{last}, copy (engine, max)"
            f" {tl['copy_seconds_max']}s, complete in log +{tl['complete_logged']}s, reported"
            f" complete +{out['seconds']}s, replica snapshot seen +{out.get('snapshot_seconds')}s")
        with open(os.path.join(self.b.work, f"timeline-{scenario}.txt"), "w") as f:
            f.write("".join(line + "\n" for line in tl["lines"]))

    def enable(self, scenario, *names):
        """Enable of the images, timed to their first sync point; with the engine's
        copy time and timeline."""
        out = self.b.timing("engine-enable", self.sa, *names)
        self.note(scenario, out, names)
        return out

    def phase_c(self):
        self.fig.record("engine", "c", self.enable("c", f"{self.prefix}c"))
        self.fig.alloc["c"] = self.pair.allocated_mib("site-b")

    def serial(self, names):
        out = self.b.timing("engine-serial", self.sa, *names)
        self.fig.record("engine", "ds", out)
        self.fig.calls["engine"] = json.dumps(out["calls"], separators=(",", ":"))

    def switch(self):
        """(s): migrate start, ready, writes up to the switch, migrate switch."""
        s, work = self.s, self.b.work
        names = s.switch(self.prefix)
        mig = ["--from", "site-a", "--from-endpoint", f"unix://{self.sa}", "--to-endpoint",
               f"unix://{self.sb}", "--pool", s.pool]

        def migrate(verb, *args):
            path = os.path.join(work, f"migrate-{verb}.txt")
            with open(path, "w") as out:
                rc = subprocess.run([s.bin, "migrate", verb, *mig, *args], stdout=out,
                                    stderr=subprocess.STDOUT).returncode
            with open(path) as f:
                return rc, f.read()

        rc, text = migrate("start", "--schedule", "10s")
        if rc:
            die(f"migrate start failed: {text}")
        deadline = time.time() + s.timeout
        while migrate("status")[0] != 0:
            if time.time() > deadline:
                die(f"migration not ready in {s.timeout}s: {migrate('status')[1][-400:]}")
            time.sleep(0.5)
        out = self.b.timing("write-for", s.s_write_seconds, *names)
        rc, text = migrate("switch", "--parallel", "16")
        t1 = time.time()
        if rc:
            die(f"migrate switch failed: {text}")
        self.fig.res["engine.s"] = round(t1 - out["t_closed"], 3)
        last = text.strip().splitlines()[-1] if text.strip() else ""
        self.fig.notes["s"] = (f"{last}; {out['written']} bytes written in {s.s_write_seconds}s"
                               " before it")
        log(f"engine {self.fig.titles['s']}: {self.fig.res['engine.s']}s from the writes stopped;"
            f" {self.fig.notes['s']}")

    def phase_j(self):
        p = self.prefix
        for img in [f"{p}j", *self.s.journal_idle(p)]:
            if self.grpc("EnableVolumeReplication", {
                    "replication_source": {"volume": {"volume_id": self.pair.image(img)}},
                    "parameters": {"mirroringMode": "journal"}}) is None:
                die(f"EnableVolumeReplication {img} (journal) failed")

        def replaying(names):
            caught_up = [line for line in engine_metrics(self.s.j_port, timeout=5) or []
                         if line.startswith("csi_rbd_replicator_journal_caught_up_timestamp_seconds{")]
            return sum(1 for n in names if any(f'image="{n}"' in line for line in caught_up))

        self.b.journal_phase("engine", p, self.bproc.pid, replaying)


class Mirror(Tool):
    """Native rbd-mirror (snapshot mode; journal mode in (j) and (s)) on site-b."""

    name, prefix, title = "rbd-mirror", "mir-", "rbd-mirror"
    skipped = {"g": "Ceph 16 has no group mirroring"}

    def phases(self):
        p, s, t, rec = self.prefix, self.s, self.b.timing, self.fig.record
        return {
            "ab": lambda: self.ab(lambda img: t("mirror-enable", img),
                                  lambda r: t("mirror-snap", f"{p}a")),
            "c": self.phase_c,
            "d": lambda: rec("rbd-mirror", "d", t("mirror-enable", *s.multi(p))),
            "ds": self.serial,
            "m1": lambda: rec("rbd-mirror", "m1", t("mirror-enable", f"{p}m1")),
            "mt": lambda: rec("rbd-mirror", "mt", t("mirror-enable", f"{p}mt")),
            "n": lambda: rec("rbd-mirror", "n", t("mirror-enable", *s.many(p))),
            "s": self.switch,
            "j": self.phase_j,
        }

    def start(self, phase):
        work = self.b.work
        with open(os.path.join(work, "rbd-mirror.out"), "a") as out:
            self.proc = self.b.procs.start(
                ["rbd-mirror", "--cluster", "site-b", "--id", "admin", "-f", "--log-file",
                 os.path.join(work, "rbd-mirror.log")], out, cwd=work)
        for _ in range(120):
            if any(d.get("leader") for d in self.pool_status().get("daemons", [])):
                break
            if self.proc.poll() is not None:
                die(f"rbd-mirror exited; see {work}/rbd-mirror.out")
            time.sleep(0.5)
        else:
            log("warning: rbd-mirror reported no leader in 60s; measuring anyway")
        self.cpu0 = cpu_seconds(self.proc.pid)
        return self.proc.pid

    def stop(self, phase):
        cpu = cpu_used(self.proc.pid, self.cpu0)
        log(f"rbd-mirror: CPU seconds in phase ({phase}): {cpu}")
        self.b.procs.stop(self.proc)
        return cpu

    def pool_status(self):
        """Site-b's `mirror pool status --verbose` ({} while it cannot be read)."""
        return self.pair.rbd_json("site-b", "mirror", "pool", "status", self.s.pool,
                                  "--verbose") or {}

    def replicas(self):
        """The images of the pool status, one dict each."""
        return self.pool_status().get("images", [])

    def phase_c(self):
        self.fig.record("rbd-mirror", "c", self.b.timing("mirror-enable", f"{self.prefix}c"))
        self.fig.alloc_mirror = self.pair.allocated_mib("site-b")

    def serial(self):
        out = self.b.timing("mirror-serial", *self.s.multi(self.prefix))
        self.fig.record("rbd-mirror", "ds", out)
        self.fig.calls["rbd-mirror"] = json.dumps(out["calls"], separators=(",", ":"))

    def switch(self):
        """(s) the runbook's way: journal-based pool mirroring, pool demote on site-a,
        pool promote on site-b until every image is primary there."""
        s, pair, work = self.s, self.pair, self.b.work
        names = s.switch(self.prefix)
        for site in SITES:
            pair.rbd(site, "mirror", "pool", "enable", s.pool, "pool", "--site-name", site)
        deadline, n = time.time() + s.timeout, 0
        while True:
            n = sum(1 for i in self.replicas() if i.get("state") == "up+replaying"
                    and '"entries_behind_primary":0' in (i.get("description") or ""))
            if n == len(names):
                break
            if time.time() > deadline:
                die(f"rbd-mirror: {len(names)} images not caught up in {s.timeout}s (got {n})")
            time.sleep(0.5)
        # Counted in this process over one connection, so that the loop below measures
        # the promotions and nothing of the benchmark's own start-up or sampling.
        cluster = connect("site-b")
        try:
            io = cluster.open_ioctx(s.pool)

            def primaries():
                count = 0
                for name in names:
                    with rbd.Image(io, name, read_only=True) as img:
                        count += bool(img.mirror_image_get_info().get("primary"))
                return count

            out = self.b.timing("write-for", s.s_write_seconds, *names)
            demote = subprocess.run(pair.cli("rbd", "site-a", "mirror", "pool", "demote", s.pool),
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            if demote.returncode:
                die(f"mirror pool demote failed: {demote.stdout}")
            rounds, n = 0, 0
            with open(os.path.join(work, "mirror-promote.txt"), "a") as log_file:
                while rounds < s.timeout * 10:
                    rounds += 1
                    subprocess.run(pair.cli("rbd", "site-b", "mirror", "pool", "promote", s.pool),
                                   stdout=log_file, stderr=subprocess.STDOUT)
                    n = primaries()
                    if n == len(names):
                        break
            t1 = time.time()
            io.close()
        finally:
            cluster.shutdown()
        if n != len(names):
            die(f"rbd-mirror: only {n} of {len(names)} images primary on site-b")
        self.fig.res["rbd-mirror.s"] = round(t1 - out["t_closed"], 3)
        first = (demote.stdout.strip().splitlines() or [""])[0]
        log(f"rbd-mirror {self.fig.titles['s']}: {self.fig.res['rbd-mirror.s']}s from the writes"
            f" stopped ({rounds} pool promote rounds; {first})")

    def phase_j(self):
        p = self.prefix
        for img in [f"{p}j", *self.s.journal_idle(p)]:
            self.pair.rbd("site-a", "mirror", "image", "enable", self.pair.image(img), "journal")

        def replaying(names):
            up = {i.get("name") for i in self.replicas() if i.get("state") == "up+replaying"}
            return sum(1 for n in names if n in up)

        self.b.journal_phase("rbd-mirror", p, self.proc.pid, replaying)


class Export(Tool):
    """`rbd export-diff | rbd import-diff`: no daemon, no mirror peers."""

    name, prefix, title = "export-diff", "exp-", "export-diff | import-diff"
    peers = False
    # (d) serial times Enable/Promote calls; (e) and (f) are about the replaying process
    # (memory, many images), which export-diff does not have; nor has it roles to
    # switch (s), groups (g) or journals (j).

    def phases(self):
        p, t = self.prefix, self.b.timing
        return {
            "ab": lambda: self.ab(lambda img: self.first("1G", [img]),
                                  lambda r: t("export", f"s{r}", f"s{r + 1}", f"{p}a")),
            "c": self.phase_c,
            "d": lambda: self.fig.record("export-diff", "d", self.first("64M", self.s.multi(p))),
        }

    def first(self, size, names):
        """The destination images (before t0), then the first full export, timed."""
        for n in names:
            self.pair.create("site-b", n, size)
        return self.b.timing("export", "-", "s1", *names)

    def phase_c(self):
        self.fig.record("export-diff", "c", self.first("4G", [f"{self.prefix}c"]))
        self.fig.alloc_export = self.pair.allocated_mib("site-b")


# --- main -------------------------------------------------------------------------------
def disk_check(settings):
    """The OSDs are sparse files that bluestore never shrinks: every run leaves them
    larger (about 25 full runs filled a 68 GiB disk). Refuse to start without room."""
    pair_dir = os.environ["CSIRR_PAIR_DIR"]
    free = shutil.disk_usage(pair_dir).free // GIB
    du = subprocess.run(["du", "-s", "-BG", pair_dir], stdout=subprocess.PIPE,
                        stderr=subprocess.DEVNULL, text=True).stdout.split()
    log(f"pair files: {du[0].rstrip('G') if du else '?'} GiB; free: {free} GiB")
    if free < settings.min_free_gib:
        die(f"only {free} GiB free next to the pair (a run writes about 12 GiB into its OSD"
            " files, which never shrink): reset the pair with 'deploy/dev/ceph-pair.sh down &&"
            " deploy/dev/ceph-pair.sh up'")


def run_once(settings):
    work = tempfile.mkdtemp(prefix="csirr-bench.")
    bench, ok = Bench(settings, work), False
    try:
        bench.run()
        ok = True
    finally:
        bench.close(ok)


def main():
    # SIGTERM ends the run as Ctrl-C does: the daemons are stopped and the pool deleted.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(130))
    try:
        settings = Settings(os.environ)
        disk_check(settings)
        if settings.runs <= 1:
            run_once(settings)
            return 0
        runs_dir = tempfile.mkdtemp(prefix="csirr-bench-runs.")
        results = []
        for run in range(1, settings.runs + 1):
            log(f"run {run} of {settings.runs}")
            settings.results_json = os.path.join(runs_dir, f"run{run}.json")
            try:
                run_once(settings)
            except BenchError as e:
                die(f"run {run} failed: {e} (its results: {runs_dir})")
            results.append(settings.results_json)
        return subprocess.run(["/usr/bin/python3", os.path.join(HERE, "medians.py"),
                               *results]).returncode
    except BenchError as e:
        log(f"ERROR: {e}")
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
