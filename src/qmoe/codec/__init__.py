"""The sub-1-bit expert format: entropy-coded ternary and 2-bit matrices, decoders, checkpoint container.

Spec: docs/format.md. ``import qmoe.codec`` imports numpy only; numba compiles on the first encode or fast
decode, torch and safetensors load on the first ``save_shard``/``load_shard``.
"""

from __future__ import annotations

from qmoe.codec.container import Shard, load_shard, save_shard
from qmoe.codec.decode import (
    ROW_STATUS_TEXT,
    decode,
    decode_dense,
    decode_reference,
    dequantize,
    dequantize_fast,
    row_error,
    row_status,
)
from qmoe.codec.encode import build_table, encode_int2, encode_ternary
from qmoe.codec.format import FORMAT_VERSION, MAX_CODE_LEN, CodeTable, EncodedMatrix

__all__ = [
    "FORMAT_VERSION", "MAX_CODE_LEN", "CodeTable", "EncodedMatrix", "Shard",
    "encode_ternary", "encode_int2", "build_table",
    "decode", "dequantize", "decode_dense", "dequantize_fast", "decode_reference",
    "ROW_STATUS_TEXT", "row_status", "row_error",
    "save_shard", "load_shard",
]
