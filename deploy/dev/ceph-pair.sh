#!/usr/bin/env bash
# ceph-pair.sh: two single-node Ceph clusters (site-a, site-b) on 127.0.0.1 for
# development and the integration tests.
#
# Usage: deploy/dev/ceph-pair.sh up | down | env | status
#        deploy/dev/ceph-pair.sh stop  SITE mon|mgr|osd|all
#        deploy/dev/ceph-pair.sh start SITE mon|mgr|osd|all
#        CSIRR_PAIR_NETNS=1 deploy/dev/ceph-pair.sh up|down|env|status|stop|start|partition|heal
#
#   up      create and start both clusters (no-op if already healthy; a complete pair
#           that does not answer, e.g. after a reboot or under load, has its stopped
#           daemons started and is waited for, never wiped, unless CSIRR_PAIR_WIPE=1;
#           incomplete leftover state is wiped and recreated; a pair of another state
#           dir that holds the ports is taken down first, unless CSIRR_PAIR_TAKEOVER=0)
#   down    stop every daemon of both clusters, remove the state dir and /etc/ceph links
#   env     print `export` lines: eval "$(deploy/dev/ceph-pair.sh env)"
#   status  `ceph -s` of both sites
#   stop/start one daemon (or all) of one site; start waits until the daemon is back
#           (mon: in quorum, mgr: available, osd: up); stop waits for the process to exit
#           (osd: also until the mon shows it down).
#
# Network-namespace mode (CSIRR_PAIR_NETNS=1, for the partition tests; the default mode
# above is unchanged by it): each site's daemons run in a network namespace of its own
# (csirr-a, csirr-b) and bind to 10.77.1.2 (site-a) / 10.77.2.2 (site-b). A veth pair
# links each namespace to the root namespace (10.77.1.1 / 10.77.2.1), so tests and tools
# there reach both clusters; a third veth pair `wan` links the two namespaces directly
# (10.77.3.1 <-> 10.77.3.2, with routes to the other site's /24), and a sidecar started
# inside a site's namespace (`ip netns exec csirr-b ...`) reaches its own cluster
# locally and the peer over `wan`. Default state dir <repo>/.pair-netns; /etc/ceph is
# not touched; one such pair per machine (the namespace names are fixed). Needs root.
#   partition   drop every packet on `wan`, both ways, silently (a `blackhole` qdisc:
#               this kernel has no netem, nftables or tc drop actions); both sites stay
#               reachable from the root namespace
#   heal        remove the blackhole qdiscs (`up` heals too)
# A netns pair and a default pair can run at once (different addresses and namespaces);
# neither mode's `up` takes down the other mode's pair.
#
# Layout (CSIRR_PAIR_DIR, default <repo>/.pair):
#   <site>/ceph.conf                      usable with ceph/rbd/rados -c; [client.admin] and
#                                         [client.csi-rbd-provisioner] name their keyrings
#   <site>/ceph.client.admin.keyring
#   <site>/ceph.client.csi-rbd-provisioner.keyring
#   <site>/secret/{userID,userKey}        Kubernetes-Secret-style (0600, no newline)
#   <site>/{mon,mgr,osd}/                 daemon data (osd: bluestore on a 30 GiB sparse file)
#   <site>/log/, <site>/run/              logs, pid files, admin sockets
#   csi-config.json, cluster-mapping.json ceph-csi formats
#   /etc/ceph/<site>.conf, /etc/ceph/<site>.client.admin.keyring  symlinks, so that
#                                         `--cluster site-a` works (native rbd-mirror)
#
# Sites: site-a mon v2 127.0.0.1:3300 v1 :6789, site-b mon v2 :3301 v1 :6790.
# Pool `replicapool` (rbd, 32 PGs, size 1) with namespace `ns1` on both sites;
# replicapool id is 1 on site-a and 2 on site-b ON PURPOSE (site-b gets the mgr's
# device_health_metrics pool first), so that code which confuses the two sites' pool ids
# fails in tests; cluster-mapping.json records the mapping. ns1 is also in mirror mode
# `image`. mon_allow_pool_delete is on and mon_max_pg_per_osd is 1000, so tests may
# create and delete their own pools (pass a small pg_num: the default is 32).
#
# Findings (Ceph 16.2.15, measured on this 2-core VM):
# * Times: `up` from nothing 16-19 s wall, ~25 s while cargo builds load the cores
#   (both sites in parallel: mon+osd up at ~7 s,
#   pools at ~13 s, peers/users/verification ~3 s more); `up` on a healthy pair ~0.5 s;
#   `down` ~1-2 s; `stop SITE osd` ~1.3 s (5 s if the site's mon is down: the OSD waits
#   osd_mon_shutdown_timeout); `start SITE osd` ~3.5 s; `stop SITE all` ~1 s;
#   `start SITE all` ~6 s. Data survives osd/mon/all restarts (checked with rbd export
#   | sha256sum before/after).
# * Peer bootstrap: `bootstrap import --direction rx-tx` on site-b ALSO registers site-b
#   as a peer on site-a (with mon_host and key), using the token's client.rbd-mirror-peer
#   credentials. One create (site-a) + one rx-tx import (site-b) is enough; no reverse
#   bootstrap is needed. The script verifies both sides and fails loudly otherwise.
# * Least-privilege CSI user: peer attributes live in mon config-key
#   `rbd/mirror/peer/<pool id>/<peer uuid>`, the local site name in `rbd/mirror/site_name`.
#   With plain `profile rbd`, `rbd mirror pool info --all` silently omits mon_host/key and
#   reports the fsid as site_name, and rbd.mirror_peer_get_attributes() fails with
#   ENOENT (not EPERM!). These caps work (CSI_MON_CAPS below; checked with the rbd CLI and
#   python3-rbd; other config-keys are still EACCES):
#     mon 'profile rbd, allow command "config-key get" with "key" prefix "rbd/mirror/peer/",
#          allow command "config-key get" with "key"="rbd/mirror/site_name"'
#     osd 'profile rbd'  mgr 'profile rbd'
# * Mon address strings librados accepts for one mon on a non-default port (rbd -m X):
#   `v2:127.0.0.1:3301`, `[v2:127.0.0.1:3301]`, `[v2:127.0.0.1:3301,v1:127.0.0.1:6790]`,
#   `127.0.0.1:3301` and `localhost:3301` (bare address on a port other than 6789 =
#   msgr2), `v1:127.0.0.1:6790`. `127.0.0.1:6790` works after a logged failed v2 attempt.
#   A bare `127.0.0.1` means ports 3300/6789, i.e. site-a. csi-config.json and
#   CSIRR_SITE_*_MON use `v2:127.0.0.1:330x`. Peer attributes store mon_host as
#   `[v2:127.0.0.1:3301/0,v1:127.0.0.1:6790/0]`, which works too.
# * Native rbd-mirror works with the /etc/ceph links:
#   `rbd-mirror --cluster site-b --id admin -f` replicated a snapshot-mirrored image.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/../.." && pwd)
NETNS=${CSIRR_PAIR_NETNS:-0}
if [[ $NETNS == 1 ]]; then
    PAIR_DIR=${CSIRR_PAIR_DIR:-$REPO_ROOT/.pair-netns}
