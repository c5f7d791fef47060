"""Writes the tensor_file test fixtures with the reference writers (numpy, safetensors).

Run from this folder: python make_fixtures.py  (needs numpy and safetensors from PyPI).
Values are small closed-form integers/halves so the C++ test can state them exactly.
"""
import numpy as np
from safetensors.numpy import save_file

mask = np.array([[1, 0, 0, 1], [0, 1, 1, 0]], dtype=np.uint8)             # [layers=2, kv=4]
weights = (np.arange(12, dtype=np.float32).reshape(3, 4) - 5.5) / 2      # exact in f32
half = np.array([0.5, -1.25, 3.0], dtype=np.float16)
save_file({"retrieval_heads": mask, "gate.weight": weights, "scale": half},
          "mixed.safetensors", metadata={"model": "fixture"})
np.save("gate_f32.npy", weights)
np.save("mask_bool.npy", mask.astype(bool))
np.save("ids_i64.npy", np.array([7, -3, 1 << 40], dtype=np.int64))
np.save("scalar_f16.npy", np.float16(2.5))
np.save("fortran.npy", np.asfortranarray(weights))
