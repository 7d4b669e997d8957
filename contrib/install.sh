#!/bin/bash
# What `make install` and `make uninstall` run (see README.md, "Install"); every path comes from
# the Makefile's variables:
#   OPTDIR     the program: a virtual environment of SYSTEM_PYTHON, filled by its pip (default /opt/stargz-store)
#   BINDIR     links to its commands (stargz-store, and any other stargz-store-* entry point)
#   UNITDIR    stargz-store.service, with the paths of this install written into it
#   CONFDIR    config.toml: created from config/node.toml if absent, never overwritten
#   DOCDIR     README.md, the full config reference and the storage.conf examples (the unit's Documentation=)
#   STATEDIR   the daemon's data root and mount (only written into the unit; the daemon creates it)
#   DESTDIR    staging root for packagers: files go under it, the paths written into them do not
# The environment is built next to the old one and swapped in only once it works, so a failed
# upgrade (no network, a bad wheel) leaves the installed store untouched.
set -euo pipefail

: "${OPTDIR:?}" "${BINDIR:?}" "${UNITDIR:?}" "${CONFDIR:?}" "${DOCDIR:?}" "${STATEDIR:?}" "${SYSTEM_PYTHON:?}"
DESTDIR=${DESTDIR:-}
PURGE=${PURGE:-}
PIP_INSTALL_FLAGS=${PIP_INSTALL_FLAGS:-}
SRC=$(cd "$(dirname "$0")/.." && pwd)
UNIT=stargz-store.service
DOC_FILES=(README.md config.toml podman/storage.conf cri-o/storage.conf cri-o/README.md)

say() { echo "stargz-store: $*"; }
die() { echo "stargz-store: $*" >&2; exit 1; }

# The default paths of contrib/systemd/stargz-store.service and config/node.toml, replaced by this
# install's. The data root goes first: the others are full paths that cannot occur in its value.
render() {
    sed -e "s|/var/lib/stargz-store|$STATEDIR|g" \
        -e "s|/opt/stargz-store/bin/|$OPTDIR/bin/|g" \
        -e "s|/etc/stargz-store/|$CONFDIR/|g" \
        -e "s|/usr/local/share/doc/stargz-store|$DOCDIR|g" "$1"
}

check_python() {
    "$SYSTEM_PYTHON" -c 'import sys, venv; sys.exit(sys.version_info < (3, 11))' 2>/dev/null ||
        die "$SYSTEM_PYTHON: needs Python 3.11 or later with venv (Debian: apt-get install python3-venv), or set SYSTEM_PYTHON"
    # pip 22.3 or later installs into another interpreter's venv (--python), so the venv needs no pip of its own.
    "$SYSTEM_PYTHON" -c 'import sys, pip; sys.exit(tuple(map(int, pip.__version__.split(".")[:2])) < (22, 3))' 2>/dev/null ||
        die "$SYSTEM_PYTHON: needs pip 22.3 or later (Debian: apt-get install python3-pip)"
    local base
    base=$("$SYSTEM_PYTHON" -c 'import os, sys; print(os.path.realpath(sys.base_prefix))')
    case "$base" in
        /root/*|/home/*) say "warning: $SYSTEM_PYTHON lives in $base, a home directory; the service's environment depends on it" >&2 ;;
    esac
}

# A venv at $1 whose scripts and pyvenv.cfg name $2 (the path it will have once swapped in).
build_venv() {
    local stage=$1 final=$2 src=$WORK/src
    mkdir "$src"
    # Build from a copy of the package only: no stale build/ dir of the checkout ends in the wheel.
    tar -C "$SRC" --exclude=__pycache__ -cf - setup.cfg pyproject.toml README.md stargz_store | tar -C "$src" -xf -
    rm -rf "$stage"
    "$SYSTEM_PYTHON" -m venv --without-pip "$stage"
    # shellcheck disable=SC2086
    "$SYSTEM_PYTHON" -m pip --python "$stage/bin/python" install --quiet --no-compile $PIP_INSTALL_FLAGS "$src"
    local f
    for f in "$stage"/bin/*; do
        [ -f "$f" ] && [ ! -L "$f" ] || continue
        if head -c 2 "$f" | grep -q '^#!'; then sed -i "1s|^#!$stage/|#!$final/|" "$f"; fi
        case "$f" in */activate*) sed -i "s|$stage|$final|g" "$f" ;; esac
    done
    sed -i "s|$stage|$final|g" "$stage/pyvenv.cfg"
    "$stage/bin/python" -m compileall -q -f -j 0 -s "$stage" -p "$final" "$stage/lib" >/dev/null
}