else
    PAIR_DIR=${CSIRR_PAIR_DIR:-$REPO_ROOT/.pair}
fi
case "$PAIR_DIR" in /*) ;; *) PAIR_DIR="$PWD/$PAIR_DIR" ;; esac

POOL=replicapool
NAMESPACE=ns1
PG_NUM=32
SITES=(site-a site-b)
declare -A MON_V2_PORT=([site-a]=3300 [site-b]=3301)
declare -A MON_V1_PORT=([site-a]=6789 [site-b]=6790)
# Where each site's daemons bind (netns mode: inside the site's namespace).
declare -A SITE_IP=([site-a]=127.0.0.1 [site-b]=127.0.0.1)
declare -A SITE_NET=([site-a]=127.0.0.0/8 [site-b]=127.0.0.0/8)
declare -A SITE_NS=([site-a]= [site-b]=)
if [[ $NETNS == 1 ]]; then
    SITE_IP=([site-a]=10.77.1.2 [site-b]=10.77.2.2)
    SITE_NET=([site-a]=10.77.1.0/24 [site-b]=10.77.2.0/24)
    SITE_NS=([site-a]=csirr-a [site-b]=csirr-b)
fi
CSI_USER=csi-rbd-provisioner
# Extra mon caps: read the mirror peer attributes (mon_host, key) and the local site
# name from config-key (see Findings above).
CSI_MON_CAPS='profile rbd, allow command "config-key get" with "key" prefix "rbd/mirror/peer/", allow command "config-key get" with "key"="rbd/mirror/site_name"'
CSI_OSD_CAPS='profile rbd'
CSI_MGR_CAPS='profile rbd'
REQUIRED_PACKAGES=(ceph-mon ceph-osd ceph-mgr ceph-common rbd-mirror librbd-dev librados-dev libradospp-dev
    python3-rbd python3-rados jq)
WAIT_SECS=${CSIRR_PAIR_WAIT_SECS:-90}

log() { printf '[ceph-pair %s] %s\n' "$(date +%T)" "$*" >&2; }
die() {
    log "ERROR: $*"
    exit 1
}

site_dir() { printf '%s/%s' "$PAIR_DIR" "$1"; }
site_conf() { printf '%s/ceph.conf' "$(site_dir "$1")"; }
mon_vec() { printf '[v2:%s:%s,v1:%s:%s]' "${SITE_IP[$1]}" "${MON_V2_PORT[$1]}" "${SITE_IP[$1]}" "${MON_V1_PORT[$1]}"; }
# The single-address form handed to ceph-csi / librados users.
mon_addr() { printf 'v2:%s:%s' "${SITE_IP[$1]}" "${MON_V2_PORT[$1]}"; }

# The first line of a site's ceph.conf, which tells the pairs of each mode apart. A netns
# pair's does not contain the default mode's words "written by deploy/dev/ceph-pair.sh",
# so that older copies of this script do not take it for theirs and take it down.
conf_header() {
    if [[ $NETNS == 1 ]]; then
        printf '# %s of the csi-rbd-replicator dev pair in network namespaces (netns mode of ceph-pair.sh)' "$1"
    else
        printf '# %s of the csi-rbd-replicator dev pair; written by deploy/dev/ceph-pair.sh' "$1"
    fi
}

check_site() {
    case "${1:-}" in
    site-a | site-b) ;;
    *) die "unknown site '${1:-}' (expected site-a or site-b)" ;;
    esac
}

# ceph / rbd against one site, as client.admin, bounded in time.
c_ceph() {
    local site=$1
    shift
    timeout 60 ceph -c "$(site_conf "$site")" --connect-timeout 15 "$@"
}
c_rbd() {
    local site=$1
    shift
    timeout 120 rbd -c "$(site_conf "$site")" "$@"
}

ensure_packages() {
    local missing=() p
    for p in "${REQUIRED_PACKAGES[@]}"; do
        if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
            missing+=("$p")
        fi
    done
    if ((${#missing[@]})); then
        log "installing missing packages: ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -q >&2
        apt-get install -y -q -o Dpkg::Use-Pty=0 --no-install-recommends "${missing[@]}" >&2
    fi
}

# --- processes --------------------------------------------------------------------

# Pid of a daemon of ours from its pid file, only if that process is alive and really is
# that daemon with our config (pid files may be stale after a reboot).
daemon_pid() {
    local site=$1 daemon=$2 pidf pid
    pidf="$(site_dir "$site")/run/$(daemon_name "$daemon").pid"
    [[ -f $pidf ]] || return 1
    pid=$(<"$pidf")
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    owns_pid "$pid" "$site" "ceph-$daemon" || return 1
    printf '%s' "$pid"
}

# Does pid run BINARY with our site's config?
owns_pid() {
    local pid=$1 site=$2 bin=$3 cmd
    [[ -r /proc/$pid/cmdline ]] || return 1
    cmd=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null) || return 1
    [[ $cmd == *"$bin "* && $cmd == *"$(site_conf "$site")"* ]]
}

# All live processes started with this site's config (also those without pid files).
site_pids() {
    local site=$1 f pid bin
    while read -r f; do
        pid=${f#/proc/}
        pid=${pid%/cmdline}
        for bin in ceph-mon ceph-mgr ceph-osd; do
            if owns_pid "$pid" "$site" "$bin"; then
                printf '%s\n' "$pid"
                break
            fi
        done
    done < <(grep -lsF -- "$(site_conf "$site")" /proc/[0-9]*/cmdline || true)
}

