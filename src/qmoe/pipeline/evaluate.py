"""The run's own evaluation: the loss of the reference and the compressed stream on the same samples."""

from __future__ import annotations

from typing import Any

import torch

from qmoe.pipeline.buffers import to_device
from qmoe.pipeline.context import RunContext
from qmoe.pipeline.streams import Streams


def evaluate(ctx: RunContext, streams: Streams) -> list[dict[str, Any]]:
    """Per evaluation set: mean loss per target token of the reference and the compressed stream after
    the last block, and the summed nats per sample (paired differences need them)."""
    if not ctx.config.eval:
        return []
    p, device = ctx.plan, ctx.device
    last = p.stacks[-1]
    head = {
        k: p.reader.get(key).float().to(device)
        for k, key in p.adapter.head_keys(p.hf_config.to_dict()).items()
    }
    norm = streams.norm_weights[last.name].to(device)  # [d]
    results = []
    for name in ctx.config.eval_data:
        labels = torch.from_numpy(ctx.samples[name]["labels"])  # [N, S]
        sums: dict[str, list[float]] = {}
        tokens: list[int] = []
        for kind in ("ref", "q"):
            buf = streams.buffers[f"{last.name}/{kind}:{name}"]
            sums[kind] = []
            for i0, i1 in buf.batches(ctx.config.batch_size):
                h = p.adapter.final_norm(p.hf_config, norm, to_device(buf.data[i0:i1], device))
                lab = labels[i0:i1].to(device)
                for j in range(i1 - i0):  # per sample, for intervals paired over samples
                    s, c = p.adapter.loss(p.hf_config, head, h[j : j + 1], lab[j : j + 1])
                    sums[kind].append(s)
                    if kind == "ref":
                        tokens.append(c)
        count = sum(tokens)
        results.append(
            {
                "split": name,
                "samples": int(labels.shape[0]),
                "tokens": count,
                "loss_reference": sum(sums["ref"]) / count,
                "loss_compressed": sum(sums["q"]) / count,
                "sample_tokens": tokens,
                "sample_loss_reference": sums["ref"],
                "sample_loss_compressed": sums["q"],
            }
        )
    return results
