"""Triggers one scenario and times it to the moment the replica is complete.

Prints one JSON object: t0, t_end (epoch seconds), seconds, and per-image ends.
"""
import json
import os
import subprocess
import sys
import threading
import time

import rados
import rbd

from common import connect

POLL = 0.05


def snapshots(io, name):
    try:
        with rbd.Image(io, name, read_only=True) as img:
            return list(img.list_snaps())
    except rbd.ImageNotFound:
        return []


def has_snap(io, name, snap):
    return any(s["name"] == snap for s in snapshots(io, name))


def sync_seq(name):
    """Sequence number of a sync snapshot name (csirr-sync.<seq>[.<tag>]), else None."""
    if not name.startswith("csirr-sync."):
        return None
    digits = name[len("csirr-sync."):].split(".", 1)[0]
    return int(digits) if digits.isdigit() else None


def newest_sync_snap(io, name):
    snaps = [(sync_seq(s["name"]), s["name"]) for s in snapshots(io, name)]
    snaps = [x for x in snaps if x[0] is not None]
    return max(snaps)[1] if snaps else None


def remembered_snap(io, target, name):
    """The newest sync snapshot of `name`, remembered in `target` once it exists."""
    if name not in target:
        snap = newest_sync_snap(io, name)
        if snap is None:
            return None
        target[name] = snap
    return target[name]


def newest_primary_mirror_snap(io, name):
    ids = [s["id"] for s in snapshots(io, name)
           if s.get("namespace") == rbd.RBD_SNAP_NAMESPACE_TYPE_MIRROR
           and (s.get("mirror") or {}).get("state") == rbd.RBD_SNAP_MIRROR_STATE_PRIMARY]
    if not ids:
        raise SystemExit(f"{name}: no primary mirror snapshot on site-a")
    return max(ids)


def mirror_complete(io, name, primary_snap_id):
    try:
        snaps = snapshots(io, name)
    except rbd.Error:
        return False
    for s in snaps:
        m = s.get("mirror") or {}
        if (s.get("namespace") == rbd.RBD_SNAP_NAMESPACE_TYPE_MIRROR
                and m.get("primary_snap_id") == primary_snap_id and m.get("complete")):
            return True
    return False


REGISTRY = "csi-rbd-replicator.registry"


def pb_field(num, payload):
    """A length-delimited protobuf field (tag, varint length, bytes)."""
    out, n = bytearray([(num << 3) | 2]), len(payload)
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out) + payload


def fields(msg):
    """(number, wire type, value) of each field of a protobuf message."""
    i = 0
    while i < len(msg):
        key, i = varint(msg, i)
        num, wt = key >> 3, key & 7
        if wt == 0:
            val, i = varint(msg, i)
        elif wt == 2:
            n, i = varint(msg, i)
            val, i = msg[i:i + n], i + n
        elif wt == 1:
            val, i = msg[i:i + 8], i + 8
        elif wt == 5:
            val, i = msg[i:i + 4], i + 4
        else:
            raise ValueError(f"wire type {wt}")
        yield num, wt, val


def varint(msg, i):
    out = shift = 0
    while True:
        b = msg[i]
        i += 1
        out |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return out, i


def first_bytes(msg, num):
    """The first length-delimited field `num` of `msg`, or None."""
    return next((v for n, wt, v in fields(msg or b"") if n == num and wt == 2), None)


def first_string(msg, num):
    v = first_bytes(msg, num)
    return v.decode() if v is not None else ""


def engine_reported(io, ids, name, snap):
    """Whether the replica's site reported `snap` as its complete sync point in the
    primary's registry (what GetVolumeReplicationInfo returns as lastSyncTime): the
    replayer writes that once the delta is flushed on the replica."""
    if name not in ids:
        try:
            with rbd.Image(io, name, read_only=True) as img:
                ids[name] = img.id()
        except rbd.ImageNotFound:
            return False
    prefix = f"status.{ids[name]}."
    with rados.ReadOpCtx() as op:
        it, _ = io.get_omap_vals(op, "", prefix, 64)
        try:
            io.operate_read_op(op, REGISTRY)
        except rados.ObjectNotFound:
            return False
        vals = [v for _, v in it]
    for v in vals:
        try:
            last = (json.loads(v).get("last_sync") or {}).get("snap_name")
        except ValueError:
            continue
        if last == snap:
            return True
    return False


