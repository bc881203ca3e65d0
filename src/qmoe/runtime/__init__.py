"""Running compressed models: loading a compressed checkpoint into transformers with the experts encoded.

- ``load``: ``qmoe.load(DIR)`` = ``qmoe.runtime.load.load``, a transformers model whose MoE experts are
  ``CompressedExperts``;
- ``experts``: the compressed-experts module;
- ``hf_quantizer``: qmoe as a transformers quantization method, so ``AutoModelFor*.from_pretrained(DIR)``
  returns the same model; ``hook`` registers it when transformers loads, without importing transformers.

Importing this package is light. The registration with transformers happens in ``import qmoe`` (which any
import of this package runs first); see docs/runtime.md.
"""
