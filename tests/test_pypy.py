"""What Odissey asks of PyPy (JIT thresholds set at start, the nursery advised); nothing under CPython."""

from __future__ import annotations

import sys
import types

from twisted.trial.unittest import SynchronousTestCase

from odissey import pypy


class JitTests(SynchronousTestCase):
    def test_parameters_set_on_pypy(self) -> None:
        """Where pypyjit exists (PyPy), compile_sooner sets the thresholds on it."""
        calls: list[str] = []
        fake = types.ModuleType("pypyjit")
        fake.set_param = calls.append  # type: ignore[attr-defined]
        self.patch(sys, "modules", {**sys.modules, "pypyjit": fake})
        pypy.compile_sooner()
        self.assertEqual(calls, ["threshold=200,function_threshold=300,trace_eagerness=50,trace_limit=12000"])

    def test_nothing_without_pypyjit(self) -> None:
        """Without pypyjit (CPython), compile_sooner does nothing and raises nothing."""
        self.patch(sys, "modules", {**sys.modules, "pypyjit": None})  # (import fails)
        pypy.compile_sooner()


class NurseryTests(SynchronousTestCase):
    def test_advice_under_pypy_without_the_variable(self) -> None:
        """PyPy without PYPY_GC_NURSERY (or with it empty) is told the variable and the size."""
        for environ in ({}, {"PYPY_GC_NURSERY": ""}):
            advice = pypy.nursery_advice(environ, "pypy")
            assert advice is not None
            self.assertIn("PYPY_GC_NURSERY=16M", advice)

    def test_no_advice_with_the_variable_or_under_cpython(self) -> None:
        """Any size the operator chose is theirs; CPython has no nursery to size."""
        self.assertIsNone(pypy.nursery_advice({"PYPY_GC_NURSERY": "4M"}, "pypy"))
        self.assertIsNone(pypy.nursery_advice({}, "cpython"))