def engine_wait(ia, ib, names, snap_of, timeout, procs=()):
    """Ends when the engine reports each image complete, then also waits for the
    replica's snapshot of it (taken right after the report): returns both."""
    ids = {}
    ends = wait_all(names, lambda n: snap_of(n) is not None
                    and engine_reported(ia, ids, n, snap_of(n)), timeout, procs)
    snaps = wait_all(names, lambda n: has_snap(ib, n, snap_of(n)), timeout)
    return ends, snaps


def wait_all(names, done, timeout, procs=()):
    """Polls done(name) for every name; returns {name: end time}. Also fails fast
    when a trigger process failed."""
    ends, pending = {}, list(names)
    deadline = time.time() + timeout
    while pending:
        for p, what in procs:
            rc = p.poll()
            if rc not in (None, 0):
                err = p.stderr.read().decode(errors="replace") if p.stderr else ""
                raise SystemExit(f"{what} failed (exit {rc}): {err.strip()}")
        for n in list(pending):
            if done(n):
                ends[n] = time.time()
                pending.remove(n)
        if not pending:
            break
        if time.time() > deadline:
            raise SystemExit(f"timed out after {timeout}s waiting for {pending}")
        time.sleep(POLL)
    return ends


def percentiles(lat):
    """{call: "p50/p99/max" in ms} of latency samples in seconds."""
    out = {}
    for k, v in lat.items():
        if not v:
            continue
        v = sorted(v)

        def at(q):
            return v[min(len(v) - 1, int(q * len(v)))] * 1000

        out[k] = f"{at(0.5):.0f}/{at(0.99):.0f}/{v[-1] * 1000:.0f}"
    return out


def report(t0, ends, **extra):
    t_end = max(ends.values())
    out = {"t0": t0, "t_end": t_end, "seconds": round(t_end - t0, 3),
           "ends": {k: round(v - t0, 3) for k, v in ends.items()}}
    out.update(extra)
    print(json.dumps(out))


