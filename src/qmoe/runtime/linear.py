"""``CompressedLinear``: one ``nn.Linear`` kept encoded, for the shared experts that ``qmoe compress
--shared-experts ternary|2`` quantizes (the MLP every token uses next to the routed experts).

It takes the Linear's place inside the unchanged transformers module, so the shared MLP's own code (its
activation, Qwen2-MoE's sigmoid gate) runs as the family defines it; only ``x @ W^T`` goes through
``qmoe.kernels``, which decodes inside the matmul.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from qmoe.codec import EncodedMatrix


class CompressedLinear(nn.Module):
    """``y = x @ W^T`` for ``x [..., in]`` and an encoded ``W [out, in]``; no bias (shared MLPs have none)."""

    def __init__(self, enc: EncodedMatrix) -> None:
        super().__init__()
        self.enc = enc
        self.out_features, self.in_features = (int(v) for v in enc.shape)
        self.backend: str | None = None  # kernel backend; None: triton for CUDA inputs, cpu otherwise

    def forward(self, x: Tensor) -> Tensor:
        from qmoe.kernels import matmul

        flat = x.reshape(-1, self.in_features).float()  # [T, in]: the kernels compute in float32
        y = matmul(self.enc, flat, self.backend)  # [T, out]
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        n = self.enc.nbytes
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, encoded={n / 2**10:.1f} KiB "
            f"({8 * n / (self.in_features * self.out_features):.3f} bits/weight)"
        )

    @classmethod
    def replacing(cls, parent: Any, name: str, enc: EncodedMatrix) -> CompressedLinear:
        """Put a CompressedLinear for ``enc`` in place of the Linear ``parent.name`` (shapes checked)."""
        from qmoe.errors import FormatError

        old = getattr(parent, name, None)
        if not isinstance(old, nn.Linear) or (old.out_features, old.in_features) != tuple(enc.shape):
            raise FormatError(
                f"encoded matrix for {name!r} has shape {tuple(enc.shape)}, which does not "
                "replace a Linear layer of that shape; the checkpoint does not match config.json"
            )
        module = cls(enc)
        module._is_hf_initialized = True
        setattr(parent, name, module)
        return module
