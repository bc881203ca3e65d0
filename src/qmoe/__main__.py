"""``python -m qmoe ...``: the same as the ``qmoe`` command (also what ``torchrun -m qmoe`` runs).

A torchrun rank leaves without the interpreter's teardown (``os._exit`` after flushing its output): gloo's
static destructors can run while its threads are still alive, above all in a rank whose peer failed
mid-collective, and then ``std::terminate`` aborts the process ("terminate called without an active
exception", SIGABRT) after it has already finished its work or printed its one-line error. Everything a
run writes is on disk by then (files are renamed into place), and the process group was ended
(``Dist.close``)."""

import os
import sys

from qmoe.cli import main

status = main()
if int(os.environ.get("WORLD_SIZE", "1")) > 1:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
sys.exit(status)
