"""Check the checker: break ``odissey/wire/scanner.py`` in small ways and see the fuzzer notice.

Each mutant is a copy of the module's source with one edit, loaded under another name (the
real module is untouched); the fuzz cases of one seed then run against it until the first
:class:`~fuzz.targets.PropertyFailure`. A mutant that survives the whole budget is either
equivalent to the original (say so below) or a hole in the fuzzer.

    python fuzz/mutants.py --cases 200000
"""

from __future__ import annotations

import argparse
import sys
import types
from pathlib import Path
from typing import List, Optional, Tuple

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import fuzz.targets as targets  # noqa: E402
import odissey.wire.scanner as real  # noqa: E402
from fuzz.run import make_case  # noqa: E402
from fuzz.targets import PropertyFailure, ScanCase  # noqa: E402

# (original text, replacement, why a miss is fine or "" when it must be caught)
MUTANTS: List[Tuple[str, str, str]] = [
    ("if length < 4 or length > max_length", "if length < 4 or length >= max_length", ""),
    ("if length < 4 or length > max_length", "if length < 5 or length > max_length", ""),
    ("                    pos - shift,\n", "                    pos,\n", ""),
    ("events.append((kind, None, end - shift))", "events.append((kind, None, end))", ""),
    ("if self._skip >= n:", "if self._skip > n:",
     "equivalent: skip == n ends the chunk either way"),
    ("if need > n:", "if need >= n:", ""),
    ("if n - pos < 5:", "if n - pos < 4:", ""),
    ("return self._head[0], -1", "return self._head[0], 0", ""),
    ("self._body_need = end - n", "self._body_need = end - n + 1", ""),
    ("bytes(self._body), need))", "bytes(self._body), need + 1))", ""),
    ("events.append((kind, data[pos + 5 : end], end - shift))",
     "events.append((kind, data[pos + 5 : end], end))", ""),
    ("if length < 8 or length > MAX_STARTUP_PACKET",
     "if length < 8 or length >= MAX_STARTUP_PACKET", ""),
    ("if len(body) != 12:", "if len(body) < 12:", ""),
    ("pid, secret = _2I32(body, 4)", "pid, secret = struct.unpack_from('!II', body, 4)", ""),
    ("if not key:", "if False:", ""),
    ("self.rest = buf[length:]", "self.rest = buf[length:] if len(buf) > length else b''",
     "equivalent: the slice is empty then anyway"),
    ("    if major != 3:", "    if major > 3:", ""),
    ("if pairs and not pairs.endswith", "if False and not pairs.endswith", ""),
    ("except UnicodeDecodeError:", "except ValueError:", "equivalent: decode raises only that"),
    ("self.watch = watch | collect", "self.watch = watch",
     "equivalent: collected types are tested before watched ones"),
]

PACKET_CLASSES = ("StartupMessage", "SSLRequest", "GSSENCRequest", "CancelRequest")


def load_mutant(source: str, old: str, new: str) -> types.ModuleType:
    if old not in source:
        raise SystemExit(f"scanner.py changed: {old!r} is gone; update fuzz/mutants.py")
    module = types.ModuleType("scanner_mutant")
    sys.modules[module.__name__] = module  # dataclasses look their module up
    exec(compile(source.replace(old, new, 1), "scanner_mutant", "exec"), module.__dict__)
    for name in PACKET_CLASSES:  # compare equal to the reference's packets
        setattr(module, name, getattr(real, name))
    return module


def first_failure(module: types.ModuleType, seed: int, cases: int) -> Optional[int]:
    """Index of the first case the mutant fails, or None."""
    real_reader = targets.StartupReader
    targets.StartupReader = module.StartupReader  # type: ignore[misc]
    try:
        for index in range(cases):
            case = make_case(seed, index)
            try:
                if isinstance(case, ScanCase):
                    targets.check_scan(case, module.Scanner)
                else:
                    targets.check_startup(case)
            except PropertyFailure:
                return index
        return None
    finally:
        targets.StartupReader = real_reader  # type: ignore[misc]


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--cases", type=int, default=200_000, help="budget per mutant")
    args = parser.parse_args(argv)
    source = Path(real.__file__).read_text()
    holes = 0
    for old, new, excuse in MUTANTS:
        found = first_failure(load_mutant(source, old, new), args.seed, args.cases)
        if found is not None:
            verdict = f"caught at case {found}"
        elif excuse:
            verdict = f"survived ({excuse})"
        else:
            verdict = "SURVIVED: a hole in the fuzzer"
            holes += 1
        print(f"{new.strip()[:60]:<62} {verdict}", flush=True)
    return 1 if holes else 0


if __name__ == "__main__":
    sys.exit(main())
