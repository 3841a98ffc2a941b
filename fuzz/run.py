"""Long-running fuzzer for the wire codec: the message scanner and the startup reader.

Every case is generated from ``(seed, index)`` alone, so any failure is replayed with
``--seed S --case I`` whatever ``--jobs`` was. Generation is structure-aware: valid
streams built from real message and packet layouts, then mutated (bit flips, byte
changes, truncation, deleted/duplicated/inserted ranges, length fields set to edge values,
header type bytes changed), cut into chunks at random places or around headers; some
cases are plain random bytes. Each case runs through :mod:`fuzz.targets`, which compares
the real object with a simple reference.

    nice -n 10 python fuzz/run.py --count 10000000 --jobs 2
    python fuzz/run.py --seed 12345 --case 678      # replay one case, verbosely

It prints the seed first, progress with inputs per second, and each failure with its seed,
index and input (hex); the exit status is 1 when anything failed.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Dict, List, Optional, Set, Tuple

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fuzz.targets import (  # noqa: E402
    MAX_STARTUP_LENGTH,
    Case,
    PropertyFailure,
    ScanCase,
    StartupCase,
    check,
)
from odissey.wire import messages as m  # noqa: E402

# Frontend and backend message types, then a few that are neither.
KINDS = b"QPBEDCHSFfdcpXTRZKSAGWNnst123vI" + b"\0\x7f\xff"

# Startup parameter names and values worth meeting: real ones, protocol options, odd text.
PARAM_NAMES = [
    "user", "database", "application_name", "options", "client_encoding", "replication",
    "_pq_.compression", "_pq_.", "x", "\u00e9t\u00e9", "a" * 64,
]
PARAM_VALUES = ["", "alice", "db", "-c search_path=x", "\u2603", "t" * 200, "0"]

LENGTH_EDGES = [0, 1, 2, 3, 4, 5, 6, 7, 8, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 0x7FFFFFFE]
STARTUP_EDGES = [
    0, 1, 3, 4, 7, 8, 9, 12, 16, MAX_STARTUP_LENGTH - 1, MAX_STARTUP_LENGTH,
    MAX_STARTUP_LENGTH + 1, MAX_STARTUP_LENGTH + 4, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF,
]


def case_rng(seed: int, index: int) -> random.Random:
    """The generator of case ``index`` in the run of ``seed``."""
    return random.Random((seed << 40) | index)


# -- mutation ------------------------------------------------------------------------------


def mutate(rng: random.Random, data: bytes) -> bytes:
    """One random byte-level mutation."""
    n = len(data)
    choice = rng.randrange(8)
    if n == 0 or choice == 7:
        at = rng.randint(0, n)
        return data[:at] + rng.randbytes(rng.randint(1, 8)) + data[at:]
    at = rng.randrange(n)
    if choice == 0:
        return data[:at] + bytes([data[at] ^ (1 << rng.randrange(8))]) + data[at + 1 :]
    if choice == 1:
        byte = rng.choice((0, 0xFF, 0x7F, 0x80, rng.randrange(256)))
        return data[:at] + bytes([byte]) + data[at + 1 :]
    if choice == 2:
        return data[:at]
    if choice == 3:
        return data[at:]
    if choice == 4:
        return data[:at] + data[at + rng.randint(1, 16) :]
    if choice == 5:
        end = min(n, at + rng.randint(1, 32))
        return data[:end] + data[at:end] + data[end:]
    return data + rng.randbytes(rng.randint(1, 12))


def set_u32(data: bytes, at: int, value: int) -> bytes:
    return data[:at] + value.to_bytes(4, "big") + data[at + 4 :]


def cut_points(rng: random.Random, n: int, hot: List[int]) -> Tuple[int, ...]:
    """Where to cut a stream of ``n`` bytes; ``hot`` are header positions worth cutting near."""
    mode = rng.randrange(10)
    if mode < 2 or n == 0:
        cuts: List[int] = []
    elif mode == 2 and n <= 300:
        cuts = list(range(1, n))
    elif mode < 6 and hot:
        cuts = [
            min(n, max(0, rng.choice(hot) + rng.randint(-1, 6)))
            for _ in range(rng.randint(1, 6))
        ]
    else:
        cuts = [rng.randint(0, n) for _ in range(rng.randint(1, 8))]
    if cuts and rng.randrange(8) == 0:
        cuts.append(rng.choice(cuts))  # an empty chunk
    return tuple(sorted(cuts))


# -- scanner cases -------------------------------------------------------------------------


def body_size(rng: random.Random) -> int:
    r = rng.randrange(100)
    if r < 25:
        return 0
    if r < 60:
        return rng.randint(1, 8)
    if r < 92:
        return rng.randint(9, 64)
    return rng.randint(65, 3000)


def scan_case(rng: random.Random) -> ScanCase:
    if rng.randrange(12) == 0:
        data = rng.randbytes(rng.randint(0, 64))
        heads: List[int] = []
        lengths: List[int] = []
        kinds = set(data)
    else:
        parts = []
        heads, lengths = [], []
        kinds = set()
        pos = 0
        for _ in range(rng.choice((0, 1, 1, 2, 3, 4, 6, 9, 14))):
            kind = KINDS[rng.randrange(len(KINDS))] if rng.randrange(10) else rng.randrange(256)
            msg = m.message(bytes([kind]), rng.randbytes(body_size(rng)))
            parts.append(msg)
            heads.append(pos)
            lengths.append(len(msg) - 1)
            kinds.add(kind)
            pos += len(msg)
        data = b"".join(parts)
    max_length = 0x7FFFFFFF
    r = rng.randrange(10)
    if r < 2 and lengths:
        max_length = rng.choice(lengths) + rng.randint(-1, 1)
    elif r < 3:
        max_length = rng.choice((0, 3, 4, 5, 8, 64, 1 << 20, rng.randint(4, 400)))
    if heads and rng.randrange(3) == 0:
        at = rng.choice(heads)
        value = rng.choice(LENGTH_EDGES + [max_length - 1, max_length, max_length + 1])
        data = set_u32(data, at + 1, value % (1 << 32))
    if heads and rng.randrange(8) == 0:
        at = rng.choice(heads)
        data = data[:at] + bytes([rng.randrange(256)]) + data[at + 1 :]
    if rng.randrange(5) < 2:
        for _ in range(rng.randint(1, 3)):
            data = mutate(rng, data)
    pool = sorted(kinds) or [ord("Q")]
    collect_all = rng.randrange(6) == 0
    watch = frozenset(k for k in pool if rng.randrange(3) == 0)
    collect = frozenset(k for k in pool if rng.randrange(3) == 0)
    if rng.randrange(10) == 0:
        watch |= frozenset(rng.randrange(256) for _ in range(3))
    return ScanCase(
        data, cut_points(rng, len(data), heads), watch, collect, collect_all, max_length
    )


# -- startup cases -------------------------------------------------------------------------


def startup_packet(rng: random.Random) -> bytes:
    r = rng.randrange(12)
    if r == 0:
        return m.ssl_request()
    if r == 1:
        return (8).to_bytes(4, "big") + m.GSSENC_REQUEST_CODE.to_bytes(4, "big")
    if r == 2:
        pid = rng.randint(-(1 << 31), (1 << 31) - 1)
        secret = rng.randint(-(1 << 31), (1 << 31) - 1)
        return m.cancel_request(pid, secret)
    if r == 3:
        code = rng.choice((m.SSL_REQUEST_CODE, m.GSSENC_REQUEST_CODE, m.CANCEL_REQUEST_CODE))
        body = code.to_bytes(4, "big") + rng.randbytes(rng.choice((0, 1, 4, 8, 9, 12)))
        return (len(body) + 4).to_bytes(4, "big") + body
    if r == 4:
        code = rng.choice((2 << 16, 4 << 16, 1234 << 16 | 5678, rng.randrange(1 << 32)))
        body = code.to_bytes(4, "big") + rng.randbytes(rng.randint(0, 20))
        return (len(body) + 4).to_bytes(4, "big") + body
    protocol = m.PROTOCOL_3_0 | rng.choice((0, 0, 0, 1, 2, 0xFFFF))
    params = {}
    for _ in range(rng.choice((0, 1, 2, 2, 3, 5))):
        name = rng.choice(PARAM_NAMES)
        params[name] = rng.choice(PARAM_VALUES)
    packet = m.startup_message(params, protocol)
    if rng.randrange(10) == 0:
        # Raw name/value bytes: invalid UTF-8, empty names, missing terminators.
        body = m.PROTOCOL_3_0.to_bytes(4, "big") + rng.choice(
            (b"\xff\0v\0\0", b"u\0\xc3\0\0", b"\0", b"\0\0", b"u\0", b"u\0v\0", b"u\0\0\0", b"")
        )
        packet = (len(body) + 4).to_bytes(4, "big") + body
    return packet


def startup_case(rng: random.Random) -> StartupCase:
    if rng.randrange(12) == 0:
        data = rng.randbytes(rng.randint(0, 40))
        heads: List[int] = []
    else:
        parts = []
        heads = []
        pos = 0
        for _ in range(rng.choice((1, 1, 1, 2, 3))):
            packet = startup_packet(rng)
            parts.append(packet)
            heads.append(pos)
            pos += len(packet)
        if rng.randrange(4) == 0:
            parts.append(m.query("select 1"))
        data = b"".join(parts)
        if rng.randrange(3) == 0:
            data = set_u32(data, rng.choice(heads), rng.choice(STARTUP_EDGES))
        if rng.randrange(2):
            for _ in range(rng.randint(1, 3)):
                data = mutate(rng, data)
    return StartupCase(data, cut_points(rng, len(data), heads))


def make_case(seed: int, index: int) -> Case:
    """Case ``index`` of the run of ``seed``: two scanner cases for each startup case."""
    rng = case_rng(seed, index)
    if rng.randrange(3) == 0:
        return startup_case(rng)
    return scan_case(rng)


# -- running -------------------------------------------------------------------------------

Failure = Tuple[int, str, str]  # (index, what failed, the case)


def run_range(seed: int, start: int, stop: int) -> Tuple[Dict[str, int], List[Failure]]:
    """Run cases ``start..stop-1``: counts by target and outcome, and the failures."""
    counts: Dict[str, int] = {}
    failures: List[Failure] = []
    for index in range(start, stop):
        case = make_case(seed, index)
        target = "scan" if isinstance(case, ScanCase) else "startup"
        try:
            outcome = check(case)
        except PropertyFailure as exc:
            failures.append((index, str(exc), case.describe()))
            outcome = "FAILED"
        key = f"{target}/{outcome}"
        counts[key] = counts.get(key, 0) + 1
    return counts, failures


def fuzz(seed: int, count: int, start: int = 0) -> Tuple[Dict[str, int], List[Failure]]:
    """Run ``count`` cases of ``seed`` in this process (what the unit test calls)."""
    return run_range(seed, start, start + count)


def report_failure(seed: int, failure: Failure) -> None:
    index, what, case = failure
    print(f"FAILURE seed={seed} case={index}: {what}", flush=True)
    print(f"  {case}", flush=True)
    print(f"  replay: python fuzz/run.py --seed {seed} --case {index}", flush=True)


def replay(seed: int, index: int) -> int:
    case = make_case(seed, index)
    print(case.describe())
    try:
        print("outcome:", check(case))
    except PropertyFailure as exc:
        print("FAILURE:", exc)
        return 1
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, help="run seed (default: random, printed)")
    parser.add_argument("--count", type=int, default=1_000_000, help="cases to run")
    parser.add_argument("--seconds", type=float, default=0.0, help="stop after this long")
    parser.add_argument("--start", type=int, default=0, help="index of the first case")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes")
    parser.add_argument("--block", type=int, default=20000, help="cases per work unit")
    parser.add_argument("--case", type=int, help="replay this one case and stop")
    parser.add_argument("--max-failures", type=int, default=5, help="stop after this many")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(6), "big")
    if args.case is not None:
        return replay(seed, args.case)
    print(
        f"seed={seed} count={args.count} start={args.start} jobs={args.jobs} "
        f"python={sys.implementation.name} {sys.version.split()[0]}",
        flush=True,
    )
    began = time.monotonic()
    deadline = began + args.seconds if args.seconds else None
    end = args.start + args.count
    totals: Dict[str, int] = {}
    failures: List[Failure] = []
    done = 0
    last_print = began
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        running: Set[Future[Tuple[Dict[str, int], List[Failure]]]] = set()
        next_start = args.start
        while True:
            stop_submitting = (
                len(failures) >= args.max_failures
                or (deadline is not None and time.monotonic() >= deadline)
            )
            while not stop_submitting and next_start < end and len(running) < 2 * args.jobs:
                stop = min(end, next_start + args.block)
                running.add(pool.submit(run_range, seed, next_start, stop))
                next_start = stop
            if not running:
                break
            finished, running = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                counts, found = future.result()
                for key, value in counts.items():
                    totals[key] = totals.get(key, 0) + value
                    done += value
                for failure in found:
                    report_failure(seed, failure)
                failures.extend(found)
            now = time.monotonic()
            if now - last_print >= 30 or not running:
                last_print = now
                print(
                    f"{done:,} inputs in {now - began:.0f} s: {done / (now - began):,.0f}/s",
                    flush=True,
                )
    elapsed = time.monotonic() - began
    print(f"seed={seed}: {done:,} inputs in {elapsed:.1f} s ({done / elapsed:,.0f}/s)")
    for key in sorted(totals):
        print(f"  {key}: {totals[key]:,}")
    print(f"{len(failures)} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