daemon_name() {
    case "$1" in
    mon) echo mon.a ;;
    mgr) echo mgr.x ;;
    osd) echo osd.0 ;;
    esac
}

wait_pid_exit() {
    local pid=$1 secs=$2 i
    for ((i = 0; i < secs * 10; i++)); do
        [[ -d /proc/$pid ]] || return 0
        # a zombie of ours counts as gone
        [[ $(awk '/^State:/ {print $2}' "/proc/$pid/status" 2>/dev/null) == Z ]] && return 0
        sleep 0.1
    done
    return 1
}

kill_pid() {
    local pid=$1 what=$2
    kill -TERM "$pid" 2>/dev/null || return 0
    if ! wait_pid_exit "$pid" 30; then
        log "$what (pid $pid) did not exit after SIGTERM; sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        wait_pid_exit "$pid" 10 || log "WARNING: $what (pid $pid) still there"
    fi
}

mon_running() { daemon_pid "$1" mon >/dev/null; }

# --- waits ------------------------------------------------------------------------

# Run a command, show its output only if it fails.
quiet() {
    local out
    if ! out=$("$@" 2>&1); then
        log "command failed: $*"
        printf '%s\n' "$out" >&2
        return 1
    fi
}

wait_until() { # SECS DESCRIPTION CMD...
    local secs=$1 what=$2 deadline
    shift 2
    deadline=$((SECONDS + secs))
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || return 1
        sleep 0.5
    done
}

mon_in_quorum() { c_ceph "$1" --connect-timeout 5 quorum_status >/dev/null; }
osd_is_up() { [[ $(c_ceph "$1" --connect-timeout 5 osd stat -f json | jq -r '"\(.num_up_osds)/\(.num_in_osds)"') == 1/1 ]]; }
osd_is_down() { [[ $(c_ceph "$1" --connect-timeout 5 osd stat -f json | jq -r .num_up_osds) == 0 ]]; }
mgr_unavailable() { [[ $(c_ceph "$1" --connect-timeout 5 mgr stat -f json | jq -r .available) == false ]]; }
mgr_available() { [[ $(c_ceph "$1" --connect-timeout 5 mgr stat -f json | jq -r .available) == true ]]; }

# --- daemons ----------------------------------------------------------------------

start_daemon() {
    local site=$1 daemon=$2 dir
    dir=$(site_dir "$site")
    [[ -f $dir/ceph.conf ]] || die "$site: no $dir/ceph.conf; run '$0 up' first"
    if daemon_pid "$site" "$daemon" >/dev/null; then
        log "$site: $daemon already running"
        return 0
    fi
    # The daemons fork into the background and write their pid files; what they print
    # before that goes to log/<name>.out.
    local out pre=()
    out="$dir/log/$(daemon_name "$daemon").out"
    # netns mode: the daemon runs in its site's namespace.
    [[ -n ${SITE_NS[$site]} ]] && pre=(ip netns exec "${SITE_NS[$site]}")
    case "$daemon" in
    mon) without_inherited_fds "${pre[@]}" ceph-mon -c "$dir/ceph.conf" -i a >>"$out" 2>&1 ;;
    mgr) without_inherited_fds "${pre[@]}" ceph-mgr -c "$dir/ceph.conf" -i x >>"$out" 2>&1 ;;
    osd) without_inherited_fds "${pre[@]}" ceph-osd -c "$dir/ceph.conf" -i 0 >>"$out" 2>&1 ;;
    esac || die "$site: starting $daemon failed (see $out and $dir/log/$(daemon_name "$daemon").log)"
}

