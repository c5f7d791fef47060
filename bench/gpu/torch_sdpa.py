#!/usr/bin/env python3
"""torch_sdpa_dense: PyTorch SDPA decode on the same shapes as kvmem-bench-gpu.

q [B, 32, 1, 128], k/v [B, 8, T, 128], bf16, GQA through enable_gqa=True (no repeat_interleave:
K/V are read once per KV head, as in kvmem_dense). Timing as in the C++ bench: a CUDA graph of
>= 16 calls, inputs rotated to >= 256 MiB when one copy is smaller, median of replays / calls.
max_rel_err: vs a float64 computation on the first copy (first and last sequence only at large
sizes, to bound the reference cost).

  torch_sdpa.py --json OUT.json [--merge-into kvmem.json] [--contexts ..] [--batches ..]
"""
import argparse
import json
import math

import torch
import torch.nn.functional as F

HQ, HKV, D = 32, 8, 128
ROTATE_BYTES = 256 << 20


def time_graph(fn, launches, replays):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for i in range(3):
            fn(i)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(launches):
            fn(i)
    for _ in range(2):
        g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        e0 = torch.cuda.Event(enable_timing=True)
        e1 = torch.cuda.Event(enable_timing=True)
        e0.record()
        g.replay()
        e1.record()
        e1.synchronize()
        times.append(e0.elapsed_time(e1))
    times.sort()
    return times[len(times) // 2] * 1000.0 / launches


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", required=True)
    ap.add_argument("--merge-into")
    ap.add_argument("--contexts", default="8192,32768,131072")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--replays", type=int, default=15)
    a = ap.parse_args()
    copy_gbps = None
    if a.merge_into:
        copy_gbps = json.load(open(a.merge_into)).get("copy_gbps")
    rows = []
    for ctx in map(int, a.contexts.split(",")):
        for batch in map(int, a.batches.split(",")):
            kv_bytes = 2 * batch * HKV * ctx * D * 2
            R = 1 if kv_bytes >= ROTATE_BYTES else min(16, -(-ROTATE_BYTES // kv_bytes))
            launches = -(-16 // R) * R
            ks = [torch.randn(batch, HKV, ctx, D, device="cuda", dtype=torch.bfloat16) for _ in range(R)]
            vs = [torch.randn(batch, HKV, ctx, D, device="cuda", dtype=torch.bfloat16) for _ in range(R)]
            qs = [torch.randn(batch, HQ, 1, D, device="cuda", dtype=torch.bfloat16) for _ in range(R)]
            outs = [None]

            def fn(i):
                outs[0] = F.scaled_dot_product_attention(qs[i % R], ks[i % R], vs[i % R], enable_gqa=True)

            us = time_graph(fn, launches, a.replays)
            fn(0)
            torch.cuda.synchronize()
            got = outs[0].float()
            err = 0.0
            for b in sorted({0, batch - 1}):
                q = qs[0][b].double()                              # [32, 1, 128]
                k = ks[0][b].double().repeat_interleave(HQ // HKV, 0)  # [32, T, 128]
                v = vs[0][b].double().repeat_interleave(HQ // HKV, 0)
                p = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D), -1)
                ref = (p @ v)[:, 0, :]
                g = got[b, :, 0, :].double()
                e = ((g - ref).norm(dim=-1) / ref.norm(dim=-1)).max().item()
                err = max(err, e)
                del k, v, p
            bytes_ = kv_bytes + 2 * batch * HQ * D * 2
            row = {"context": ctx, "batch": batch, "budget": 0, "method": "torch_sdpa_dense",
                   "us_per_layer": us, "bytes": bytes_, "max_rel_err": err,
                   "gbps": bytes_ / (us * 1e-6) / 1e9, "rotation": R,
                   "note": "F.scaled_dot_product_attention(enable_gqa=True), bf16, CUDA graph"}
            if copy_gbps:
                row["frac_of_copy"] = row["gbps"] / copy_gbps
                row["floor_us"] = bytes_ / (copy_gbps * 1e9) * 1e6
            rows.append(row)
            print(f"torch_sdpa_dense   ctx {ctx:6d} batch {batch:2d}             {us:9.2f} us  "
                  f"{row['gbps']:6.0f} GB/s  err {err:.2e}", flush=True)
            del ks, vs, qs, outs
            torch.cuda.empty_cache()
    out = {"machine": torch.cuda.get_device_name(0), "torch": torch.__version__, "results": rows}
    json.dump(out, open(a.json, "w"), indent=2)
    if a.merge_into:
        j = json.load(open(a.merge_into))
        j["results"] = [r for r in j["results"] if r["method"] != "torch_sdpa_dense"] + rows
        j["torch"] = torch.__version__
        json.dump(j, open(a.merge_into, "w"), indent=2)


if __name__ == "__main__":
    main()
