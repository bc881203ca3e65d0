"""HQQ worker, run with the Python of HQQ's environment: ``python hqq.py job.json``.

Quantizes every expert matrix with HQQ's ``Quantizer`` (half-quadratic zero/scale optimisation, groups along
the input dimension, bit-packed codes) and dequantizes it back. Stored bytes: the packed codes plus one
16-bit scale and one 16-bit zero per group, as HQQ keeps them for fp16 models; the read-back uses those
16-bit values."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from peerlib.experts import expert_keys, run_variants, write_variant  # noqa: E402


def main() -> None:
    import torch
    from hqq.core.quantize import Quantizer
    from safetensors.torch import load_file

    job = json.loads(Path(sys.argv[1]).read_text())
    sd: dict = {}
    for f in sorted(Path(job["model"]).glob("*.safetensors")):
        sd.update(load_file(str(f)))
    keys = expert_keys(sd)

    def one(v: dict, out: Path) -> None:
        weights, nbytes, n = {}, 0, 0
        for k in keys:
            w = sd[k].float()
            wq, meta = Quantizer.quantize(
                w,
                nbits=v["nbits"],
                group_size=v["group"],
                optimize=True,
                axis=1,
                bitpack=True,
                compute_dtype=torch.float32,
                device="cpu",
            )
            for m in ("scale", "zero"):
                meta[m] = meta[m].to(torch.float16).float()  # stored 16-bit
            weights[k] = Quantizer.dequantize(wq, meta).reshape(w.shape).numpy()
            nbytes += wq.numel() * wq.element_size() + 2 * (meta["scale"].numel() + meta["zero"].numel())
            n += w.numel()
        write_variant(
            out,
            weights,
            {"expert_bytes": nbytes, "expert_weights": n, "nbits": v["nbits"], "group_size": v["group"]},
        )

    run_variants(job["variants"], one)


if __name__ == "__main__":
    main()
