"""What the bench helpers share: a connection to one site of the pair.

The pair's environment (`deploy/dev/ceph-pair.sh env`) names each site's
configuration and keyring.
"""
import os
import urllib.request

import rados


def connect(site, cache=True):
    """A connected client.admin of `site` ("site-a" or "site-b"); `cache`
    False turns librbd's cache off (every read goes to the OSDs)."""
    s = "A" if site == "site-a" else "B"
    conf = {"keyring": os.environ[f"CSIRR_SITE_{s}_KEYRING"]}
    if not cache:
        conf["rbd_cache"] = "false"
    c = rados.Rados(conffile=os.environ[f"CSIRR_SITE_{s}_CONF"], name="client.admin", conf=conf)
    c.connect(timeout=30)
    return c


def engine_metrics(port, timeout=2):
    """The lines of the replaying sidecar's Prometheus page on 127.0.0.1:`port`
    (None while it cannot be read)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout) as r:
            return r.read().decode().splitlines()
    except OSError:
        return None
