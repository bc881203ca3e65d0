"""GPTQ worker through llm-compressor, run with the Python of its environment: ``python ... job.json``.

llm-compressor's ``oneshot`` with a ``GPTQModifier`` over the expert Linears only (attention, router and
head stay as they are), integer weights with a per-group scale and zero point (asymmetric: at 2-3 bits the
zero point is worth its bytes), llm-compressor's defaults otherwise (dampening, block size, and its MoE
calibration that sends every token through every expert). Calibration: the token windows of the job (the
same windows qmoe calibrates on). The model is saved in compressed-tensors' packed format; the bytes are
those of the saved expert tensors; the weights read back are GPTQ's quantized values (checked to lie on
the saved grid) with their scales rounded to fp16.

A group size that does not divide the rows (128 on tiny-qwen3-moe's 192) is refused by llm-compressor; such
variants run on the 256-padded copy of the model (as llama.cpp does, ``peerlib/pad.py``), are charged per
padded weight, and read back the real corner."""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from peerlib.experts import EXPERT_KEY, run_variants, write_variant  # noqa: E402
from peerlib.pad import crop  # noqa: E402


def saved_expert_bytes(out: Path) -> tuple[int, dict[str, int], int]:
    """Bytes of every saved tensor that belongs to an expert projection (data plus its header entry), the
    same per tensor kind, and the data bytes of the scales."""
    total, parts, scale_data = 0, {}, 0
    for f in sorted(out.glob("*.safetensors")):
        raw = f.read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8 : 8 + n])
        for name, entry in header.items():
            if name == "__metadata__" or ".mlp.experts." not in name:
                continue
            data = entry["data_offsets"][1] - entry["data_offsets"][0]
            b = data + len(json.dumps({name: entry}))
            if name.endswith("weight_scale"):
                assert entry["dtype"] == "F32", f"{name} is {entry['dtype']}; expected float32 scales"
                scale_data += data
            total += b
            suffix = name.rsplit(".", 1)[-1]
            parts[suffix] = parts.get(suffix, 0) + b
    return total, parts, scale_data


def main() -> None:
    import torch

    job = json.loads(Path(sys.argv[1]).read_text())
    torch.manual_seed(0)
    run_variants(job["variants"], lambda v, out: one(job, v, out))


def one(job: dict, v: dict, out: Path) -> None:
    """GPTQ of one variant into ``out`` (experts.safetensors + info.json)."""
    import numpy as np
    import torch
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from transformers import AutoModelForCausalLM

    ids = np.load(job["calib"][v["seed"]])  # [N, L] token windows
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": np.ones_like(ids).tolist()})
    # float32: fp16 matmuls on this CPU made a run 4x slower; scales are rounded to fp16 below, as an fp16
    # checkpoint stores them, and charged 16 bits
    model = AutoModelForCausalLM.from_pretrained(v.get("model", job["model"]), dtype=torch.float32)
    args = QuantizationArgs(
        num_bits=v["bits"], type="int", symmetric=False, strategy="group", group_size=v["group"]
    )
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    recipe = GPTQModifier(
        config_groups={"experts": scheme}, ignore=["lm_head", "re:.*self_attn.*", "re:.*mlp\\.gate$"]
    )
    oneshot(
        model=model,
        dataset=ds,
        recipe=recipe,
        max_seq_length=ids.shape[1],
        num_calibration_samples=len(ids),
    )
    weights, names, stored = {}, [], 0
    for name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Linear) or not hasattr(mod, "weight_scale"):
            continue
        key = f"{name}.weight"
        if not EXPERT_KEY.fullmatch(key):
            raise RuntimeError(f"quantized module {name} is not an expert projection")
        w = mod.weight.detach()
        # GPTQ leaves its quantized values in .weight: re-quantizing on the saved grid must not move them
        requant = fake_quantize(w, mod.weight_scale, mod.weight_zero_point, args)
        err = (requant.float() - w.float()).abs().max().item()
        if err > 1e-3 * w.float().abs().max().item():
            raise RuntimeError(
                f"{name}: weights are {err:.3g} off their saved grid; the read-back would be wrong"
            )
        s16 = mod.weight_scale.detach().half().float()
        weights[key] = fake_quantize(w, s16, mod.weight_zero_point, args).float().numpy().copy()
        stored += w.numel()
        if "real" in v:  # a padded model (group size that does not divide the real rows): the real corner
            r = v["real"]
            rows, cols = (
                (r["hidden"], r["intermediate"]) if "down_proj" in key else (r["intermediate"], r["hidden"])
            )
            weights[key] = crop(weights[key], rows, cols)
        names.append(name)
    saved = out / "compressed"
    model.save_pretrained(saved, save_compressed=True)
    nbytes, parts, scale_data = saved_expert_bytes(saved)
    nbytes -= scale_data // 2  # float32 scales as saved here -> 16-bit in an fp16 checkpoint
    n = stored  # weights as stored (padded ones included)
    if not weights or n == 0:
        raise RuntimeError("llm-compressor quantized no expert weights")
    cfg = json.loads((saved / "config.json").read_text()).get("quantization_config", {})
    write_variant(
        out,
        weights,
        {
            "expert_bytes": nbytes,
            "expert_weights": n,
            "bytes_by_part": parts,
            "bits": v["bits"],
            "group_size": v["group"],
            "modules": len(names),
            "format": cfg.get("format"),
            "seed": v["seed"],
            "padded": "real" in v,
        },
    )
    for f in saved.glob("*.safetensors"):  # keep the accounting, not a second copy of the weights
        f.unlink()
    del model


if __name__ == "__main__":
    main()