# Runs CMD with every file descriptor above 2 closed: a daemon restarted by a test
# must not keep the test runner's pipes or a caller's lock file open for its lifetime.
without_inherited_fds() {
    (
        local fd
        for fd in /proc/$BASHPID/fd/*; do
            fd=${fd##*/}
            ((fd > 2)) && eval "exec $fd>&-"
        done
        exec "$@"
    )
}

wait_daemon() {
    local site=$1 daemon=$2
    case "$daemon" in
    mon) wait_until "$WAIT_SECS" "mon" mon_in_quorum "$site" || die "$site: mon not in quorum after ${WAIT_SECS}s (see $(site_dir "$site")/log/mon.a.log)" ;;
    mgr) wait_until "$WAIT_SECS" "mgr" mgr_available "$site" || die "$site: mgr not available after ${WAIT_SECS}s (see $(site_dir "$site")/log/mgr.x.log)" ;;
    osd) wait_until "$WAIT_SECS" "osd" osd_is_up "$site" || die "$site: osd.0 not up after ${WAIT_SECS}s (see $(site_dir "$site")/log/osd.0.log)" ;;
    esac
}

cmd_start() {
    local site=$1 what=$2 d
    check_site "$site"
    case "$what" in
    mon | mgr | osd) ;;
    all) what="mon mgr osd" ;;
    *) die "unknown daemon '$what' (mon, mgr, osd or all)" ;;
    esac
    # Start everything first, then wait (mgr and osd come up in parallel).
    for d in $what; do
        if [[ $d == mon ]]; then
            log "$site: starting mon"
            start_daemon "$site" mon
            wait_daemon "$site" mon
            log "$site: mon is back"
            # An OSD stopped while the mon was down still shows up in the osdmap (the mon
            # would wait mon_osd_report_timeout, 15 min): mark it down now.
            if ! daemon_pid "$site" osd >/dev/null && osd_is_up "$site" 2>/dev/null; then
                c_ceph "$site" osd down 0 >/dev/null 2>&1 || true
            fi
        else
            mon_running "$site" || log "$site: warning: mon is not running; $d will wait for it"
            log "$site: starting $d"
            start_daemon "$site" "$d"
        fi
    done
    mon_running "$site" || {
        log "$site: mon not running: not waiting for $what"
        return 0
    }
    for d in $what; do
        [[ $d == mon ]] && continue
        wait_daemon "$site" "$d"
        log "$site: $d is back"
    done
}

stop_daemon() {
    local site=$1 daemon=$2 pid
    if ! pid=$(daemon_pid "$site" "$daemon"); then
        log "$site: $daemon not running"
        return 0
    fi
    log "$site: stopping $daemon (pid $pid)"
    kill_pid "$pid" "$site $daemon"
    if [[ $daemon == osd ]] && mon_running "$site"; then
        # osd_fast_shutdown_notify_mon makes the OSD tell the mon; make sure.
        if ! wait_until 10 "osd down" osd_is_down "$site"; then
            c_ceph "$site" osd down 0 >/dev/null 2>&1 || true
            wait_until 10 "osd down" osd_is_down "$site" || log "$site: warning: mon still shows osd.0 up"
        fi
    fi
    if [[ $daemon == mgr ]] && mon_running "$site"; then
        # Without this the mon shows the mgr available until its beacon grace (30 s)
        # runs out, and `start` could not tell the new mgr from the old one.
        c_ceph "$site" mgr fail x >/dev/null 2>&1 || true
        wait_until 10 "mgr gone" mgr_unavailable "$site" || log "$site: warning: mon still shows the mgr available"
    fi
}

cmd_stop() {
    local site=$1 what=$2 d
    check_site "$site"
    case "$what" in
    mon | mgr | osd) ;;
    all) what="osd mgr mon" ;;
    *) die "unknown daemon '$what' (mon, mgr, osd or all)" ;;
    esac
    for d in $what; do stop_daemon "$site" "$d"; done
}

# --- creating one site --------------------------------------------------------------

