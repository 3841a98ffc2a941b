"""What Odissey asks of PyPy: a JIT that compiles sooner, and a larger GC nursery.

The JIT. PyPy traces a loop after it has run ``threshold`` times (1039 by default), a
function entered ``function_threshold`` times (1619), and a bridge after a guard has failed
``trace_eagerness`` times (200). A transaction's path is a loop the reactor runs many
thousand times a second, compiled within seconds; a login's path is a long line of
one-off steps (accepting, the startup packet, the password, the greeting, the close),
each compiled only after it has run that many times: under ``pgbench -C`` (a login per
transaction) PyPy ran at a third of its steady speed for 10 s and reached it after
about 20. With the thresholds at 200, 300 and 50 it was there after 6 s, and its steady
CPU per login was lower too (-4.9 % against PyPy's thresholds; docs/benchmarks.md, "The
login path" and "A login's own work"). A trace may also run to 12,000 operations, twice
PyPy's limit, before it is given up: a login's generator (``ClientConnection._login``)
ran past 6,000, and was then compiled in pieces, at about 5 % more CPU per login.

The nursery. PyPy allocates in a nursery sized from the L2 cache (1 MiB on a 2 MiB L2)
and empties it with a minor collection, whose cost grows with the old objects written
to since the last one: with hundreds of connections each transaction touches a
different relay, so a small nursery pays for the same objects again and again. With
16 MiB, 200 clients in transaction mode cost 2-18 % less CPU per transaction (-8.5 % the
median of six A/B figures), 8 and 32 clients no more (docs/benchmarks.md, "PyPy's
nursery"). PyPy reads the size only from its environment at start
(``PYPY_GC_NURSERY``), so Odissey cannot set it itself: it says so in its log when it
runs without it, and the systemd unit in docs/operations.md sets it.

Nothing here does anything under CPython.
"""

from __future__ import annotations

import os
import sys
from typing import Mapping, Optional

#: pypyjit.set_param's argument.
PARAMETERS = "threshold=200,function_threshold=300,trace_eagerness=50,trace_limit=12000"

#: The nursery to run with: ``PYPY_GC_NURSERY=16M`` in PyPy's environment.
NURSERY = "16M"
NURSERY_VARIABLE = "PYPY_GC_NURSERY"


def compile_sooner() -> None:
    """Set :data:`PARAMETERS` on PyPy's JIT (at start, before the paths first run)."""
    try:
        import pypyjit
    except ImportError:  # CPython
        return
    pypyjit.set_param(PARAMETERS)


def nursery_advice(environ: Mapping[str, str] = os.environ,
                   implementation: str = sys.implementation.name) -> Optional[str]:
    """The log line for PyPy running without :data:`NURSERY_VARIABLE`; None otherwise."""
    if implementation != "pypy" or environ.get(NURSERY_VARIABLE):
        return None
    return (f"{NURSERY_VARIABLE} is not set: with hundreds of clients, {NURSERY_VARIABLE}={NURSERY} in "
            "Odissey's environment saves PyPy 2-18 % of its CPU per transaction "
            "(docs/operations.md, Running under PyPy)")
