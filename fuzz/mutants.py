"""Check the checker: break ``odissey/wire/scanner.py`` or ``odissey/transaction.py`` in
small ways and see the fuzzer notice.

Each mutant is a copy of the module's source with one edit, loaded under another name (the
real module is untouched); the fuzz cases of one seed then run against it until the first
:class:`~fuzz.targets.PropertyFailure`. A mutant that survives the whole budget is either
equivalent to the original (say so below) or a hole in the fuzzer. The tracker's mutants
meet ``tracker-wild`` cases, less those the real tracker fails too.

    python fuzz/mutants.py --cases 200000
    python fuzz/mutants.py --target tracker --cases 50000
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
import odissey.transaction as real_tracker  # noqa: E402
import odissey.wire.scanner as real  # noqa: E402
from fuzz.run import make_case, make_tracker_case  # noqa: E402
from fuzz.targets import PropertyFailure, ScanCase  # noqa: E402
from fuzz.tracker_model import check_tracker  # noqa: E402

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
    ("if length < 8 or length - 4 > MAX_STARTUP_PACKET",
     "if length < 8 or length - 4 >= MAX_STARTUP_PACKET", ""),
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

TRACKER_MUTANTS: List[Tuple[str, str, str]] = [
    ("return ready and self.idle", "return ready", ""),
    ("if not pending:\n                        self.mode = SKIPPING",
     "if False:\n                        self.mode = SKIPPING", ""),
    ("if mode == SKIPPING:\n                        self.mode = NORMAL",
     "if True:\n                        self.mode = NORMAL", ""),
    ("pending.append(kind)\n                    unsynced = True",
     "pending.append(kind)\n                    unsynced = False", ""),
    ("elif mode == NORMAL and pending:  # the COPY", "elif False:  # the COPY", ""),
    ("self.mode = NORMAL\n                    self.in_data = False", "pass", ""),
    ("self.mode = NORMAL\n                    self.in_data = False",
     "self.mode = NORMAL", "caught only by a client that reacts to the error: "
     "tests/test_transaction.py test_statement_after_a_failed_copy_without_copy_done"),
    ("while pending and pending[0] == _COPY_END:", "while False:", ""),
    ("and not self.unsynced and self.partial == 0)", "and self.partial == 0)", ""),
    ("self.mode = NORMAL if ended else COPYING", "self.mode = COPYING", ""),
    ("while pending and pending[0] != Q and pending[0] != EXECUTE:",
     "while pending and pending[0] != Q:", ""),
    ("DESCRIBE: frozenset((ROW_DESCRIPTION, NO_DATA)),", "DESCRIBE: frozenset((ROW_DESCRIPTION,)),",
     ""),
    ("COMMAND_COMPLETE, EMPTY_QUERY, PORTAL_SUSPENDED)", "COMMAND_COMPLETE, EMPTY_QUERY)", ""),
    ("_ANSWERED_BY_Z = frozenset((Q, F, SYNC))", "_ANSWERED_BY_Z = frozenset((Q, SYNC))", ""),
    ("elif mode == COPYING:\n                    self.mode = NORMAL  # the copy consumes",
     "elif False:\n                    self.mode = NORMAL  # the copy consumes", ""),
    ("elif kind == SYNC:\n                    if mode == SKIPPING:",
     "elif kind == SYNC or kind == Q:\n                    if mode == SKIPPING:", ""),
    ("elif edge < 0:", "elif edge < -1:", ""),
    ("COPY_FAIL, FLUSH, TERMINATE))", "COPY_FAIL, TERMINATE))", ""),
    ("pending.append(_COPY_END)", "pass", ""),
    ("if pending.popleft() != SYNC:", "if pending.popleft() not in (SYNC, Q):", ""),
    ("self.status = body", "self.status = b'I'", ""),
    ("if mode == COPYING or (mode == NORMAL and pending):", "if mode == COPYING:", ""),
    ("self.in_data = False\n                if mode", "if mode", ""),
]

PACKET_CLASSES = ("StartupMessage", "SSLRequest", "GSSENCRequest", "CancelRequest")


def load(source: str, old: str, new: str, name: str) -> types.ModuleType:
    """``name``.py's source with one edit, as a module of its own."""
    if old not in source:
        raise SystemExit(f"{name}.py changed: {old!r} is gone; update fuzz/mutants.py")
    module = types.ModuleType(f"{name}_mutant")
    sys.modules[module.__name__] = module  # dataclasses look their module up
    exec(compile(source.replace(old, new, 1), module.__name__, "exec"), module.__dict__)
    return module


def load_mutant(source: str, old: str, new: str) -> types.ModuleType:
    module = load(source, old, new, "scanner")
    for name in PACKET_CLASSES:  # compare equal to the reference's packets
        setattr(module, name, getattr(real, name))
    return module


def load_tracker_mutant(source: str, old: str, new: str) -> types.ModuleType:
    return load(source, old, new, "transaction")


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


def first_tracker_failure(module: types.ModuleType, seed: int, cases: int) -> Optional[int]:
    """Index of the first ``tracker-wild`` case the mutant fails and the real tracker passes."""
    for index in range(cases):
        case = make_tracker_case(seed, index, wild=True)
        try:
            check_tracker(case, module.Transaction)
        except PropertyFailure:
            try:
                check_tracker(case)
            except PropertyFailure:
                continue  # the real tracker fails it too: it says nothing of the mutant
            return index
    return None


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", choices=("wire", "tracker"), default="wire")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--cases", type=int, default=200_000, help="budget per mutant")
    args = parser.parse_args(argv)
    if args.target == "tracker":
        source = Path(real_tracker.__file__).read_text()
        mutants, load, first = TRACKER_MUTANTS, load_tracker_mutant, first_tracker_failure
    else:
        source = Path(real.__file__).read_text()
        mutants, load, first = MUTANTS, load_mutant, first_failure
    holes = 0
    for old, new, excuse in mutants:
        found = first(load(source, old, new), args.seed, args.cases)
        if found is not None:
            verdict = f"caught at case {found}"
        elif excuse:
            verdict = f"survived ({excuse})"
        else:
            verdict = "SURVIVED: a hole in the fuzzer"
            holes += 1
        print(f"{' '.join(new.split())[:60]:<62} {verdict}", flush=True)
    return 1 if holes else 0


if __name__ == "__main__":
    sys.exit(main())