write_conf() {
    local site=$1 dir fsid
    dir=$(site_dir "$site")
    fsid=$(cat /proc/sys/kernel/random/uuid)
    cat >"$dir/ceph.conf" <<EOF
$(conf_header "$site")
[global]
fsid = $fsid
mon_host = $(mon_vec "$site")
public_network = ${SITE_NET[$site]}
ms_bind_ipv4 = true
ms_bind_ipv6 = false
auth_cluster_required = cephx
auth_service_required = cephx
auth_client_required = cephx
auth_allow_insecure_global_id_reclaim = false
mon_allow_pool_size_one = true
mon_allow_pool_delete = true
mon_warn_on_pool_no_redundancy = false
mon_max_pg_per_osd = 1000
osd_pool_default_size = 1
osd_pool_default_min_size = 1
osd_pool_default_pg_num = $PG_NUM
osd_pool_default_pgp_num = $PG_NUM
osd_pool_default_pg_autoscale_mode = off
osd_crush_chooseleaf_type = 0

[mon]
mon_data = $dir/mon
keyring = $dir/mon/keyring
log_file = $dir/log/\$name.log
pid_file = $dir/run/\$name.pid
admin_socket = $dir/run/\$name.asok
mon_data_avail_warn = 2

[mgr]
mgr_data = $dir/mgr
keyring = $dir/mgr/keyring
log_file = $dir/log/\$name.log
pid_file = $dir/run/\$name.pid
admin_socket = $dir/run/\$name.asok

[osd]
osd_data = $dir/osd
keyring = $dir/osd/keyring
log_file = $dir/log/\$name.log
pid_file = $dir/run/\$name.pid
admin_socket = $dir/run/\$name.asok
osd_objectstore = bluestore
bluestore_block_create = true
# Sparse: only what is written takes disk space. 30 GiB leaves room for the
# benchmark (4 GiB images) and for bluestore overhead with many snapshots.
bluestore_block_size = 32212254720
osd_memory_target = 1610612736

[client.admin]
keyring = $dir/ceph.client.admin.keyring

[client.$CSI_USER]
keyring = $dir/ceph.client.$CSI_USER.keyring
EOF
    printf '%s' "$fsid"
}

# Phase 1 of a site: config, keys, mon and osd mkfs, start mon + osd, wait for osd up.
create_site() {
    local site=$1 dir fsid osd_uuid osd_key mkfs_pid
    dir=$(site_dir "$site")
    mkdir -p "$dir"/{mon,mgr,osd,log,run,secret}
    chmod 700 "$dir/secret"
    fsid=$(write_conf "$site")
    local conf=$dir/ceph.conf

    quiet ceph-authtool --create-keyring "$dir/mon.keyring" --gen-key -n mon. --cap mon 'allow *'
    quiet ceph-authtool --create-keyring "$dir/ceph.client.admin.keyring" --gen-key -n client.admin \
        --cap mon 'allow *' --cap osd 'allow *' --cap mds 'allow *' --cap mgr 'allow *'
    quiet ceph-authtool --create-keyring "$dir/mgr/keyring" --gen-key -n mgr.x \
        --cap mon 'allow profile mgr' --cap osd 'allow *' --cap mds 'allow *'
    osd_key=$(ceph-authtool --gen-print-key)
    quiet ceph-authtool --create-keyring "$dir/osd/keyring" -n osd.0 --add-key "$osd_key" \
        --cap mon 'allow profile osd' --cap mgr 'allow profile osd' --cap osd 'allow *'
    # The mon starts out knowing admin, mgr.x and osd.0 (saves round trips later);
    # mon --mkfs copies mon.keyring to mon/keyring.
    local k
    for k in "$dir/ceph.client.admin.keyring" "$dir/mgr/keyring" "$dir/osd/keyring"; do
        quiet ceph-authtool "$dir/mon.keyring" --import-keyring "$k"
    done
    chmod 600 "$dir"/ceph.client.admin.keyring "$dir"/mon.keyring "$dir"/{mgr,osd}/keyring

    quiet monmaptool --create --fsid "$fsid" --addv a "$(mon_vec "$site")" "$dir/monmap"
    ceph-mon -c "$conf" --mkfs -i a --monmap "$dir/monmap" --keyring "$dir/mon.keyring" \
        >"$dir/log/mkfs-mon.log" 2>&1 || die "$site: ceph-mon --mkfs failed (see $dir/log/mkfs-mon.log)"

    # bluestore mkfs on the sparse file runs while the mon starts (it needs no mon).
    osd_uuid=$(cat /proc/sys/kernel/random/uuid)
    ceph-osd -c "$conf" -i 0 --mkfs --osd-uuid "$osd_uuid" >"$dir/log/mkfs-osd.log" 2>&1 &
    mkfs_pid=$!

    start_daemon "$site" mon
    wait_daemon "$site" mon
    # --osd-uuid of the mkfs must equal the uuid given here, or the OSD never comes up.
    c_ceph "$site" osd new "$osd_uuid" 0 >/dev/null
    wait "$mkfs_pid" || die "$site: ceph-osd --mkfs failed (see $dir/log/mkfs-osd.log)"
    start_daemon "$site" osd
    wait_daemon "$site" osd
    log "$site: mon and osd.0 up"
}

# Phase 2 of a site: pools, namespace, mirroring mode, mgr.
create_pools() {
    local site=$1
    if [[ $site == site-b ]]; then
        # Make replicapool's id differ between the sites (see header).
        quiet c_ceph "$site" osd pool create device_health_metrics 1 1
        quiet c_ceph "$site" osd pool application enable device_health_metrics mgr_devicehealth
    fi
    quiet c_ceph "$site" osd pool create "$POOL" "$PG_NUM" "$PG_NUM" replicated
    quiet c_ceph "$site" osd pool set "$POOL" min_size 1
    start_daemon "$site" mgr # after the pools: keeps the pool ids deterministic
    c_rbd "$site" pool init "$POOL"
    c_rbd "$site" namespace create "$POOL/$NAMESPACE"
    c_rbd "$site" mirror pool enable "$POOL" image --site-name "$site"
    c_rbd "$site" mirror pool enable "$POOL/$NAMESPACE" image
    log "$site: pool $POOL (id $(pool_id "$site")) with namespace $NAMESPACE, mirror mode image"
}

