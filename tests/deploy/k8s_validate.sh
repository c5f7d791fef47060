#!/usr/bin/env bash
# Validates deploy/k8s offline: renders each overlay (kubectl kustomize or kustomize build; when
# neither exists, the base manifests are checked file by file) and validates every object against
# the Kubernetes JSON schemas bundled in the PyPI package kubernetes-validate (installed into
# .venv by scripts/install-tools.sh). Exit 77 (ctest SKIP) when the validator is unavailable.
set -euo pipefail
src=$1
validator=""
for c in "$src/.venv/bin/kubernetes-validate" "$(command -v kubernetes-validate || true)"; do
  if [[ -n "$c" && -x "$c" ]]; then validator=$c; break; fi
done
if [[ -z "$validator" ]]; then
  echo "SKIP: kubernetes-validate not installed (run scripts/install-tools.sh)"
  exit 77
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
render=""
if command -v kubectl >/dev/null && kubectl kustomize --help >/dev/null 2>&1; then
  render="kubectl kustomize"
elif command -v kustomize >/dev/null; then
  render="kustomize build"
fi
files=()
if [[ -n "$render" ]]; then
  for o in "$src"/deploy/k8s/overlays/*/; do
    name=$(basename "$o")
    $render "$o" > "$tmp/$name.yaml"
    files+=("$tmp/$name.yaml")
  done
  echo "rendered overlays with: $render"
else
  echo "no kustomize renderer: validating base manifests one by one"
  for f in "$src"/deploy/k8s/base/*.yaml; do
    [[ $(basename "$f") == kustomization.yaml ]] && continue
    files+=("$f")
  done
fi
"$validator" --strict --quiet "${files[@]}"
for f in "${files[@]}"; do
  if grep -Eq 'host(Network|IPC|PID): true' "$f"; then
    echo "$f: uses hostNetwork/hostIPC/hostPID"
    exit 1
  fi
done
if [[ -n "$render" ]]; then
  grep -q 'nvidia.com/gpu: 1' "$tmp/gpu.yaml" || { echo "gpu overlay requests no GPU"; exit 1; }
  for f in "${files[@]}"; do
    grep -q 'kind: PodDisruptionBudget' "$f" || { echo "$f: no PodDisruptionBudget"; exit 1; }
    grep -q 'clusterIP: None' "$f" || { echo "$f: no headless Service"; exit 1; }
  done
fi
for j in "$src"/deploy/k8s/overlays/*/kvmemd.json; do
  python3 -c 'import json,sys; json.load(open(sys.argv[1]))' "$j"
done
echo "deploy/k8s: ${#files[@]} file(s) valid"
