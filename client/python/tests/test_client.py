"""The Python client against a real kvmemd, checked with a numpy reference attention."""

from __future__ import annotations

import numpy as np
import pytest

import kvmem

L, HQ, HKV, D = 2, 8, 2, 64
G = HQ // HKV


def reference_attention(q, keys, values, positions=None):
    """q [HQ, D]; keys/values [HKV, T, D] (one layer); softmax(q·k / sqrt(D)) v in float64.

    positions: per KV head, the token indices to attend (None: all).
    """
    q = q.astype(np.float64)
    out = np.zeros((q.shape[0], keys.shape[-1]))
    for h in range(q.shape[0]):
        kh = h // (q.shape[0] // keys.shape[0])
        k = keys[kh].astype(np.float64)
        v = values[kh].astype(np.float64)
        if positions is not None:
            k, v = k[positions[kh]], v[positions[kh]]
        s = k @ q[h] / np.sqrt(q.shape[1])
        p = np.exp(s - s.max())
        out[h] = (p / p.sum()) @ v
    return out


def topical_kv(rng, t, layers=L, block=128):
    """Keys that cluster by topic block (so an index has structure to find), random values."""
    k = np.empty((layers, HKV, t, D), np.float32)
    for start in range(0, t, block):
        topic = rng.normal(0, 2, (layers, HKV, 1, D))
        n = min(block, t - start)
        k[:, :, start:start + n] = topic + rng.normal(0, 0.5, (layers, HKV, n, D))
    v = rng.normal(0, 1, (layers, HKV, t, D)).astype(np.float32)
    return k, v


def test_server_info_and_ping(client):
    info = client.server_info()
    assert info["backend"]
    assert info["server_version"]
    client.ping(42)


@pytest.mark.parametrize("dtype,tol", [("fp32", 2e-4), ("fp16", 2e-2), ("bf16", 6e-2)])
def test_dense_attend_matches_numpy(client, dtype, tol):
    rng = np.random.default_rng(1)
    t = 300
    sid = client.create_session(layers=L, q_heads=HQ, kv_heads=HKV, head_dim=D, dtype=dtype)
    try:
        k = rng.normal(0, 1, (L, HKV, t, D)).astype(np.float32)
        v = rng.normal(0, 1, (L, HKV, t, D)).astype(np.float32)
        r = client.append_kv(sid, k, v)
        assert r["tokens"] == t
        for layer in range(L):
            q = rng.normal(0, 1, (HQ, D)).astype(np.float32)
            out = client.attend(sid, layer=layer, q=q, mode="dense")
            assert out.shape == (HQ, D) and out.dtype == np.float32
            ref = reference_attention(q, k[layer], v[layer])
            np.testing.assert_allclose(out, ref, atol=tol, rtol=tol)
        # A decode step: the new token's k/v are appended to the layer first.
        nk = rng.normal(0, 1, (HKV, D)).astype(np.float32)
        nv = rng.normal(0, 1, (HKV, D)).astype(np.float32)
        q = rng.normal(0, 1, (HQ, D)).astype(np.float32)
        out, extra = client.attend(sid, layer=0, q=q, k=nk, v=nv, mode="dense", return_lse=True)
        k0 = np.concatenate([k[0], nk[:, None]], axis=1)
        v0 = np.concatenate([v[0], nv[:, None]], axis=1)
        np.testing.assert_allclose(out, reference_attention(q, k0, v0), atol=tol, rtol=tol)
        assert extra["lse"].shape == (HQ,)
        assert list(extra["tokens_attended"]) == [t + 1] * HKV
    finally:
        client.drop_session(sid)


def test_inputs_in_other_dtypes_are_converted(client):
    """float64 / float16 inputs to an fp32 session, and uint16 bf16 bits to a bf16 session."""
    rng = np.random.default_rng(2)
    t = 64
    k = rng.normal(0, 1, (L, HKV, t, D))
    v = rng.normal(0, 1, (L, HKV, t, D))
    q = rng.normal(0, 1, (HQ, D))
    sid = client.create_session(layers=L, q_heads=HQ, kv_heads=HKV, head_dim=D, dtype="fp32")
    client.append_kv(sid, k, v)  # float64 in
    out = client.attend(sid, layer=1, q=q)
    np.testing.assert_allclose(out, reference_attention(q, k[1], v[1]), atol=1e-4, rtol=1e-4)
    client.drop_session(sid)

    sid = client.create_session(layers=L, q_heads=HQ, kv_heads=HKV, head_dim=D, dtype=np.float16)
    bits = kvmem._f32_to_bf16_bits(k.astype(np.float32))
    assert bits.dtype == np.uint16
    client.drop_session(sid)
    sid = client.create_session(layers=L, q_heads=HQ, kv_heads=HKV, head_dim=D, dtype="bf16")
    client.append_kv(sid, bits, kvmem._f32_to_bf16_bits(v.astype(np.float32)))
    out = client.attend(sid, layer=0, q=q)
    kb = kvmem._bf16_bits_to_f32(bits)
    vb = kvmem._bf16_bits_to_f32(kvmem._f32_to_bf16_bits(v.astype(np.float32)))
    np.testing.assert_allclose(out, reference_attention(q, kb[0], vb[0]), atol=2e-2, rtol=2e-2)
    client.drop_session(sid)


