#!/usr/bin/env bash
# Checks deploy/systemd: `systemd-analyze verify` on the unit (ExecStart pointed at the built
# kvmemd, since verify insists the binary exists), and sysusers/tmpfiles applied to a scratch
# root. Exit 77 (ctest SKIP) when systemd's tools are not installed.
set -euo pipefail
src=$1
kvmemd=$2
if ! command -v systemd-analyze >/dev/null; then
  echo "SKIP: systemd-analyze not installed (apt-get install systemd)"
  exit 77
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
sed "s|/usr/bin/kvmemd|$kvmemd|" "$src/deploy/systemd/kvmemd.service" > "$tmp/kvmemd.service"
out=$(SYSTEMD_LOG_LEVEL=notice systemd-analyze verify "$tmp/kvmemd.service" 2>&1 || true)
if [[ -n "$out" ]]; then
  echo "systemd-analyze verify is not clean:"
  echo "$out"
  exit 1
fi
grep -q '^Type=notify' "$tmp/kvmemd.service"
grep -q '^WatchdogSec=' "$tmp/kvmemd.service"
if command -v systemd-sysusers >/dev/null && command -v systemd-tmpfiles >/dev/null; then
  mkdir -p "$tmp/root/etc"
  systemd-sysusers --root="$tmp/root" "$src/deploy/systemd/kvmem.sysusers" >/dev/null 2>&1
  grep -q '^kvmem:' "$tmp/root/etc/passwd"
  systemd-tmpfiles --root="$tmp/root" --create "$src/deploy/systemd/kvmem.tmpfiles"
  test -d "$tmp/root/var/lib/kvmem"
fi
echo "deploy/systemd: verify clean"
