"""transformers adapter: a Llama/Qwen-family causal LM decodes with kvmemd attending.

    import kvmem, kvmem.hf
    model = AutoModelForCausalLM.from_pretrained(...)
    kvmem.hf.attach(model)                       # attention function + input-ids hook
    cache = kvmem.hf.KvmemCache(kvmem.Client(addr), model.config, mode="index",
                                budget_tokens=512, local_layers=(0, 1), tokenizer=tokenizer)
    out = model.generate(ids, past_key_values=cache, max_new_tokens=64)
    cache.close()                                # drops the kvmemd session

How it works. `attach` registers an attention function ("kvmem") with transformers'
AttentionInterface (and sdpa's mask function under the same name) and makes it the model's
attention implementation; it also adds a forward pre-hook that hands each call's input ids to a
KvmemCache, which turns them into boundary classes (`kvmem.boundary_classes` of the decoded token
strings) for the chunker. A KvmemCache holds one sequence (batch 1):

- local layers (`local_layers`, e.g. the first two, which sparse methods keep dense) are plain
  transformers DynamicLayers: their K/V stay in the process and attention over them is sdpa's;
- every other layer is a kvmemd layer. Prefill (the first forward) attends locally with sdpa over
  the prompt's K/V and then sends them, all kvmemd layers in one AppendKV with the prompt's
  boundary classes; each later token goes to `Client.attend` (q, its new k/v, the boundary class
  of its token), which appends it to the session's tail and returns attention over what the
  session's mode selects (dense, index, retrieval_heads, hybrid). Nothing of those layers is kept
  locally. A forward of several new tokens after the prefill attends them one at a time, in order.

The kvmemd session is created at the prefill: profile = the kvmemd layers (session layer i is the
i-th non-local model layer; `dense_layers` are given in model layer numbers and mapped), heads and
head dim from the config, K/V dtype = the model's unless `dtype` says otherwise. Attention
scaling other than 1/sqrt(head_dim) is folded into q. Padding masks, batches > 1, beam search,
cropping and sliding-window layers are not supported (ValueError / NotImplementedError).

`KvmemCache.from_cache(...)` builds a cache from an already prefilled DynamicCache (e.g. prefill
once, then compare several modes on the same context). Requires torch and transformers (5.x).
"""

from __future__ import annotations

import math
import threading
from typing import Any, Iterable, Optional, Sequence

import numpy as np
import torch
from transformers import AttentionInterface
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicLayer
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.integrations.sdpa_attention import sdpa_attention_forward

import kvmem

ATTN_IMPLEMENTATION = "kvmem"

# A kvmemd layer's update() leaves (layer, k, v) here for the attention call that follows it in
# the same thread (transformers calls cache.update, then the attention function, layer by layer).
_pending = threading.local()


def _decoded_strings(tokenizer, ids: Sequence[int]) -> list[str]:
    return [tokenizer.decode([int(i)]) for i in ids]