def test_bf16_rounding_is_nearest_even():
    x = np.array([1.0, 1.00390625, 1.01171875, -2.5, np.inf], np.float32)
    bits = kvmem._f32_to_bf16_bits(x)
    back = kvmem._bf16_bits_to_f32(bits)
    # 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties to even (1.0); 1 + 3*2^-8 ties up.
    np.testing.assert_array_equal(back, [1.0, 1.0, 1.015625, -2.5, np.inf])
    assert np.isnan(kvmem._bf16_bits_to_f32(kvmem._f32_to_bf16_bits(np.array([np.nan],
                                                                           np.float32))))[0]


def _attended_positions(info, t, selection, sinks=16):
    """Token indices index mode attends per KV head: sinks ∪ selected chunks ∪ open tail."""
    tail_start = t - info["tail_tokens"]
    out = []
    for sel in selection:
        pos = set(range(min(sinks, t)))
        pos.update(range(tail_start, t))
        for s, e in zip(sel["starts"], sel["ends"]):
            pos.update(range(s, e))
        out.append(np.array(sorted(pos)))
    return out


def test_index_mode_attends_sinks_selection_and_tail(client):
    rng = np.random.default_rng(3)
    t, budget = 2048, 256
    k, v = topical_kv(rng, t)
    tokens = [("word" if i % 11 else ".") + (" " if i % 3 else "") for i in range(t)]
    sid = client.create_session(layers=L, q_heads=HQ, kv_heads=HKV, head_dim=D, dtype="fp32",
                                mode="index", default_budget_tokens=budget)
    try:
        client.append_kv(sid, k, v, boundaries=kvmem.boundary_classes(tokens))
        info = client.session_info(sid)
        assert info["tokens"] == t and info["chunks"] > 0
        assert len(info["layers"]) == L and info["layers"][0]["tree_depth"] >= 1
        for layer in range(L):
            target = int(rng.integers(0, t))
            q = np.repeat(k[layer, :, target], G, axis=0)  # each head looks for one key
            out, extra = client.attend(sid, layer=layer, q=q, return_selection=True)
            assert len(extra["selection"]) == HKV
            for h, sel in enumerate(extra["selection"]):
                picked = sum(e - s for s, e in zip(sel["starts"], sel["ends"]))
                assert picked <= budget + 32
                assert extra["tokens_attended"][h] < t // 2
            pos = _attended_positions(info, t, extra["selection"])
            ref = reference_attention(q, k[layer], v[layer], positions=pos)
            np.testing.assert_allclose(out, ref, atol=1e-3, rtol=1e-3)
            # Dense on request, from the same session.
            dense = client.attend(sid, layer=layer, q=q, mode="dense")
            np.testing.assert_allclose(dense, reference_attention(q, k[layer], v[layer]),
                                       atol=1e-4, rtol=1e-4)
            # With a budget covering the context, index mode is dense attention.
            full = client.attend(sid, layer=layer, q=q, budget=t)
            np.testing.assert_allclose(full, dense, atol=1e-4, rtol=1e-4)
    finally:
        client.drop_session(sid)


def test_retrieve_exact_top_chunks_match_brute_force(client):
    rng = np.random.default_rng(4)
    t = 1024
    k, v = topical_kv(rng, t)
    sid = client.create_session(layers=L, q_heads=HQ, kv_heads=HKV, head_dim=D, dtype="fp32",
                                mode="index", default_budget_tokens=128)
    try:
        client.append_kv(sid, k, v, boundaries=np.full(t, 1, np.uint8))
        info = client.session_info(sid)
        sealed = t - info["tail_tokens"]
        q = rng.normal(0, 1, (HQ, D)).astype(np.float32)
        r = client.retrieve(sid, layer=1, q=q, top_chunks=4)
        assert len(r["heads"]) == HKV
        for h, sel in enumerate(r["heads"]):
            assert len(sel["chunks"]) == 4
            scores = (k[1, h, :sealed] @ q[h * G:(h + 1) * G].T).max(axis=1)  # max over group
            assert sel["scores"][0] == pytest.approx(scores.max(), rel=1e-4)
            s0, e0 = sel["starts"][0], sel["ends"][0]
            assert s0 <= int(scores.argmax()) < e0
            assert list(sel["scores"]) == sorted(sel["scores"], reverse=True)
        budgeted = client.retrieve(sid, layer=0, q=q, budget=128)
        for sel in budgeted["heads"]:
            assert 0 < sum(e - s for s, e in zip(sel["starts"], sel["ends"])) <= 128 + 32
    finally:
        client.drop_session(sid)


