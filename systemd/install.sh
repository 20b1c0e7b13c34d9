#!/bin/sh
# Install kmsd as a systemd service on a Debian host (run as root):
#   make install            (or: systemd/install.sh)
# Idempotent: existing configuration and root key are kept.
#
# DESTDIR=/some/dir stages everything under that directory instead (no
# virtualenv is built then, and nothing is started); KMSD_BIN names the kmsd
# executable the units should run (default /usr/local/bin/kmsd).
set -eu
here=$(cd "$(dirname "$0")" && pwd)
src=$(dirname "$here")
root=${DESTDIR:-}
bin=${KMSD_BIN:-/usr/local/bin/kmsd}

if [ -z "$root" ]; then
    # The program, in its own virtualenv (Debian's python3-venv).
    python3 -m venv /opt/kmsd
    /opt/kmsd/bin/pip install --quiet --upgrade pip
    # The client first: the daemon depends on it (kmsd-client, not on PyPI).
    /opt/kmsd/bin/pip install --quiet "$src/client" "$src"
    ln -sf /opt/kmsd/bin/kmsd /usr/local/bin/kmsd
fi

install -d -m 0755 "$root/etc/systemd/system" "$root/usr/lib/sysusers.d" "$root/usr/lib/tmpfiles.d"
sed "s#/usr/local/bin/kmsd#$bin#" "$here/kmsd.service" > "$root/etc/systemd/system/kmsd.service"
chmod 0644 "$root/etc/systemd/system/kmsd.service"
install -m 0644 "$here/kmsd.socket" "$root/etc/systemd/system/kmsd.socket"
install -m 0644 "$here/kmsd.sysusers.conf" "$root/usr/lib/sysusers.d/kmsd.conf"
install -m 0644 "$here/kmsd.tmpfiles.conf" "$root/usr/lib/tmpfiles.d/kmsd.conf"

# Users kmsd, kmsd-vault and the group kmsd-clients; /etc/kmsd, /var/lib/kmsd.
systemd-sysusers --root="${root:-/}" "$root/usr/lib/sysusers.d/kmsd.conf"
systemd-tmpfiles --root="${root:-/}" --create "$root/usr/lib/tmpfiles.d/kmsd.conf"

if [ ! -e "$root/etc/kmsd/kmsd.toml" ]; then
    # Group kmsd: the daemon re-reads it on SIGHUP, after it dropped root.
    install -m 0640 "$src/docs/kmsd.toml" "$root/etc/kmsd/kmsd.toml"
    chgrp "$(awk -F: '$1 == "kmsd" {print $3}' "$root/etc/group")" "$root/etc/kmsd/kmsd.toml"
fi
if [ ! -e "$root/etc/kmsd/root-key" ]; then
    # 32 random bytes, hex; readable by root only. systemd hands it to the
    # service as the credential 'root-key'. Back it up offline: without it
    # nothing kmsd stored can be decrypted.
    (umask 077 && od -An -N32 -tx1 /dev/urandom | tr -d ' \n' > "$root/etc/kmsd/root-key" && echo >> "$root/etc/kmsd/root-key")
    echo "install.sh: generated $root/etc/kmsd/root-key: back it up offline"
fi

if [ -z "$root" ] && [ -d /run/systemd/system ]; then
    systemctl daemon-reload
    systemctl enable --now kmsd.socket
    systemctl enable --now kmsd.service
    echo "install.sh: kmsd is running: systemctl status kmsd; grant applications with: usermod -aG kmsd-clients APPUSER"
else
    echo "install.sh: installed under ${root:-/}; systemd is not running here, nothing started"
fi