pool_id() { c_ceph "$1" osd pool ls detail -f json | jq -r --arg p "$POOL" '.[] | select(.pool_name == $p) | .pool_id'; }

create_csi_user() {
    local site=$1 dir key
    dir=$(site_dir "$site")
    c_ceph "$site" auth get-or-create "client.$CSI_USER" \
        mon "$CSI_MON_CAPS" osd "$CSI_OSD_CAPS" mgr "$CSI_MGR_CAPS" \
        -o "$dir/ceph.client.$CSI_USER.keyring"
    chmod 600 "$dir/ceph.client.$CSI_USER.keyring"
    key=$(c_ceph "$site" auth print-key "client.$CSI_USER")
    [[ -n $key ]] || die "$site: no key for client.$CSI_USER"
    (
        umask 077
        printf '%s' "$CSI_USER" >"$dir/secret/userID"
        printf '%s' "$key" >"$dir/secret/userKey"
    )
    chmod 600 "$dir/secret/userID" "$dir/secret/userKey"
}

bootstrap_peers() {
    local tok
    tok=$(mktemp "$PAIR_DIR/.token.XXXXXX")
    c_rbd site-a mirror pool peer bootstrap create --site-name site-a "$POOL" >"$tok"
    # rx-tx registers both directions (see header), no reverse bootstrap needed.
    c_rbd site-b mirror pool peer bootstrap import --site-name site-b --direction rx-tx "$POOL" "$tok"
    rm -f "$tok"
}

# Fails unless SITE lists the other site as a peer with mon_host and key.
# With USER=csi-rbd-provisioner it checks the least-privilege user can see them too.
verify_peer() {
    local site=$1 other=$2 user=${3:-admin} json
    json=$(c_rbd "$site" --id "$user" mirror pool info "$POOL" --all --format json) ||
        die "$site: 'rbd --id $user mirror pool info $POOL --all' failed"
    if ! jq -e --arg o "$other" \
        '[.peers[] | select(.site_name == $o and (.mon_host // "") != "" and (.key // "") != "")] | length == 1' \
        <<<"$json" >/dev/null; then
        die "$site: as client.$user, pool $POOL does not list $other as a mirror peer with mon_host and key: $json"
    fi
}

write_csi_files() {
    local ida idb
    ida=$(pool_id site-a)
    idb=$(pool_id site-b)
    [[ -n $ida && -n $idb ]] || die "cannot read the pool ids of $POOL"
    jq -n --arg ma "$(mon_addr site-a)" --arg mb "$(mon_addr site-b)" '[
        {clusterID: "site-a", monitors: [$ma], rbd: {radosNamespace: ""}},
        {clusterID: "site-b", monitors: [$mb], rbd: {radosNamespace: ""}}
    ]' >"$PAIR_DIR/csi-config.json"
    jq -n --arg a "$ida" --arg b "$idb" \
        '[{clusterIDMapping: {"site-a": "site-b"}, RBDPoolIDMapping: [{($a): $b}]}]' \
        >"$PAIR_DIR/cluster-mapping.json"
}

link_etc_ceph() {
    local site f
    mkdir -p /etc/ceph
    for site in "${SITES[@]}"; do
        for f in conf client.admin.keyring; do
            local src dst
            case $f in
            conf) src=$(site_conf "$site") ;;
            *) src="$(site_dir "$site")/ceph.$f" ;;
            esac
            dst=/etc/ceph/$site.$f
            if [[ -e $dst || -L $dst ]] && [[ $(readlink "$dst" || true) != "$src" ]]; then
                log "replacing /etc/ceph/$site.$f (was not ours: $(readlink "$dst" || echo 'a file'))"
            fi
            ln -sfn "$src" "$dst"
        done
    done
}

unlink_etc_ceph() {
    local site f dst
    for site in "${SITES[@]}"; do
        for f in conf client.admin.keyring; do
            dst=/etc/ceph/$site.$f
            if [[ -L $dst && $(readlink "$dst") == "$PAIR_DIR/"* ]]; then
                rm -f "$dst"
            fi
        done
    done
}

