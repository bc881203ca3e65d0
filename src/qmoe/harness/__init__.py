"""lm-evaluation-harness integration (``qmoe eval SOURCE --tasks ...``, ``pip install 'qmoe[lm-eval]'``).

``run``: load a qmoe source and score it with the harness (and a compressed model's dense reference);
``compare``: check two runs got identical requests and pair their per-item scores; ``bible_task``: an offline
multiple-choice task in the harness's YAML format, built from the project's corpus. Nothing here imports
``lm_eval`` at import time.
"""

from qmoe.harness.run import HarnessConfig, HarnessResult, run_harness

__all__ = ["HarnessConfig", "HarnessResult", "run_harness"]