def test_session_lifecycle(client):
    sid = client.create_session(layers=1, q_heads=4, kv_heads=1, head_dim=16, dtype="fp16",
                                label="pytest", name="tiny", dense_layers=[0])
    ids = [s["id"] for s in client.list_sessions()]
    assert sid in ids
    info = client.session_info(sid)
    assert info["profile"]["dtype"] == "fp16"
    assert info["profile"]["head_dim"] == 16
    assert info["options"]["label"] == "pytest"
    assert info["tokens"] == 0
    client.drop_session(sid)
    assert sid not in [s["id"] for s in client.list_sessions()]
    with pytest.raises(kvmem.Error) as e:
        client.session_info(sid)
    assert e.value.code == "NOT_FOUND"


def test_errors_carry_the_status_code(client, daemon):
    with pytest.raises(kvmem.Error) as e:
        client.attend(123456789, layer=0, q=np.zeros((HQ, D), np.float32))
    assert e.value.code == "NOT_FOUND"
    assert isinstance(e.value, Exception) and e.value.message

    sid = client.create_session(layers=L, q_heads=HQ, kv_heads=HKV, head_dim=D, dtype="fp32")
    try:
        bad = np.zeros((L, HKV, 8, D + 1), np.float32)  # wrong head_dim
        with pytest.raises(kvmem.Error) as e:
            client.append_kv(sid, bad, bad)
        assert e.value.code == "INVALID_ARGUMENT"
        with pytest.raises(kvmem.Error) as e:
            client.attend(sid, layer=L + 3, q=np.zeros((HQ, D), np.float32))
        assert e.value.code in ("INVALID_ARGUMENT", "OUT_OF_RANGE", "NOT_FOUND")
        with pytest.raises(kvmem.Error) as e:
            client.attend(sid, layer=0, q=np.zeros((HQ, D), np.float32), mode="sideways")
        assert e.value.code == "INVALID_ARGUMENT"
        # The session still works after the bad requests.
        k = np.ones((L, HKV, 4, D), np.float32)
        assert client.append_kv(sid, k, k)["tokens"] == 4
    finally:
        client.drop_session(sid)

    with pytest.raises(kvmem.Error) as e:
        client.create_session(layers=1, q_heads=1, kv_heads=1, head_dim=8, dtype="int8")
    assert e.value.code == "INVALID_ARGUMENT"


def test_no_daemon_is_unavailable():
    from conftest import free_port

    with pytest.raises(kvmem.Error) as e:
        kvmem.Client(f"127.0.0.1:{free_port()}", connect_timeout_ms=500)
    assert e.value.code == "UNAVAILABLE"


def test_closed_client_raises(daemon):
    c = kvmem.Client(daemon.address)
    c.close()
    with pytest.raises(kvmem.Error) as e:
        c.ping()
    assert e.value.code == "FAILED_PRECONDITION"


def test_boundary_classes():
    b = kvmem.boundary_classes(["Hello", ",", " world", ".", "\n", "\n\n", "#", "x"])
    assert b.dtype == np.uint8 and b.shape == (8,)
    assert b[1] == 2 and b[3] == 3 and b[4] >= 4 and b[5] == 5