# State dirs of other pairs (other checkouts, e.g. CI's fresh clone) whose mons run here.
foreign_pair_dirs() {
    local f args i conf dir marker
    marker=$(conf_header SITE)
    marker=${marker#\# SITE }
    while read -r f; do
        mapfile -d '' args <"$f" 2>/dev/null || continue
        [[ ${args[0]:-} == *ceph-mon ]] || continue
        for ((i = 1; i < ${#args[@]} - 1; i++)); do
            [[ ${args[$i]} == -c ]] || continue
            conf=${args[$((i + 1))]}
            [[ $conf == */site-[ab]/ceph.conf ]] || continue
            # Only pairs of this mode (the other mode's hold other addresses).
            head -1 "$conf" 2>/dev/null | grep -qF "$marker" || continue
            dir=$(dirname "$(dirname "$conf")")
            [[ $dir != "$PAIR_DIR" ]] && printf '%s\n' "$dir"
        done
    done < <(grep -lsF -- 'ceph-mon' /proc/[0-9]*/cmdline || true) | sort -u
}

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# --- netns mode ---------------------------------------------------------------------

# Namespaces, the veth pairs to the root namespace and the `wan` link between the sites.
netns_up() {
    local site ns i host
    for site in "${SITES[@]}"; do
        ns=${SITE_NS[$site]}
        i=${SITE_IP[$site]%.2} # 10.77.1 / 10.77.2
        host=$ns-0             # the root namespace's end
        ip netns add "$ns"
        ip link add "$host" type veth peer name h0 netns "$ns"
        ip addr add "$i.1/24" dev "$host"
        ip link set "$host" up
        ip -n "$ns" link set lo up
        ip -n "$ns" addr add "${SITE_IP[$site]}/24" dev h0
        ip -n "$ns" link set h0 up
    done
    local a=${SITE_NS[site-a]} b=${SITE_NS[site-b]}
    ip -n "$a" link add wan type veth peer name wan netns "$b"
    ip -n "$a" addr add 10.77.3.1/24 dev wan
    ip -n "$b" addr add 10.77.3.2/24 dev wan
    ip -n "$a" link set wan up
    ip -n "$b" link set wan up
    ip -n "$a" route add "${SITE_NET[site-b]}" via 10.77.3.2
    ip -n "$b" route add "${SITE_NET[site-a]}" via 10.77.3.1
    log "namespaces $a (${SITE_IP[site-a]}) and $b (${SITE_IP[site-b]}) linked by wan"
}

netns_exists() { ip netns list | grep -qw "$1"; }

netns_down() {
    local site ns
    for site in "${SITES[@]}"; do
        ns=${SITE_NS[$site]}
        if netns_exists "$ns"; then
            # Deleting the namespace removes its veths (the root ends too).
            ip netns del "$ns"
            log "removed namespace $ns"
        fi
    done
}

cmd_partition() {
    [[ $NETNS == 1 ]] || die "partition needs the netns pair (CSIRR_PAIR_NETNS=1)"
    local site
    for site in "${SITES[@]}"; do
        tc -n "${SITE_NS[$site]}" qdisc replace dev wan root blackhole
    done
    log "partitioned: every packet between ${SITE_NET[site-a]} and ${SITE_NET[site-b]} is dropped"
}

cmd_heal() {
    [[ $NETNS == 1 ]] || die "heal needs the netns pair (CSIRR_PAIR_NETNS=1)"
    local site
    for site in "${SITES[@]}"; do
        if tc -n "${SITE_NS[$site]}" qdisc show dev wan 2>/dev/null | grep -q blackhole; then
            tc -n "${SITE_NS[$site]}" qdisc del dev wan root
        fi
    done
    log "healed: the sites see each other again"
}

# Is the pair complete and running? (quiet; used by `up`)
pair_healthy() {
    local site d
    [[ -f $PAIR_DIR/.complete ]] || return 1
    for site in "${SITES[@]}"; do
        for d in mon mgr osd; do daemon_pid "$site" "$d" >/dev/null || return 1; done
        osd_is_up "$site" 2>/dev/null || return 1
    done
    if [[ $NETNS == 1 ]]; then
        netns_exists "${SITE_NS[site-a]}" && netns_exists "${SITE_NS[site-b]}"
    else
        [[ -L /etc/ceph/site-a.conf && -L /etc/ceph/site-b.conf ]]
    fi
}

cmd_up() {
    local t0=$SECONDS site
    ensure_packages
    if [[ $NETNS == 1 ]] && netns_exists "${SITE_NS[site-a]}" && netns_exists "${SITE_NS[site-b]}"; then
        cmd_heal # a partition left behind by a test that died
    fi
    if pair_healthy; then
        log "pair already up in $PAIR_DIR (nothing to do)"
        return 0
    fi
    # A complete pair is never wiped for being slow or stopped: on a loaded machine
    # `osd stat` can miss its timeout, and a daemon may have been stopped on purpose.
    # Start what is not running and wait (the data survives restarts).
    if [[ -f $PAIR_DIR/.complete && ${CSIRR_PAIR_WIPE:-0} != 1 ]]; then
        log "pair in $PAIR_DIR is complete but not answering yet: starting what is down and waiting"
        for site in "${SITES[@]}"; do cmd_start "$site" all; done
        link_etc_ceph
        pair_healthy || die "the pair in $PAIR_DIR does not come up; wipe and re-create it with CSIRR_PAIR_WIPE=1 $0 up"
        log "pair up in $((SECONDS - t0)) s (restarted)"
        return 0
    fi
    if [[ -e $PAIR_DIR ]]; then
        log "leftover or unhealthy state in $PAIR_DIR: wiping it"
        cmd_down
    fi
    # The mon ports are machine-wide: a pair of another checkout (say a developer's,
    # when CI runs in a fresh clone) is taken down, unless CSIRR_PAIR_TAKEOVER=0.
    local other
    for other in $(foreign_pair_dirs); do
        if [[ ${CSIRR_PAIR_TAKEOVER:-1} == 1 ]]; then
            log "another pair ($other) is running: taking it down"
            CSIRR_PAIR_DIR=$other CSIRR_PAIR_NETNS=$NETNS "$0" down
        else
            die "another pair ($other) is running; stop it with: CSIRR_PAIR_DIR=$other $0 down"
        fi
    done
    if [[ $NETNS == 1 ]]; then
        netns_down
        netns_up
    fi
    for site in "${SITES[@]}"; do
        [[ $NETNS == 1 ]] && break # fresh namespaces: nothing holds the ports
        for p in "${MON_V2_PORT[$site]}" "${MON_V1_PORT[$site]}"; do
            ! port_in_use "$p" || die "port $p on 127.0.0.1 is in use by another process (another pair? see 'ss -ltnp')"
        done
    done
    mkdir -p "$PAIR_DIR"
    log "creating site-a and site-b in $PAIR_DIR"

    local pids=() rc=0
    for site in "${SITES[@]}"; do
        (
            create_site "$site"
            create_pools "$site"
        ) &
        pids+=($!)
    done
    for p in "${pids[@]}"; do wait "$p" || rc=1; done
    ((rc == 0)) || die "creating the clusters failed (logs under $PAIR_DIR/<site>/log)"

    bootstrap_peers
    for site in "${SITES[@]}"; do create_csi_user "$site"; done
    verify_peer site-a site-b
    verify_peer site-b site-a
    verify_peer site-a site-b "$CSI_USER"
    verify_peer site-b site-a "$CSI_USER"
    write_csi_files
    [[ $NETNS == 1 ]] || link_etc_ceph
    for site in "${SITES[@]}"; do wait_daemon "$site" mgr; done
    date -Is >"$PAIR_DIR/.complete"
    log "pair up in $((SECONDS - t0)) s: $(pool_id site-a) on site-a <-> $(pool_id site-b) on site-b; eval \"\$($0 env)\""
}

cmd_down() {
    local site pid pids d d1
    # OSDs first (both sites at once): an OSD stopping while its mon is gone waits
    # osd_mon_shutdown_timeout (5 s) for the mon. Then mgrs and mons.
    for d in osd "mgr mon"; do
        pids=()
        for site in "${SITES[@]}"; do
            [[ -f $(site_conf "$site") ]] || continue
            for d1 in $d; do
                if pid=$(daemon_pid "$site" "$d1"); then
                    log "$site: stopping $d1 (pid $pid)"
                    kill -TERM "$pid" 2>/dev/null || true
                    pids+=("$pid")
                fi
            done
        done
        for pid in "${pids[@]}"; do
            wait_pid_exit "$pid" 30 || {
                log "pid $pid did not exit; SIGKILL"
                kill -KILL "$pid" 2>/dev/null || true
                wait_pid_exit "$pid" 10 || log "WARNING: pid $pid still there"
            }
        done
    done
    # leftovers without (valid) pid files
    for site in "${SITES[@]}"; do
        for pid in $(site_pids "$site"); do
            log "$site: killing leftover pid $pid"
            kill -KILL "$pid" 2>/dev/null || true
            wait_pid_exit "$pid" 10 || log "WARNING: pid $pid still there"
        done
    done
    if [[ $NETNS == 1 ]]; then
        netns_down
    else
        unlink_etc_ceph
    fi
    if [[ -e $PAIR_DIR ]]; then
        rm -rf "$PAIR_DIR"
        log "removed $PAIR_DIR"
    fi
}

cmd_env() {
    cat <<EOF
export CSIRR_PAIR_DIR='$PAIR_DIR'
export CSIRR_SITE_A_CONF='$(site_conf site-a)'
export CSIRR_SITE_B_CONF='$(site_conf site-b)'
export CSIRR_SITE_A_KEYRING='$(site_dir site-a)/ceph.client.admin.keyring'
export CSIRR_SITE_B_KEYRING='$(site_dir site-b)/ceph.client.admin.keyring'
export CSIRR_SITE_A_SECRET_DIR='$(site_dir site-a)/secret'
export CSIRR_SITE_B_SECRET_DIR='$(site_dir site-b)/secret'
export CSIRR_CSI_CONFIG='$PAIR_DIR/csi-config.json'
export CSIRR_CLUSTER_MAPPING='$PAIR_DIR/cluster-mapping.json'
export CSIRR_POOL='$POOL'
export CSIRR_SITE_A_MON='$(mon_addr site-a)'
export CSIRR_SITE_B_MON='$(mon_addr site-b)'
EOF
    if [[ $NETNS == 1 ]]; then
        cat <<EOF
export CSIRR_PAIR_NETNS=1
export CSIRR_SITE_A_NETNS='${SITE_NS[site-a]}'
export CSIRR_SITE_B_NETNS='${SITE_NS[site-b]}'
EOF
    fi
}

cmd_status() {
    local site rc=0
    for site in "${SITES[@]}"; do
        echo "=== $site ($(site_conf "$site")) ==="
        if [[ -f $(site_conf "$site") ]]; then
            c_ceph "$site" --connect-timeout 10 -s || rc=1
        else
            echo "not created"
            rc=1
        fi
    done
    return "$rc"
}

usage() {
    sed -n '2,36p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

main() {
    local cmd=${1:-}
    case "$cmd" in
    up) cmd_up ;;
    down) cmd_down ;;
    env) cmd_env ;;
    status) cmd_status ;;
    partition) cmd_partition ;;
    heal) cmd_heal ;;
    start | stop)
        [[ $# -eq 3 ]] || usage
        "cmd_$cmd" "$2" "$3"
        ;;
    *) usage ;;
    esac
}

main "$@"