class KvmemLayer(CacheLayerMixin):
    """One model layer whose K/V live in a kvmemd session (see the module docstring)."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, cache: "KvmemCache", layer_idx: int) -> None:
        super().__init__()
        self.cache = cache
        self.layer_idx = layer_idx
        self.tokens = 0

    def lazy_initialization(self, key_states, value_states) -> None:
        self.device = key_states.device
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if key_states.shape[0] != 1:
            raise NotImplementedError("KvmemCache holds one sequence (batch size 1)")
        n = key_states.shape[-2]
        if self.tokens == 0 and not self.cache.prefilled:
            # Prefill: attended locally (sdpa over these K/V), sent when every layer has them.
            self.cache._stage_prefill(self.layer_idx, key_states, value_states)
            self.tokens += n
            _pending.entry = None
            return key_states, value_states
        self.tokens += n
        _pending.entry = (self, key_states, value_states)
        return key_states, value_states

    def get_mask_sizes(self, query_length, *args) -> tuple[int, int]:
        if isinstance(query_length, torch.Tensor):  # older transformers pass cache_position
            query_length = query_length.shape[0]
        return self.tokens + int(query_length), 0

    def get_seq_length(self) -> int:
        return self.tokens

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        raise NotImplementedError("a KvmemCache cannot be reset; make a new one")

    def reorder_cache(self, beam_idx) -> None:
        raise NotImplementedError("beam search is not supported by KvmemCache")

    def offload(self):
        pass

    def prefetch(self):
        pass

    def attend(self, module, query):
        """query [1, Hq, S, D], the staged new k/v [1, Hkv, S, D] -> [1, S, Hq, D]."""
        entry = getattr(_pending, "entry", None)
        _pending.entry = None
        if entry is None or entry[0] is not self:
            raise RuntimeError(f"kvmem: no new K/V staged for layer {self.layer_idx}")
        _, k, v = entry
        return self.cache._attend(self.layer_idx, module, query, k, v)


class KvmemCache(Cache):
    """A transformers Cache whose non-local layers live in a kvmemd session.

    client: a kvmem.Client. config: the model's config (num_hidden_layers, num_attention_heads,
    num_key_value_heads, head_dim or hidden_size). local_layers: model layers kept in the process
    and attended densely by sdpa. mode / budget_tokens / boundary classes: as Client.attend.
    dense_layers: model layers kvmemd attends densely (profile dense_layers). tokenizer: to derive
    boundary classes from token strings (attach() passes input ids through a forward pre-hook);
    without one every token has class 0. Other keywords go to Client.create_session (chunk sizes,
    sink_tokens, recent_window, retrieval_head_mask [model layers x kv heads], ...).
    """

    def __init__(self, client, config, *, mode: str = "dense", budget_tokens: int = 0,
                 local_layers: Iterable[int] = (0, 1), dense_layers: Iterable[int] = (),
                 tokenizer=None, dtype: Optional[str] = None, **session_options: Any) -> None:
        n_layers = int(config.num_hidden_layers)
        self.local_layers = sorted(set(int(i) for i in local_layers))
        if any(i < 0 or i >= n_layers for i in self.local_layers):
            raise ValueError(f"local_layers must be in [0, {n_layers})")
        layers: list = []
        self.remote_index: dict[int, int] = {}
        for i in range(n_layers):
            if i in self.local_layers:
                layers.append(DynamicLayer())
            else:
                self.remote_index[i] = len(self.remote_index)
                layers.append(KvmemLayer(self, i))
        super().__init__(layers=layers)
        self.client = client
        self.mode = mode
        self.budget_tokens = int(budget_tokens)
        self.q_heads = int(config.num_attention_heads)
        self.kv_heads = int(getattr(config, "num_key_value_heads", None) or self.q_heads)
        self.head_dim = int(getattr(config, "head_dim", None) or
                            config.hidden_size // config.num_attention_heads)
        self.dense_layers = [self.remote_index[i] for i in dense_layers if i in self.remote_index]
        self.tokenizer = tokenizer
        self.dtype = dtype
        self.session_options = dict(session_options)
        mask = self.session_options.pop("retrieval_head_mask", None)
        if mask is not None:
            mask = np.asarray(mask, dtype=np.uint8).reshape(n_layers, self.kv_heads)
            self.session_options["retrieval_head_mask"] = mask[sorted(self.remote_index)]
        self.session: Optional[int] = None
        self.prefilled = False
        self._staged: dict[int, tuple] = {}
        self._boundaries: list[int] = []  # classes of observed tokens not yet sent
        self.tokens_attended: list[float] = []  # mean per KV head, per attend of a sparse layer

    # ---- boundary classes ------------------------------------------------------------------
    def observe(self, input_ids) -> None:
        """Queues the boundary classes of tokens about to be fed (batch 1)."""
        if self.tokenizer is None or input_ids is None:
            return
        ids = input_ids.reshape(-1).tolist() if hasattr(input_ids, "reshape") else list(input_ids)
        self._boundaries.extend(int(b) for b in
                                kvmem.boundary_classes(_decoded_strings(self.tokenizer, ids)))

    def _take_boundaries(self, n: int) -> Optional[np.ndarray]:
        if len(self._boundaries) < n:
            self._boundaries.clear()
            return None
        out, self._boundaries = self._boundaries[:n], self._boundaries[n:]
        return np.asarray(out, dtype=np.uint8)

    # ---- sequence length -------------------------------------------------------------------
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.layers[layer_idx].get_seq_length() if layer_idx < len(self.layers) else 0

    # ---- kvmemd ----------------------------------------------------------------------------
    def _session_dtype(self, t: torch.Tensor) -> str:
        if self.dtype:
            return self.dtype
        return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}.get(
            t.dtype, "fp32")

    def _create_session(self, like: torch.Tensor) -> None:
        self.session = self.client.create_session(
            layers=len(self.remote_index), q_heads=self.q_heads, kv_heads=self.kv_heads,
            head_dim=self.head_dim, dtype=self._session_dtype(like), mode=self.mode,
            dense_layers=self.dense_layers, default_budget_tokens=self.budget_tokens,
            **self.session_options)

    def _stage_prefill(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> None:
        self._staged[layer_idx] = (k, v)
        if len(self._staged) == len(self.remote_index):
            self._send_prefill()

    def _send_prefill(self) -> None:
        order = sorted(self.remote_index)
        k0 = self._staged[order[0]][0]
        if self.session is None:
            self._create_session(k0)
        dt = k0.dtype if k0.dtype in (torch.float16, torch.bfloat16) else torch.float32
        K = torch.stack([self._staged[i][0][0] for i in order]).to("cpu", dt)
        V = torch.stack([self._staged[i][1][0] for i in order]).to("cpu", dt)
        self.client.append_kv(self.session, K.contiguous(), V.contiguous(),
                              boundaries=self._take_boundaries(K.shape[2]))
        self._staged.clear()
        self.prefilled = True

    def _attend(self, layer_idx: int, module, query, k, v) -> torch.Tensor:
        if not self.prefilled:
            raise RuntimeError("kvmem: decode before the prefill reached kvmemd")
        layer = self.remote_index[layer_idx]
        scaling = getattr(module, "scaling", None)
        q = query[0].float()
        if scaling is not None and not math.isclose(scaling, self.head_dim ** -0.5, rel_tol=1e-6):
            q = q * (scaling * math.sqrt(self.head_dim))  # kvmemd scales by 1/sqrt(D)
        S = q.shape[1]
        if layer == 0:  # the first kvmemd layer consumes one boundary class per token
            self._step_boundaries = self._take_boundaries(S)
        bounds = getattr(self, "_step_boundaries", None)
        kk = k[0].to("cpu", k.dtype if k.dtype in (torch.float16, torch.bfloat16)
                     else torch.float32)
        vv = v[0].to("cpu", kk.dtype)
        qq = q.cpu()
        outs = []
        sparse = self.mode != "dense" and layer not in self.dense_layers
        for s in range(S):
            out, extra = self.client.attend(
                self.session, layer=layer, q=qq[:, s].contiguous(), k=kk[:, s].contiguous(),
                v=vv[:, s].contiguous(), mode=self.mode, budget=self.budget_tokens or None,
                boundary=int(bounds[s]) if bounds is not None else 0, return_lse=True)
            if sparse:
                self.tokens_attended.append(float(np.mean(extra["tokens_attended"])))
            outs.append(torch.from_numpy(np.asarray(out)))
        o = torch.stack(outs, dim=0)  # [S, Hq, D]
        return o.unsqueeze(0).to(device=query.device, dtype=query.dtype)

    @classmethod
    def from_cache(cls, cache, client, config, *, boundaries=None, **kwargs) -> "KvmemCache":
        """A KvmemCache holding the context of an already prefilled cache (e.g. a DynamicCache):
        local layers get copies of its K/V, kvmemd layers are sent with `boundaries` (uint8 per
        token, or None)."""
        self = cls(client, config, **kwargs)
        for i, layer in enumerate(self.layers):
            k, v = cache.layers[i].keys, cache.layers[i].values
            if isinstance(layer, DynamicLayer):
                layer.update(k.clone(), v.clone())
            else:
                layer.lazy_initialization(k, v)
                layer.tokens = k.shape[-2]
                self._staged[i] = (k, v)
        if boundaries is not None:
            self._boundaries = [int(b) for b in boundaries]
        self._send_prefill()
        return self

    def close(self) -> None:
        """Drops the kvmemd session (idempotent)."""
        if self.session is not None:
            try:
                self.client.drop_session(self.session)
            finally:
                self.session = None

    def __del__(self):  # best effort; call close() to see errors
        try:
            self.close()
        except Exception:
            pass

    def crop(self, *args, **kwargs):
        raise NotImplementedError("KvmemCache cannot be cropped")

    def reorder_cache(self, beam_idx) -> None:
        raise NotImplementedError("beam search is not supported by KvmemCache")


# ---- attention function --------------------------------------------------------------------
def kvmem_attention_forward(module, query, key, value, attention_mask, scaling=None,
                            dropout=0.0, **kwargs):
    """transformers attention function: kvmemd layers after the prefill go to kvmemd, the
    rest (local layers, prefill, any other cache) to sdpa."""
    entry = getattr(_pending, "entry", None)
    if entry is not None and entry[0].layer_idx == getattr(module, "layer_idx", None):
        return entry[0].attend(module, query), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                  dropout=dropout, **kwargs)


def register() -> None:
    """Registers the "kvmem" attention function and its (sdpa) mask with transformers."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, kvmem_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)


def _observe_hook(module, args, kwargs):
    cache = kwargs.get("past_key_values", kwargs.get("cache"))
    if isinstance(cache, KvmemCache):
        ids = kwargs.get("input_ids", args[0] if args else None)
        cache.observe(ids)


def attach(model) -> None:
    """Makes `model` attend through kvmem (register() + attention implementation) and feeds each
    forward's input ids to its KvmemCache (boundary classes, when the cache has a tokenizer).
    Idempotent. Calls without a KvmemCache behave as with sdpa."""
    register()
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
    else:
        model.config._attn_implementation = ATTN_IMPLEMENTATION
    if not getattr(model, "_kvmem_hook", None):
        model._kvmem_hook = model.register_forward_pre_hook(_observe_hook, with_kwargs=True)


__all__ = ["KvmemCache", "KvmemLayer", "attach", "register", "kvmem_attention_forward",
           "ATTN_IMPLEMENTATION"]