@pytest.mark.parametrize("mode", ["retrieval_heads", "hybrid"])
def test_hybrid_heads_roles_and_reuse(client, mode):
    """Retrieval heads select and attend densely; sparse heads of later layers reuse."""
    mask = np.zeros((L, HKV), np.uint8)
    mask[0, 0] = 1  # layer 0, KV head 0
    sid = client.create_session(layers=L, q_heads=HQ, kv_heads=HKV, head_dim=D, dtype="fp32",
                                mode=mode, retrieval_head_mask=mask, default_budget_tokens=64,
                                retrieval_block_tokens=16, retrieval_rule="top_k")
    try:
        rng = np.random.default_rng(11)
        t = 600
        k = rng.normal(0, 1, (L, HKV, t, D)).astype(np.float32)
        client.append_kv(sid, k, k)
        info = client.session_info(sid)
        assert list(info["profile"]["retrieval_head_mask"]) == mask.reshape(-1).tolist()
        q = rng.normal(0, 1, (HQ, D)).astype(np.float32)
        _, e0 = client.attend(sid, layer=0, q=q, return_selection=True)
        assert [h["role"] for h in e0["selection"]] == ["retrieval", "dense"]
        assert e0["tokens_attended"][0] == t  # full attention
        _, e1 = client.attend(sid, layer=1, q=q, return_selection=True)
        assert [h["role"] for h in e1["selection"]] == ["reused", "dense"]
        assert e1["selection"][0]["source_layer"] == 0
        assert e1["selection"][0]["starts"] == e0["selection"][0]["starts"]
        assert e1["tokens_attended"][0] < t // 2
        # Per call: a ratio rule over single tokens, through retrieve.
        r = client.retrieve(sid, layer=0, q=q, retrieval_rule="ratio", retrieval_rule_value=0.1,
                            retrieval_block_tokens=1)
        assert [h["role"] for h in r["heads"]] == ["retrieval", "dense"]
        if mode == "retrieval_heads":
            sealed = info["tokens"] - info["tail_tokens"]
            assert len(r["heads"][0]["starts"]) == -(-(sealed - 16) // 10)  # ceil(0.1 * n)
        with pytest.raises(kvmem.Error) as e:
            client.attend(sid, layer=1, q=q, retrieval_rule="top_p", retrieval_rule_value=2.0)
        assert e.value.code == "INVALID_ARGUMENT"
    finally:
        client.drop_session(sid)


def test_threads_share_one_client(client):
    """Calls release the GIL and one Client serves several threads at once."""
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(5)
    t = 256
    k = rng.normal(0, 1, (L, HKV, t, D)).astype(np.float32)
    v = rng.normal(0, 1, (L, HKV, t, D)).astype(np.float32)
    sids = []
    for _ in range(4):
        sid = client.create_session(layers=L, q_heads=HQ, kv_heads=HKV, head_dim=D, dtype="fp32")
        client.append_kv(sid, k, v)
        sids.append(sid)
    qs = rng.normal(0, 1, (16, HQ, D)).astype(np.float32)

    def work(i):
        return client.attend(sids[i % 4], layer=i % L, q=qs[i])

    try:
        with ThreadPoolExecutor(4) as pool:
            outs = list(pool.map(work, range(16)))
        for i, out in enumerate(outs):
            ref = reference_attention(qs[i], k[i % L], v[i % L])
            np.testing.assert_allclose(out, ref, atol=2e-4, rtol=2e-4)
    finally:
        for sid in sids:
            client.drop_session(sid)


def test_memory_blocks_put_select_get_drop(client):
    rng = np.random.default_rng(5)
    dg, rows, dim = 16, 2, 4
    sid = client.create_session(layers=1, q_heads=2, kv_heads=1, head_dim=16,
                                memory={"gate_dim": dg, "payload_rows": rows, "payload_dim": dim,
                                        "payload_dtype": "fp32"})
    try:
        keys = rng.normal(0, 1, (200, dg)).astype(np.float32)
        pay = rng.normal(0, 1, (200, rows, dim)).astype(np.float32)
        spans = np.stack([np.arange(200) * 64, np.arange(1, 201) * 64], axis=1)
        r = client.put_memory_blocks(sid, keys, pay, spans=spans,
                                     labels=[f"b{i}" for i in range(200)])
        ids = r["ids"]
        assert len(ids) == 200 and r["blocks"] == 200
        q = rng.normal(0, 1, dg).astype(np.float32)
        sel = client.select_memory(sid, q, 5)
        ref = np.argsort(-(keys.astype(np.float64) @ q), kind="stable")[:5]
        assert sel["ids"] == [ids[i] for i in ref]
        assert sel["exact"]
        np.testing.assert_array_equal(sel["payloads"], pay[ref].reshape(5, -1))
        assert sel["blocks"][0]["label"] == f"b{ref[0]}"
        assert sel["blocks"][0]["span_start"] == int(spans[ref[0], 0])
        lin = client.select_memory(sid, q, 5, gate="linear")
        assert lin["ids"] == sel["ids"] and lin["scores"] == sel["scores"]
        got = client.get_memory_blocks(sid, [ids[3]], gate_keys=True)
        np.testing.assert_array_equal(got["gate_keys"][0], keys[3])
        assert client.drop_memory_blocks(sid, ids[:100]) == 100
        assert client.list_memory_blocks(sid)["total_blocks"] == 100
        with pytest.raises(kvmem.Error) as e:
            client.get_memory_blocks(sid, [ids[0]])
        assert e.value.code == "NOT_FOUND"
        with pytest.raises(kvmem.Error) as e:
            client.select_memory(sid, q[:-1], 3)
        assert e.value.code == "INVALID_ARGUMENT"
    finally:
        client.drop_session(sid)
