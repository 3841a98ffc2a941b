"""PyPy's JIT thresholds, set at start; nothing under CPython."""

from __future__ import annotations

import sys
import types

from twisted.trial.unittest import SynchronousTestCase

from odissey import jit


class JitTests(SynchronousTestCase):
    def test_parameters_set_on_pypy(self) -> None:
        """Where pypyjit exists (PyPy), compile_sooner sets the thresholds on it."""
        calls: list[str] = []
        fake = types.ModuleType("pypyjit")
        fake.set_param = calls.append  # type: ignore[attr-defined]
        self.patch(sys, "modules", {**sys.modules, "pypyjit": fake})
        jit.compile_sooner()
        self.assertEqual(calls, ["threshold=200,function_threshold=300,trace_eagerness=50"])

    def test_nothing_without_pypyjit(self) -> None:
        """Without pypyjit (CPython), compile_sooner does nothing and raises nothing."""
        self.patch(sys, "modules", {**sys.modules, "pypyjit": None})  # (import fails)
        jit.compile_sooner()