link_commands() {
    local bindir=$DESTDIR$BINDIR opt=$DESTDIR$OPTDIR script name link
    mkdir -p "$bindir"
    for link in "$bindir"/stargz-store*; do  # links of commands an older version had
        if [ -L "$link" ] && [[ $(readlink "$link") == "$OPTDIR/bin/"* ]] && [ ! -e "$opt/bin/${link##*/}" ]; then
            rm -f "$link"
        fi
    done
    for script in "$opt"/bin/stargz-store*; do
        name=${script##*/}
        link=$bindir/$name
        if [ -e "$link" ] && [ ! -L "$link" ]; then
            die "$link exists and is not a link (an older install?); remove it and run make install again"
        fi
        ln -sfn "$OPTDIR/bin/$name" "$link"
        say "linked $BINDIR/$name -> $OPTDIR/bin/$name"
    done
}

do_install() {
    check_python
    local opt=$DESTDIR$OPTDIR
    mkdir -p "$(dirname "$opt")"
    STAGE=$opt.new  # removed on exit: a failed build leaves no half environment
    build_venv "$STAGE" "$OPTDIR"
    rm -rf "$opt.old"
    if [ -e "$opt" ]; then mv "$opt" "$opt.old"; fi
    mv "$opt.new" "$opt"
    rm -rf "$opt.old"
    say "installed $("$opt/bin/python" -c 'from stargz_store.cli import package_version; print(package_version())') in $OPTDIR"
    link_commands

    install -d -m 0755 "$DESTDIR$UNITDIR"
    render "$SRC/contrib/systemd/$UNIT" >"$DESTDIR$UNITDIR/$UNIT.tmp"
    chmod 0644 "$DESTDIR$UNITDIR/$UNIT.tmp"
    mv "$DESTDIR$UNITDIR/$UNIT.tmp" "$DESTDIR$UNITDIR/$UNIT"
    say "installed $UNITDIR/$UNIT"

    install -d -m 0755 "$DESTDIR$CONFDIR"
    if [ -e "$DESTDIR$CONFDIR/config.toml" ]; then
        say "kept $CONFDIR/config.toml (every key and its default: $DOCDIR/config.toml)"
    else
        # 0600: registry passwords may go in it.
        render "$SRC/config/node.toml" >"$DESTDIR$CONFDIR/config.toml.tmp"
        chmod 0600 "$DESTDIR$CONFDIR/config.toml.tmp"
        mv "$DESTDIR$CONFDIR/config.toml.tmp" "$DESTDIR$CONFDIR/config.toml"
        say "installed $CONFDIR/config.toml"
    fi

    local doc=$DESTDIR$DOCDIR
    install -d -m 0755 "$doc" "$doc/podman" "$doc/cri-o"
    install -m 0644 "$SRC/README.md" "$doc/README.md"
    install -m 0644 "$SRC/config/config.toml" "$doc/config.toml"
    install -m 0644 "$SRC/contrib/podman/storage.conf" "$doc/podman/storage.conf"
    install -m 0644 "$SRC/contrib/cri-o/storage.conf" "$doc/cri-o/storage.conf"
    install -m 0644 "$SRC/contrib/cri-o/README.md" "$doc/cri-o/README.md"
    say "installed $DOCDIR"
    if [ -z "$DESTDIR" ]; then
        say "next: systemctl daemon-reload && systemctl enable --now stargz-store (or restart it after an upgrade)"
    fi
}

do_uninstall() {
    local opt=$DESTDIR$OPTDIR unitdir=$DESTDIR$UNITDIR link wants
    for wants in "$unitdir"/*.wants/"$UNIT"; do
        if [ -L "$wants" ]; then die "$UNIT is enabled ($wants): run systemctl disable --now stargz-store first"; fi
    done
    if [ -z "$DESTDIR" ] && mountpoint -q "$STATEDIR/store" 2>/dev/null; then
        die "$STATEDIR/store is mounted: stop the store first (systemctl stop stargz-store)"
    fi
    for link in "$DESTDIR$BINDIR"/stargz-store*; do
        if [ -L "$link" ] && [[ $(readlink "$link") == "$OPTDIR/bin/"* ]]; then rm -f "$link"; say "removed $BINDIR/${link##*/}"; fi
    done
    rm -f "$unitdir/$UNIT"
    local f
    for f in "${DOC_FILES[@]}"; do rm -f "$DESTDIR$DOCDIR/$f"; done
    rmdir "$DESTDIR$DOCDIR/podman" "$DESTDIR$DOCDIR/cri-o" "$DESTDIR$DOCDIR" 2>/dev/null || true
    # Only a directory that is our environment is removed whole.
    for f in "$opt" "$opt.new" "$opt.old"; do
        if [ -f "$f/pyvenv.cfg" ] && [ -e "$f/bin/stargz-store" ]; then rm -rf "$f"; fi
    done
    if [ -e "$opt" ]; then say "warning: $OPTDIR is still there (not a stargz-store environment?)" >&2; fi
    say "removed $OPTDIR, $UNITDIR/$UNIT and $DOCDIR"
    if [ -n "$PURGE" ]; then
        rm -f "$DESTDIR$CONFDIR/config.toml"
        rmdir "$DESTDIR$CONFDIR" 2>/dev/null || true
        say "removed $CONFDIR/config.toml"
    elif [ -e "$DESTDIR$CONFDIR/config.toml" ]; then
        say "kept $CONFDIR/config.toml (make uninstall PURGE=1 removes it)"
    fi
    if [ -d "$DESTDIR$STATEDIR" ]; then say "the data root $STATEDIR (cache, metadata) is left in place; remove it yourself if you want"; fi
}

case "${1:-}" in
    install)
        WORK=$(mktemp -d)
        STAGE=
        trap 'rm -rf "$WORK" ${STAGE:+"$STAGE"}' EXIT
        do_install
        ;;
    uninstall) do_uninstall ;;
    *) die "usage: $0 install|uninstall (run through make install / make uninstall)" ;;
esac
