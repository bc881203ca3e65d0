"""Write a qmoe-compressed SwitchTransformers checkpoint of any size straight from codes, cheaply.

Used by ``benchmarks/larger_than_memory.py``; runnable alone:

    python benchmarks/ltm_checkpoint.py --out runs/ltm/c2048-shapes --target-gb 33

The model has switch-c-2048's expert shapes (``wi`` 6144x2080, ``wo`` 2080x6144, 2048 experts per sparse
block, every block sparse, d_model 2080, 32 heads of 64) and as many blocks as the target size needs. A pool
of ``--pool`` distinct experts is encoded from random ternary codes with the format's real statistics
(``--zeros`` 0.9: 90% zeros, +-1 equally likely otherwise, fp16 per-row levels); every expert of the
checkpoint is one of them (expert ``i`` of the whole model is pool entry ``i % pool``), so writing costs
the disk's write speed, not encoding time. The non-expert weights (embeddings, attention, routers, norms)
are random float32.

Each expert shard is streamed to disk by ``write_encoded_shard``: the safetensors header (with the qmoe header
and every matrix's crc32, docs/format.md) and then the blobs, never the whole shard in memory. Resumable: a
shard is written under a temporary name and renamed, finished shards are kept, ``config.json`` comes last.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np

D_MODEL, D_FF, EXPERTS = 2080, 6144, 2048  # google/switch-c-2048


def encoded_pool(n: int, zeros: float, d_model: int = D_MODEL, d_ff: int = D_FF,
                 seed: int = 0) -> dict[str, list[Any]]:
    """``n`` encoded ``wi`` [d_ff, d_model] and ``wo`` [d_model, d_ff] matrices from random ternary codes."""
    from qmoe.codec import encode_ternary

    rng = np.random.default_rng(seed)
    pool: dict[str, list[Any]] = {"wi": [], "wo": []}
    for proj, (rows, cols) in (("wi", (d_ff, d_model)), ("wo", (d_model, d_ff))):
        for _ in range(n):
            u = rng.random((rows, cols), dtype=np.float32)
            codes = np.zeros((rows, cols), dtype=np.int8)  # [rows, cols] in {-1, 0, 1}
            codes[u < (1 - zeros) / 2] = -1
            codes[u > 1 - (1 - zeros) / 2] = 1
            scale = (0.02 * (1 + 0.1 * rng.standard_normal(rows))).astype(np.float16)  # [rows]
            pool[proj].append(encode_ternary(codes, -scale, scale))
    return pool


def write_encoded_shard(path: Path, matrices: list[tuple[str, np.ndarray, str, str]]) -> int:
    """Stream a qmoe shard (format version 4) of encoded matrices ``(name, padded blob as uint8, kind, crc32
    hex)``: the shard ``qmoe.codec.save_shard`` writes for them, up to the order of the blobs. Returns its
    bytes. Atomic: temporary name, then rename."""
    from qmoe.codec.container import HEADER_KEY, PACKED, SHARD_FORMAT, pack_index

    assert all(blob.size % 8 == 0 for _, blob, _, _ in matrices), "blobs are padded to whole 8-byte words"
    index = pack_index([m[0] for m in matrices], [m[2] for m in matrices], [m[1].size // 8 for m in matrices],
                       [int(m[3], 16) for m in matrices])
    qheader = {"format": SHARD_FORMAT, "format_version": 4, "checksums": {}, "matrices": index}
    at = sum(blob.size for _, blob, _, _ in matrices)
    header: dict[str, Any] = {
        "__metadata__": {HEADER_KEY: json.dumps(qheader, sort_keys=True, separators=(",", ":"))},
        PACKED: {"dtype": "U64", "shape": [at // 8], "data_offsets": [0, at]},
    }
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors aligns the data to 8 bytes
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for _, blob, _, _ in matrices:
            f.write(memoryview(blob))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return 8 + len(raw) + at


def switch_cfg(enc_layers: int, dec_layers: int, vocab: int, experts: int, d_model: int, d_ff: int) -> Any:
    from synthetic_switch import switch_config

    cfg = switch_config(enc_layers, experts, d_model, d_ff, vocab, "fp32")
    cfg.num_decoder_layers = cfg.num_sparse_decoder_layers = dec_layers
    return cfg


def write_checkpoint(out: Path, target_bytes: int, pool_size: int = 8, zeros: float = 0.9, vocab: int = 8192,
                     experts: int = EXPERTS, d_model: int = D_MODEL, d_ff: int = D_FF,
                     log: bool = True) -> dict[str, Any]:
    """Write the checkpoint (resumable); returns ``{"checkpoint_bytes", "encoder_layers", ...}``. The
    defaults are switch-c-2048's expert shapes; the tests write small ones."""
    import torch
    from synthetic_switch import _shapes, tokenizer

    from qmoe.codec import save_shard
    from qmoe.codec.container import padded_blob

    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    pool = encoded_pool(pool_size, zeros, d_model, d_ff)
    blobs = {p: [(padded_blob(m).view(np.uint8), m.kind) for m in mats] for p, mats in pool.items()}
    blobs = {p: [(b, k, f"{zlib.crc32(b):08x}") for b, k in v] for p, v in blobs.items()}
    per_expert = float(np.mean([sum(len(blobs[p][i][0]) for p in blobs) for i in range(pool_size)]))
    bpw = 8 * per_expert / (2 * d_model * d_ff)
    n_layers = max(2, -(-target_bytes // int(per_expert * experts)))
    enc_layers, dec_layers = -(-n_layers // 2), n_layers // 2
    if log:
        print(f"pool of {pool_size} experts encoded in {time.perf_counter() - t0:.0f} s: {bpw:.3f} "
              f"bits/weight, {per_expert / 1e6:.2f} MB per expert; {enc_layers} encoder + {dec_layers} "
              f"decoder sparse blocks of {experts} experts", flush=True)
    cfg = switch_cfg(enc_layers, dec_layers, vocab, experts, d_model, d_ff)
    shapes = _shapes(cfg)
    stacks = [("encoder", enc_layers, "layer.1.mlp"), ("decoder", dec_layers, "layer.2.mlp")]
    layers = [f"{s}.block.{i}.{mlp}" for s, n, mlp in stacks for i in range(n)]
    n_shards = 1 + len(layers)
    name = lambda k: f"model-{k + 1:05d}-of-{n_shards:05d}.safetensors"  # noqa: E731
    weight_map: dict[str, str] = {}
    dense = {k: v for k, v in shapes.items() if ".experts.expert_" not in k}
    weight_map.update({k: name(0) for k in dense})
    if not (out / name(0)).is_file():
        gen = torch.Generator().manual_seed(0)
        tensors = {k: torch.ones(s) if k.endswith("layer_norm.weight")
                   else torch.randn(s, generator=gen) * s[-1] ** -0.5 for k, s in dense.items()}
        save_shard(out / name(0), tensors, {})
        del tensors
    i = 0
    for k, layer in enumerate(layers, start=1):
        mats = []
        for e in range(experts):
            for p in ("wi", "wo"):
                blob, kind, crc = blobs[p][i % pool_size]
                mats.append((f"{layer}.experts.expert_{e}.{p}.weight", blob, kind, crc))
            i += 1
        weight_map.update({m[0]: name(k) for m in mats})
        if not (out / name(k)).is_file():
            write_encoded_shard(out / name(k), mats)
            if log:
                print(f"  {name(k)}: {layer}, {(out / name(k)).stat().st_size / 1e9:.2f} GB, "
                      f"{time.perf_counter() - t0:.0f} s", flush=True)
    total = sum((out / name(k)).stat().st_size for k in range(n_shards))
    index = {"metadata": {"total_size": total, "format": "qmoe"},
             "qmoe_encoded": sorted(k for k in weight_map if ".experts.expert_" in k),
             "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=1) + "\n")
    tok = tokenizer(out.parent / f"tokenizer-{vocab}", vocab)
    for f in tok.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    from qmoe.codec import FORMAT_VERSION

    cfg_dict = cfg.to_dict()
    cfg_dict["quantization_config"] = {"quant_method": "qmoe", "format_version": FORMAT_VERSION,
                                       "bits": "ternary", "grid": "ternary", "method": "synthetic",
                                       "synthetic": {"pool": pool_size, "zeros": zeros}}
    tmp = out / "config.json.tmp"
    tmp.write_text(json.dumps(cfg_dict, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, out / "config.json")  # last: marks a complete checkpoint
    return {"checkpoint_bytes": total, "encoder_layers": enc_layers, "decoder_layers": dec_layers,
            "experts_per_layer": experts, "expert_shape": [d_ff, d_model], "pool": pool_size, "zeros": zeros,
            "bits_per_weight": bpw, "write_seconds": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--target-gb", type=float, required=True, help="at least this many GB (10^9 bytes)")
    ap.add_argument("--pool", type=int, default=8, help="distinct encoded experts (default %(default)s)")
    ap.add_argument("--zeros", type=float, default=0.9, help="fraction of zero codes (default %(default)s)")
    args = ap.parse_args()
    info = write_checkpoint(Path(args.out), int(args.target_gb * 1e9), args.pool, args.zeros)
    print(json.dumps(info))


if __name__ == "__main__":
    main()
