"""The benchmark pieces that are qmoe's own (benchmarks/peerlib): the peer comparison's exactness rests on
them, so they are tested here, on small data, without installing any peer tool (issue 12)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
