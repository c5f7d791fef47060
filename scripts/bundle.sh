#!/usr/bin/env bash
# Builds a self-contained folder from a build tree, to carry binaries to another machine (e.g. the
# GPU machine: Ubuntu 24.04, newer glibc than ours, so our binaries run there).
#
#   scripts/bundle.sh BUILD_DIR OUT_DIR [BINARY...]
#
# BINARY: names under BUILD_DIR/bin (default: every executable there). The folder gets
#   OUT_DIR/bin/      the binaries
#   OUT_DIR/lib/      every non-system shared library they load (per ldd), transitively
#   OUT_DIR/lib/ucx/  UCX's transport plugins, when libucp is among them
#   OUT_DIR/run       launcher: `OUT_DIR/run BINARY [ARGS...]` sets LD_LIBRARY_PATH and
#                     UCX_MODULE_DIR and execs OUT_DIR/bin/BINARY
# Left out (the target system provides them): glibc (libc, libm, libdl, libpthread, librt,
# ld-linux), libstdc++, libgcc_s, and the CUDA driver (libcuda, libnvidia-*).
set -euo pipefail

if [[ $# -lt 2 ]]; then
  sed -n '2,15p' "$0" >&2
  exit 2
fi
build=$1
out=$2
shift 2

mkdir -p "$out/bin" "$out/lib"
bins=()
if [[ $# -gt 0 ]]; then
  for b in "$@"; do bins+=("$build/bin/$b"); done
else
  while IFS= read -r f; do bins+=("$f"); done < <(find "$build/bin" -maxdepth 1 -type f -perm -u+x | sort)
fi

is_system() {
  case "$(basename "$1")" in
    linux-vdso.so*|ld-linux*|libc.so*|libm.so*|libdl.so*|libpthread.so*|librt.so*|libutil.so*|\
    libresolv.so*|libstdc++.so*|libgcc_s.so*|libcuda.so*|libnvidia-*) return 0 ;;
  esac
  return 1
}

# Resolves one file's dependencies (ldd is transitive already).
copy_deps() {
  ldd "$1" 2>/dev/null | awk '/=>/ && $3 ~ /^\// {print $3}' | while IFS= read -r lib; do
    is_system "$lib" && continue
    local name
    name=$(basename "$lib")
    [[ -e "$out/lib/$name" ]] || cp -L "$lib" "$out/lib/$name"
  done
}

for b in "${bins[@]}"; do
  [[ -f "$b" ]] || { echo "bundle: no binary $b" >&2; exit 1; }
  cp -L "$b" "$out/bin/"
  copy_deps "$b"
done

# UCX loads its transports (libuct_*.so, libucm_*.so) from a plugin folder at run time.
if ls "$out/lib"/libucp.so* >/dev/null 2>&1; then
  ucx_dir=/usr/lib/x86_64-linux-gnu/ucx
  if [[ -d "$ucx_dir" ]]; then
    mkdir -p "$out/lib/ucx"
    cp -L "$ucx_dir"/*.so* "$out/lib/ucx/" 2>/dev/null || true
    for p in "$out/lib/ucx"/*.so*; do copy_deps "$p"; done
  fi
fi

cat > "$out/run" <<'EOF'
#!/usr/bin/env bash
# Runs a bundled binary with the bundled libraries: run BINARY [ARGS...]
here=$(cd "$(dirname "$0")" && pwd)
bin=$1
shift
export LD_LIBRARY_PATH="$here/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
[[ -d "$here/lib/ucx" ]] && export UCX_MODULE_DIR="$here/lib/ucx"
exec "$here/bin/$bin" "$@"
EOF
chmod +x "$out/run"
echo "bundle: $(ls "$out/bin" | wc -l) binaries, $(ls "$out/lib" | grep -c '\.so') libraries, $(du -sh "$out" | cut -f1) in $out"
