"""PyPy's JIT told to compile sooner: a pooler's paths run once per login, not in loops.

PyPy traces a loop after it has run ``threshold`` times (1039 by default), a function
entered ``function_threshold`` times (1619), and a bridge after a guard has failed
``trace_eagerness`` times (200). A transaction's path is a loop the reactor runs many
thousand times a second, compiled within seconds; a login's path is a long line of
one-off steps (accepting, the startup packet, the password, the greeting, the close),
each compiled only after it has run that many times: under ``pgbench -C`` (a login per
transaction) PyPy ran at a third of its steady speed for 10 s and reached it after
about 20. With the thresholds at 200, 300 and 50 it was there after 6 s, and its steady
CPU per login was no worse (docs/benchmarks.md, "The login path"). Nothing happens
under CPython.
"""

from __future__ import annotations

#: pypyjit.set_param's argument.
PARAMETERS = "threshold=200,function_threshold=300,trace_eagerness=50"


def compile_sooner() -> None:
    """Set :data:`PARAMETERS` on PyPy's JIT (at start, before the paths first run)."""
    try:
        import pypyjit
    except ImportError:  # CPython
        return
    pypyjit.set_param(PARAMETERS)
