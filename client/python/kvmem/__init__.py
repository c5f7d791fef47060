"""Python client for kvmemd, the KV-cache memory daemon.

    import kvmem, numpy as np
    c = kvmem.Client("127.0.0.1:7420")
    sid = c.create_session(layers=2, q_heads=8, kv_heads=2, head_dim=64, dtype="fp32",
                           mode="index", default_budget_tokens=512)
    c.append_kv(sid, K, V, boundaries=kvmem.boundary_classes(token_strings))
    out = c.attend(sid, layer=0, q=q)            # [q_heads, head_dim] float32

Tensors are numpy arrays (or torch tensors, converted through numpy). Element types:
float32 ("fp32"), float16 ("fp16"), and bfloat16 ("bf16") given either as an ``ml_dtypes``
bfloat16 array, a torch.bfloat16 tensor, or a uint16 array holding the raw bf16 bits. Inputs are
converted to the session's dtype (float inputs are rounded to bf16 with round-to-nearest-even).
Outputs are float32.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional, Sequence

import numpy as np

from ._errors import Error
from . import _kvmem

__all__ = ["Client", "Error", "boundary_classes", "MODES", "DTYPES", "GATES"]
__version__ = "0.1.0"

MODES = ("dense", "index", "retrieval_heads", "hybrid")
DTYPES = ("fp32", "fp16", "bf16")
GATES = ("tree_exact", "tree_budget", "linear", "scorer")

_DTYPE_ALIASES = {
    "fp32": "fp32", "f32": "fp32", "float32": "fp32", "float": "fp32",
    "fp16": "fp16", "f16": "fp16", "float16": "fp16", "half": "fp16",
    "bf16": "bf16", "bfloat16": "bf16",
}


def _dtype_name(dtype: Any) -> str:
    if isinstance(dtype, str):
        name = dtype
    elif dtype is np.float32 or dtype is np.float16:
        name = np.dtype(dtype).name
    else:
        name = str(dtype).replace("torch.", "")
        try:
            name = np.dtype(dtype).name
        except TypeError:
            pass
    key = _DTYPE_ALIASES.get(name.lower())
    if key is None:
        raise Error("INVALID_ARGUMENT", f"unsupported dtype {dtype!r} (fp32, fp16, bf16)", 3)
    return key


def _to_numpy(x: Any) -> np.ndarray:
    """numpy view of an array-like; torch tensors go through .cpu() (bf16 as raw uint16 bits)."""
    if isinstance(x, np.ndarray):
        return x
    if hasattr(x, "detach") and hasattr(x, "dtype"):  # torch.Tensor, without importing torch
        t = x.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        if str(t.dtype) == "torch.bfloat16":
            import torch

            return t.contiguous().view(torch.int16).numpy().view(np.uint16)
        return t.numpy()
    return np.asarray(x)


def _f32_to_bf16_bits(a: np.ndarray) -> np.ndarray:
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    nan = (u & 0x7F800000) == 0x7F800000
    nan &= (u & 0x007FFFFF) != 0
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(nan, ((u >> 16) | 0x0040).astype(np.uint16), rounded)


def _bf16_bits_to_f32(a: np.ndarray) -> np.ndarray:
    return (a.astype(np.uint32) << 16).view(np.float32)


def _as_dtype(x: Any, dtype: str, what: str) -> np.ndarray:
    """C-contiguous array of x in the wire dtype (bf16: uint16 bits)."""
    a = _to_numpy(x)
    src = a.dtype.name
    if dtype == "fp32":
        if src == "uint16":
            a = _bf16_bits_to_f32(a)
        return np.ascontiguousarray(a, dtype=np.float32)
    if dtype == "fp16":
        if src == "uint16":
            a = _bf16_bits_to_f32(a)
        return np.ascontiguousarray(a, dtype=np.float16)
    # bf16
    if src == "uint16":
        return np.ascontiguousarray(a)
    if src == "bfloat16":  # ml_dtypes
        return np.ascontiguousarray(a).view(np.uint16)
    if a.dtype.kind != "f":
        raise Error("INVALID_ARGUMENT", f"{what}: expected a float array, got {a.dtype}", 3)
    return _f32_to_bf16_bits(a)


def boundary_classes(tokens: Sequence[str]) -> np.ndarray:
    """Boundary class (0..5, DESIGN §2) of each token string, as uint8 [len(tokens)].

    5 section (blank line or heading marker), 4 line/structural, 3 sentence end, 2 clause,
    1 word, 0 none. Token strings must be decoded text (e.g. "Ġthe" mapped to " the").
    """
    return _kvmem.boundary_classes(list(tokens))


class Client:
    """A connection to one kvmemd. Thread-safe; calls release the GIL while on the wire.

    Raises kvmem.Error("UNAVAILABLE") when no daemon answers, ("UNAUTHENTICATED") for a bad
    token.
    """

    def __init__(
        self,
        address: str = "127.0.0.1:7420",
        token: Optional[str] = None,
        *,
        transport: str = "auto",
        connect_timeout_ms: int = 5000,
        request_timeout_ms: int = 120000,
        client_name: str = "kvmem-python",
    ) -> None:
        self._c = _kvmem.Client(address, token or "", transport, connect_timeout_ms,
                                request_timeout_ms, client_name)
        self._dtypes: dict[int, str] = {}
        self.address = address

    # -- lifecycle -------------------------------------------------------------------------
    def close(self) -> None:
        """Closes the connection; later calls raise Error("FAILED_PRECONDITION")."""
        self._c.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def server_info(self) -> dict:
        """tenant, server_version, backend, max_message_bytes, address, transport."""
        return self._c.server()

    def ping(self, payload: int = 0) -> None:
        self._c.ping(payload)

    # -- sessions --------------------------------------------------------------------------
    def create_session(
        self,
        *,
        layers: int,
        q_heads: int,
        kv_heads: int,
        head_dim: int,
        dtype: Any = "bf16",
        dense_layers: Iterable[int] = (),
        retrieval_head_mask: Optional[Any] = None,
        name: str = "",
        mode: str = "dense",
        chunk_min_tokens: int = 0,
        chunk_max_tokens: int = 0,
        sink_tokens: int = 16,
        recent_window: int = 0,
        default_budget_tokens: int = 0,
        durable: bool = False,
        ttl_seconds: int = 0,
        label: str = "",
        id: int = 0,
        retrieval_rule: str = "default",
        retrieval_rule_value: float = 0.0,
        retrieval_block_tokens: int = 0,
        retrieval_block_pooling: str = "default",
        memory: Optional[dict] = None,
    ) -> int:
        """Creates a session and returns its id (id=0: the daemon picks one).

        mode is the session's default attention mode ("dense", "index", "retrieval_heads",
        "hybrid"); 0 for chunk sizes / budget means the daemon's default. dense_layers are
        always attended densely. retrieval_head_mask: [layers, kv_heads] of 0/1, or None
        (modes retrieval_heads / hybrid need one). retrieval_*: how retrieval heads keep scored
        blocks ("top_k", "ratio", "threshold", "top_p"; value; block tokens, 1 = token level;
        pooling "max" / "mean"); "default" / 0 take the daemon's.
        memory: compressed memory blocks (LycheeMemory), e.g. {"gate_dim": 64, "payload_rows": 4,
        "payload_dim": 128, "payload_dtype": "bf16", "gate": "tree_exact", "scorer_file": ""}.
        """
        dt = _dtype_name(dtype)
        mask = [] if retrieval_head_mask is None else [
            int(x) for x in np.asarray(_to_numpy(retrieval_head_mask)).reshape(-1)]
        m = dict(memory or {})
        unknown = set(m) - {"gate_dim", "payload_rows", "payload_dim", "payload_dtype", "gate",
                            "scorer_file"}
        if unknown:
            raise Error("INVALID_ARGUMENT", f"unknown memory options {sorted(unknown)}", 3)
        sid = self._c.create_session(
            layers, q_heads, kv_heads, head_dim, dt, [int(x) for x in dense_layers], mask, name,
            chunk_min_tokens, chunk_max_tokens, sink_tokens, recent_window,
            default_budget_tokens, mode, durable, ttl_seconds, label, id, retrieval_rule,
            float(retrieval_rule_value), int(retrieval_block_tokens), retrieval_block_pooling,
            int(m.get("gate_dim", 0)), int(m.get("payload_rows", 0)), int(m.get("payload_dim", 0)),
            _dtype_name(m.get("payload_dtype", "bf16")), m.get("gate", "tree_exact"),
            m.get("scorer_file", ""))
        self._dtypes[sid] = dt
        return sid

    def drop_session(self, session: int) -> None:
        self._c.drop_session(session)
        self._dtypes.pop(session, None)

    def list_sessions(self) -> list:
        """Summaries (dicts) of this tenant's sessions."""
        return self._c.list_sessions()

    def session_info(self, session: int) -> dict:
        """Summary of one session, with per-layer index state under "layers"."""
        return self._c.session_info(session)

    def _dtype(self, session: int) -> str:
        dt = self._dtypes.get(session)
        if dt is None:
            dt = self.session_info(session)["profile"]["dtype"]
            self._dtypes[session] = dt
        return dt

    # -- data ------------------------------------------------------------------------------
    def append_kv(self, session: int, k: Any, v: Any, boundaries: Optional[Any] = None) -> dict:
        """Appends tokens: k, v [layers, kv_heads, tokens, head_dim]; boundaries [tokens] uint8.

        Returns {"tokens": total tokens, "chunks": total chunks, "sealed": chunks sealed now}.
        """
        dt = self._dtype(session)
        ka, va = _as_dtype(k, dt, "k"), _as_dtype(v, dt, "v")
        b = None
        if boundaries is not None:
            b = np.ascontiguousarray(_to_numpy(boundaries), dtype=np.uint8).reshape(-1)
        return self._c.append_kv(session, ka, va, dt, b)

    def attend(
        self,
        session: int,
        *,
        layer: int,
        q: Any,
        k: Optional[Any] = None,
        v: Optional[Any] = None,
        mode: Optional[str] = None,
        budget: Optional[int] = None,
        boundary: int = 0,
        return_lse: bool = False,
        return_selection: bool = False,
        retrieval_rule: str = "default",
        retrieval_rule_value: float = 0.0,
        retrieval_block_tokens: int = 0,
        retrieval_block_pooling: str = "default",
    ):
        """Attention for one decode step of one layer.

        q [q_heads, head_dim]; k, v [kv_heads, head_dim] of the new token (appended first, with
        boundary class `boundary`). mode None: the session's mode. budget: tokens per KV head
        besides sinks and tail (None: session default). Returns out [q_heads, head_dim]
        float32, or (out, extras) when return_lse / return_selection is set, extras being a
        dict with "lse" [q_heads], "tokens_attended" [kv_heads] and "selection" (per KV head:
        chunks, starts, ends, scores, role — "none" in index mode, "retrieval", "reused" or
        "dense" in modes retrieval_heads / hybrid — and source_layer).
        """
        dt = self._dtype(session)
        qa = _as_dtype(q, "fp32", "q")  # queries travel as fp32 whatever the KV dtype
        ka = None if k is None else _as_dtype(k, dt, "k")
        va = None if v is None else _as_dtype(v, dt, "v")
        out, lse, attended, selection = self._c.attend(
            session, layer, qa, ka, va, "fp32", dt, boundary, int(budget or 0), mode or "default",
            return_lse, return_selection, retrieval_rule, float(retrieval_rule_value),
            int(retrieval_block_tokens), retrieval_block_pooling)
        if return_lse or return_selection:
            return out, {"lse": lse, "tokens_attended": attended, "selection": selection}
        return out

    def retrieve(self, session: int, *, layer: int, q: Any, budget: Optional[int] = None,
                 top_chunks: int = 0, mode: Optional[str] = None,
                 retrieval_rule: str = "default", retrieval_rule_value: float = 0.0,
                 retrieval_block_tokens: int = 0,
                 retrieval_block_pooling: str = "default") -> dict:
        """Selection only. top_chunks > 0: exact top chunks per KV head (max over the chunk of
        q·k); otherwise the budgeted index search, or in modes "retrieval_heads" / "hybrid"
        (mode None: the session's) what attend would attend per KV head, with its role (the
        kept selections are updated as attend does). Returns {"heads": [per KV head: kv_head,
        chunks, starts, ends, scores, role, source_layer], "nodes_visited", "bytes_read"}.
        """
        return self._c.retrieve(session, layer, _as_dtype(q, "fp32", "q"), "fp32",
                                int(budget or 0), top_chunks, mode or "default", retrieval_rule,
                                float(retrieval_rule_value), int(retrieval_block_tokens),
                                retrieval_block_pooling)

    # -- memory blocks (LycheeMemory) ------------------------------------------------------
    def _memory_options(self, session: int) -> dict:
        return self._c.list_memory_blocks(session, 2**64 - 1, 1)["options"]

    def put_memory_blocks(self, session: int, keys: Any, payloads: Any, *,
                          spans: Optional[Any] = None, labels: Optional[Sequence[str]] = None
                          ) -> dict:
        """Adds blocks: keys [n, gate_dim], payloads [n, payload_rows, payload_dim] (converted to
        the session's payload dtype), spans [n, 2] token ranges (None: [0, 0)), labels [n].
        All or nothing. Returns {"ids": new block ids, "blocks": held, "bytes": payload bytes}.
        """
        ka = _as_dtype(keys, "fp32", "keys")
        dt = self._memory_options(session)["payload_dtype"]
        pa = _as_dtype(payloads, dt, "payloads")
        n = ka.shape[0] if ka.ndim >= 1 else 0
        if spans is None:
            starts, ends = [0] * n, [0] * n
        else:
            sp = np.asarray(_to_numpy(spans)).reshape(-1, 2)
            starts, ends = [int(x) for x in sp[:, 0]], [int(x) for x in sp[:, 1]]
        return self._c.put_memory_blocks(session, ka, pa, dt, starts, ends,
                                         list(labels) if labels is not None else [])

    def select_memory(self, session: int, query: Any, k: int, *, gate: str = "default",
                      budget_leaves: int = 0, return_payloads: bool = True) -> dict:
        """Top-k blocks for query [gate_dim] (gate: "default", "tree_exact", "tree_budget",
        "linear", "scorer"). Returns ids and scores (best first, ties by lower id), blocks
        (id, span_start, span_end, label), payloads [k, payload_rows * payload_dim] float32,
        exact, keys_scored, leaves_visited.
        """
        return self._c.select_memory(session, _as_dtype(query, "fp32", "query"), k, gate,
                                     budget_leaves, return_payloads)

    def get_memory_blocks(self, session: int, ids: Sequence[int], *,
                          gate_keys: bool = False) -> dict:
        """blocks, payloads [n, payload_rows * payload_dim] float32 (and gate_keys) of ids."""
        return self._c.get_memory_blocks(session, [int(i) for i in ids], gate_keys)

    def drop_memory_blocks(self, session: int, ids: Sequence[int]) -> int:
        """Drops the ids (all or nothing); returns the blocks left."""
        return self._c.drop_memory_blocks(session, [int(i) for i in ids])

    def list_memory_blocks(self, session: int, *, after: int = 0, limit: int = 0) -> dict:
        """blocks with id > after (limit 0: 1000), total_blocks, bytes, options."""
        return self._c.list_memory_blocks(session, after, limit)