def main():
    cmd, pool, timeout = sys.argv[1], sys.argv[2], float(sys.argv[3])
    args = sys.argv[4:]
    a, b = connect("site-a"), connect("site-b")
    ia, ib = a.open_ioctx(pool), b.open_ioctx(pool)

    if cmd == "engine-enable":  # SOCK IMG...: Enable, then wait for the first sync snapshot
        import grpc
        sock, names = args[0], args[1:]
        channel = grpc.insecure_channel(f"unix://{sock}")
        grpc.channel_ready_future(channel).result(timeout=30)
        enable = channel.unary_unary("/replication.Controller/EnableVolumeReplication",
                                     request_serializer=None, response_deserializer=None)
        t0 = time.time()
        by_name, target = {}, {}
        for n in names:
            # EnableVolumeReplicationRequest{replication_source{volume{volume_id}}}
            vid = f"{pool}/{n}".encode()
            req = pb_field(5, pb_field(1, pb_field(1, vid)))
            by_name[n] = enable.future(req, timeout=timeout)

        # The first sync snapshot (taken right after Enable answered): known once
        # it exists; then the replica must report that sync point complete.
        def snap_of(n):
            if n not in target:
                f = by_name[n]
                if not f.done():
                    return None
                if f.exception() is not None:
                    raise SystemExit(f"EnableVolumeReplication {n} failed: {f.exception()}")
            return remembered_snap(ia, target, n)

        ends, snaps = engine_wait(ia, ib, names, snap_of, timeout)
        report(t0, ends, snapshot=target[names[0]],
               snapshot_seconds=round(max(snaps.values()) - t0, 3))

    elif cmd == "engine-serial":  # SOCK IMG...: per image Enable then Promote, one after another
        import grpc
        sock, names = args[0], args[1:]
        channel = grpc.insecure_channel(f"unix://{sock}")
        grpc.channel_ready_future(channel).result(timeout=30)
        method = {"Enable": "EnableVolumeReplication", "PromoteVolume": "PromoteVolume",
                  "GetVolumeReplicationInfo": "GetVolumeReplicationInfo"}
        call = {m: channel.unary_unary(f"/replication.Controller/{rpc}",
                                       request_serializer=None, response_deserializer=None)
                for m, rpc in method.items()}
        # The requests carry replication_source{volume{volume_id}} under their own
        # field number: 5 (Enable), 6 (Promote), 4 (GetVolumeReplicationInfo).
        field = {"Enable": 5, "PromoteVolume": 6, "GetVolumeReplicationInfo": 4}
        lat = {"enable": [], "promote": [], "info": []}

        def timed(m, key, n):
            req = pb_field(field[m], pb_field(1, pb_field(1, f"{pool}/{n}".encode())))
            t = time.time()
            call[m](req, timeout=timeout)
            lat[key].append(time.time() - t)

        t0 = time.time()
        for n in names:
            timed("Enable", "enable", n)
            timed("PromoteVolume", "promote", n)
        t_trig = time.time()
        target = {}

        def snap_of(n):
            return remembered_snap(ia, target, n)

        ends, snaps = engine_wait(ia, ib, names, snap_of, timeout)
        for n in names:
            timed("GetVolumeReplicationInfo", "info", n)
        report(t0, ends, trigger_seconds=round(t_trig - t0, 3), calls=percentiles(lat),
               snapshot_seconds=round(max(snaps.values()) - t0, 3))

    elif cmd == "engine-group":  # SOCK IMG...: CreateVolumeGroup, Enable of the group, first cut
        import grpc
        sock, names = args[0], args[1:]
        channel = grpc.insecure_channel(f"unix://{sock}")
        grpc.channel_ready_future(channel).result(timeout=30)
        unary = lambda path: channel.unary_unary(path, request_serializer=None,
                                                  response_deserializer=None)
        # CreateVolumeGroupRequest{name = 1, volume_ids = 4}, made before t0 as the
        # VolumeGroupReplicationContent controller does before the VolumeReplication.
        req = pb_field(1, f"bench-{os.getpid()}".encode())
        for n in names:
            req += pb_field(4, f"{pool}/{n}".encode())
        resp = unary("/volumegroup.Controller/CreateVolumeGroup")(req, timeout=timeout)
        group_id = first_string(first_bytes(resp, 1), 1)  # volume_group{volume_group_id}
        # replication_source{volumegroup{volume_group_id}}: Enable field 5, Info field 4.
        source = pb_field(2, pb_field(1, group_id.encode()))
        t0 = time.time()
        unary("/replication.Controller/EnableVolumeReplication")(pb_field(5, source),
                                                                  timeout=timeout)
        t_enable = time.time()
        info = unary("/replication.Controller/GetVolumeReplicationInfo")
        deadline = t0 + timeout
        while True:
            # GetVolumeReplicationInfoResponse.last_sync_time = 1: the last complete cut.
            if first_bytes(info(pb_field(4, source), timeout=timeout), 1) is not None:
                break
            if time.time() > deadline:
                raise SystemExit(f"group {group_id}: no complete cut after {timeout}s")
            time.sleep(0.05)
        t_end = time.time()
        print(json.dumps({"t0": t0, "t_end": t_end, "seconds": round(t_end - t0, 3),
                          "trigger_seconds": round(t_enable - t0, 3), "group": group_id}))

    elif cmd == "mirror-serial":  # IMG...: per image `mirror image enable`, one after another
        names = args
        imgs = {n: rbd.Image(ia, n) for n in names}
        ids = {}
        # ceph-csi's counterparts: Enable = mirror image enable; Promote of a primary =
        # reading its mirror info (ceph-csi answers from it); Info = the mirror status.
        lat = {"enable": [], "promote": [], "info": []}
        t0 = time.time()
        for n in names:
            t = time.time()
            imgs[n].mirror_image_enable(rbd.RBD_MIRROR_IMAGE_MODE_SNAPSHOT)
            lat["enable"].append(time.time() - t)
            t = time.time()
            imgs[n].mirror_image_get_info()
            lat["promote"].append(time.time() - t)
            ids[n] = newest_primary_mirror_snap(ia, n)
        t_trig = time.time()
        ends = wait_all(names, lambda n: mirror_complete(ib, n, ids[n]), timeout)
        for n in names:
            t = time.time()
            imgs[n].mirror_image_get_status()
            lat["info"].append(time.time() - t)
        for img in imgs.values():
            img.close()
        report(t0, ends, trigger_seconds=round(t_trig - t0, 3), calls=percentiles(lat))

    elif cmd == "write-spread":  # IMG SIZE_BYTES: create it, 256 writes of 256 KiB spread over it
        name, size = args[0], int(args[1])
        rbd.RBD().create(ia, name, size, old_format=False,
                         features=rbd.RBD_FEATURE_LAYERING | rbd.RBD_FEATURE_EXCLUSIVE_LOCK
                         | rbd.RBD_FEATURE_OBJECT_MAP | rbd.RBD_FEATURE_FAST_DIFF)
        chunk = os.urandom(256 << 10)
        with rbd.Image(ia, name) as img:
            step = size // 256
            for i in range(256):
                img.write(chunk, i * step + (i % 7) * 4096)
            img.flush()
        print(json.dumps({"written": 256 * len(chunk)}))

    elif cmd == "write-for":  # SECONDS IMG...: 256 KiB to each image every 0.5 s, then close
        seconds, names = float(args[0]), args[1:]
        chunk = os.urandom(256 << 10)
        imgs = [rbd.Image(ia, n) for n in names]
        end, k, written = time.time() + seconds, 0, 0
        while time.time() < end:
            t = time.time()
            for img in imgs:
                img.write(chunk, ((k * 7919) % (img.size() // len(chunk))) * len(chunk))
                written += len(chunk)
            k += 1
            time.sleep(max(0.0, 0.5 - (time.time() - t)))
        for img in imgs:
            img.flush()
            img.close()
        print(json.dumps({"written": written, "t_closed": time.time()}))

    elif cmd == "create-many":  # PREFIX COUNT SIZE_BYTES: images written in full
        prefix, count, size = args[0], int(args[1]), int(args[2])
        data = os.urandom(size)
        for i in range(1, count + 1):
            n = f"{prefix}{i:03d}"
            rbd.RBD().create(ia, n, size, old_format=False,
                             features=rbd.RBD_FEATURE_LAYERING | rbd.RBD_FEATURE_EXCLUSIVE_LOCK
                             | rbd.RBD_FEATURE_OBJECT_MAP | rbd.RBD_FEATURE_FAST_DIFF)
            with rbd.Image(ia, n) as img:
                img.write(data, 0)
        print(json.dumps({"images": count}))

    elif cmd == "engine-snap":  # IMG...: the next sync snapshot, taken by hand
        names = args
        seq = max(sync_seq(newest_sync_snap(ia, n) or "csirr-sync.0") for n in names) + 1
        snap = f"csirr-sync.{seq:010d}"
        imgs = [rbd.Image(ia, n) for n in names]
        t0 = time.time()
        for img in imgs:
            img.create_snap(snap)
        # What the engine's scheduler does after taking a sync snapshot: notify the
        # registry, which the peer's replayer watches.
        ia.notify(REGISTRY, "", 5000)
        t_trig = time.time()
        for img in imgs:
            img.close()
        ends, snaps = engine_wait(ia, ib, names, lambda n: snap, timeout)
        report(t0, ends, trigger_seconds=round(t_trig - t0, 3), snapshot=snap,
               snapshot_seconds=round(max(snaps.values()) - t0, 3))

    elif cmd in ("mirror-enable", "mirror-snap"):  # IMG...
        names = args
        imgs = {n: rbd.Image(ia, n) for n in names}
        ids, errs = {}, []

        def trigger(n):
            try:
                if cmd == "mirror-enable":
                    imgs[n].mirror_image_enable(rbd.RBD_MIRROR_IMAGE_MODE_SNAPSHOT)
                    ids[n] = newest_primary_mirror_snap(ia, n)
                else:
                    ids[n] = imgs[n].mirror_image_create_snapshot()
            except Exception as e:  # noqa: BLE001 - reported below
                errs.append(f"{n}: {e}")

        t0 = time.time()
        threads = [threading.Thread(target=trigger, args=(n,)) for n in names]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        t_trig = time.time()
        if errs:
            raise SystemExit("; ".join(errs))
        ends = wait_all(names, lambda n: mirror_complete(ib, n, ids[n]), timeout)
        for img in imgs.values():
            img.close()
        report(t0, ends, trigger_seconds=round(t_trig - t0, 3))

    elif cmd == "export":  # FROM|- TO IMG...
        frm, to, names = args[0], args[1], args[2:]
        imgs = [rbd.Image(ia, n) for n in names]
        conf_a = f"-c '{os.environ['CSIRR_SITE_A_CONF']}' --keyring '{os.environ['CSIRR_SITE_A_KEYRING']}'"
        conf_b = f"-c '{os.environ['CSIRR_SITE_B_CONF']}' --keyring '{os.environ['CSIRR_SITE_B_KEYRING']}'"
        from_arg = "" if frm == "-" else f"--from-snap '{frm}'"
        procs, snapped, errs = {}, {}, []

        # Per image, as the other tools do: take the snapshot, then start its pipe;
        # all images at once (snapshot creations wait on the monitor, ~1 s each).
        def one(n, img):
            try:
                img.create_snap(to)
                snapped[n] = time.time()
                sh = (f"set -o pipefail; rbd {conf_a} export-diff --no-progress {from_arg} "
                      f"'{pool}/{n}@{to}' - | rbd {conf_b} import-diff --no-progress - '{pool}/{n}'")
                procs[n] = subprocess.Popen(["bash", "-c", sh], stdout=subprocess.DEVNULL,
                                            stderr=subprocess.PIPE)
            except Exception as e:  # noqa: BLE001 - reported below
                errs.append(f"{n}: {e}")

        t0 = time.time()
        threads = [threading.Thread(target=one, args=(n, img)) for n, img in zip(names, imgs)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errs:
            raise SystemExit("; ".join(errs))
        t_trig = max(snapped.values())
        ends, deadline = {}, time.time() + timeout
        while len(ends) < len(procs):
            for n, p in procs.items():
                if n not in ends and p.poll() is not None:
                    ends[n] = time.time()
                    if p.returncode != 0:
                        raise SystemExit(f"export-diff | import-diff of {n} failed: "
                                         f"{p.stderr.read().decode(errors='replace').strip()}")
            if time.time() > deadline:
                raise SystemExit(f"timed out after {timeout}s")
            time.sleep(0.01)
        for img in imgs:
            img.close()
        missing = [n for n in names if not has_snap(ib, n, to)]
        if missing:
            raise SystemExit(f"import-diff left no snapshot {to} on {missing}")
        report(t0, ends, trigger_seconds=round(t_trig - t0, 3))

    elif cmd == "timeline":  # LOG T0 IMG...: the sidecar's log lines of these images
        import re
        log, t0, names = args[0], float(args[1]), args[2:]
        ansi = re.compile(r"\x1b\[[0-9;]*m")
        stamp = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?)Z?\s")
        from datetime import datetime, timezone
        first, last_done, secs, lines = {}, {}, {}, []
        with open(log, errors="replace") as f:
            for raw in f:
                line = ansi.sub("", raw.rstrip("\n"))
                m = stamp.match(line)
                if not m:
                    continue
                ts = datetime.fromisoformat(m.group(1)).replace(tzinfo=timezone.utc).timestamp()
                if ts < t0 - 0.5:
                    continue
                for n in names:
                    if re.search(rf"[/=]{re.escape(n)}\b", line):
                        first.setdefault(n, ts)
                        if "complete" in line or "started" in line or "created" in line:
                            lines.append(f"  +{ts - t0:6.2f}s {line[m.end():][:200]}")
                        if "complete" in line:
                            last_done[n] = ts
                            s = re.search(r"seconds=([0-9.]+)", line)
                            if s:
                                secs[n] = float(s.group(1))
                        break
        out = {
            "pickup": round(min(first.values()) - t0, 3) if first else None,
            "pickup_last": round(max(first.values()) - t0, 3) if first else None,
            "complete_logged": round(max(last_done.values()) - t0, 3) if last_done else None,
            "copy_seconds_max": max(secs.values()) if secs else None,
            "lines": lines[:12] + (["  ..."] + lines[-4:] if len(lines) > 16 else lines[12:]),
        }
        print(json.dumps(out))
    else:
        raise SystemExit(f"unknown command {cmd}")


main()
