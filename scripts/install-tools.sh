#!/usr/bin/env bash
# Python tools the deploy checks use, in ./.venv (git-ignored): kubernetes-validate (bundled
# Kubernetes JSON schemas, validates deploy/k8s offline). Needs PyPI once; idempotent and quiet
# afterwards. A failure here only makes that test skip, so it never fails the build.
set -uo pipefail
cd "$(dirname "$0")/.."
if [[ -x .venv/bin/kubernetes-validate ]]; then exit 0; fi
echo "install-tools: creating .venv with kubernetes-validate" >&2
python3 -m venv .venv && .venv/bin/pip install -q --disable-pip-version-check kubernetes-validate \
  || echo "install-tools: could not install kubernetes-validate; deploy/k8s validation will be skipped" >&2
exit 0
