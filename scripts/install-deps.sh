#!/usr/bin/env bash
# Installs the Debian 12 packages kvmem builds and tests with; only the missing ones.
# Idempotent and quiet when everything is present. Run as root (or with sudo available).
set -euo pipefail

PKGS=(
  build-essential cmake ninja-build pkg-config git ccache
  libucx-dev ucx-utils
  librocksdb-dev
  libflatbuffers-dev flatbuffers-compiler
  libspdlog-dev libfmt-dev
  libboost-dev
  libgtest-dev libgmock-dev libbenchmark-dev
  libsystemd-dev nlohmann-json3-dev
  systemd python3 python3-dev python3-venv python3-pip
  # Sanitized builds and libFuzzer (make asan / fuzz / tsan): clang 14, its sanitizer and
  # libFuzzer runtimes (not pulled in by clang without recommends), llvm-symbolizer for reports.
  clang libclang-rt-14-dev llvm

)

missing=()
for p in "${PKGS[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

if ((${#missing[@]} == 0)); then
  [[ -n "${KVMEM_SKIP_TOOLS:-}" ]] || "$(dirname "$0")/install-tools.sh"
  exit 0
fi

echo "install-deps: installing ${missing[*]}" >&2
SUDO=""
if [[ $(id -u) -ne 0 ]]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
[[ -n "${KVMEM_SKIP_TOOLS:-}" ]] || "$(dirname "$0")/install-tools.sh"
