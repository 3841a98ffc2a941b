"""Long-running fuzzer: the wire codec (message scanner, startup reader) and the transaction tracker.

Every case is generated from ``(seed, index)`` alone, so any failure is replayed with
``--seed S --case I`` (and the same ``--target``) whatever ``--jobs`` was.

``--target wire`` (the default): structure-aware byte streams, valid ones built from real
message and packet layouts, then mutated (bit flips, byte changes, truncation,
deleted/duplicated/inserted ranges, length fields set to edge values, header type bytes
changed), cut into chunks at random places or around headers; some cases are plain random
bytes. Each case runs through :mod:`fuzz.targets`, which compares the real object with a
simple reference.

``--target tracker``: client request sequences (what drivers send: simple queries,
extended-protocol batches ending in Sync, Flush or nothing, COPY in both protocols, function
calls, transaction blocks; and stray messages of every type), some failing, with a random
schedule of client chunks, server processing and reply deliveries. Each case runs through
:mod:`fuzz.tracker_model`, which checks the tracker against a model of PostgreSQL. Like a
driver, the client ends each COPY FROM STDIN before it sends anything else;
``--target tracker-wild`` sends anything anywhere.

    nice -n 10 python fuzz/run.py --count 10000000 --jobs 2
    nice -n 10 python fuzz/run.py --target tracker --count 10000000 --jobs 2
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
from typing import Callable, Dict, List, Optional, Set, Tuple

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
from fuzz.tracker_model import (  # noqa: E402
    CLIENT_KINDS,
    COPY_DATA,
    COPY_DONE,
    COPY_FAIL,
    DELIVER,
    PROCESS,
    SEND,
    Action,
    B,
    C,
    D,
    E,
    F,
    H,
    P,
    Q,
    Request,
    S,
    TrackerCase,
    TrackerFailure,
    check_tracker,
    discipline,
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


# -- tracker cases -------------------------------------------------------------------------


def request(rng: random.Random, kind: int, copies: bool = False, toggles: bool = False) -> Request:
    """A request that fails one time in twelve."""
    return Request(kind, rng.randrange(12) == 0, copies, toggles, rng.randrange(256))


def extended_batch(rng: random.Random, wild: bool) -> List[Request]:
    """Parse/Bind/Describe/Execute for one to three statements, a Close maybe, then
    Sync, Flush, Sync and Flush, or nothing (a pipeline left open). An Execute that runs
    COPY FROM STDIN is followed by its copy (a wild client may carry on without one)."""
    out = []
    for _ in range(rng.choice((1, 1, 2, 3))):
        toggles = rng.randrange(10) == 0  # BEGIN, COMMIT, ROLLBACK
        copies = rng.randrange(12) == 0
        if rng.randrange(10) < 7:
            out.append(request(rng, P, toggles=toggles))
        out.append(request(rng, B, toggles=toggles))
        if rng.randrange(10) < 3:
            out.append(request(rng, D, toggles=toggles))
        out.append(request(rng, E, copies, toggles))
        if copies and (not wild or rng.randrange(3)):
            out += copy_data(rng, libpq_sync=rng.randrange(2) == 0, may_stay_open=wild)
    if rng.randrange(10) == 0:
        out.append(request(rng, C))
    end = rng.randrange(10)
    if end < 7:
        out.append(request(rng, S))
    elif end == 7:
        out.append(request(rng, H))
    elif end == 8:
        out += [request(rng, S), request(rng, H)]  # psycopg's pipeline end
    return out


def copy_data(rng: random.Random, libpq_sync: bool, may_stay_open: bool) -> List[Request]:
    """What a client sends into a COPY FROM STDIN: a Sync first when libpq started it with
    the extended protocol, CopyData (and a Flush now and then), then CopyDone or CopyFail
    (or, when it may stay open, nothing yet), and libpq's Sync after an extended COPY."""
    out = [request(rng, S)] if libpq_sync else []
    for _ in range(rng.choice((0, 1, 1, 2, 3))):
        out.append(request(rng, COPY_DATA if rng.randrange(8) else H))
    end = rng.randrange(10)
    if end < 7:
        out.append(request(rng, COPY_DONE))
    elif end < 9 or not may_stay_open:
        out.append(request(rng, COPY_FAIL))
    if libpq_sync and end < 9:
        out.append(request(rng, S))
    return out


def tracker_requests(rng: random.Random, wild: bool) -> List[Request]:
    """What a client sends. A driver ends every COPY FROM STDIN it starts with CopyDone or
    CopyFail before it sends anything but CopyData, Flush or (libpq) Sync; a ``wild``
    client sends anything anywhere."""
    out: List[Request] = []
    batches = rng.choice((1, 1, 2, 3, 4, 5, 7, 10))
    for i in range(batches):
        open_ok = wild or i == batches - 1  # a COPY may stay open: the client is not done
        batch = rng.randrange(16)
        if batch < 3:
            copies = rng.randrange(12) == 0
            out.append(request(rng, Q, copies, rng.randrange(6) == 0))
            if copies and not wild:
                out += copy_data(rng, libpq_sync=False, may_stay_open=open_ok)
        elif batch < 8:
            out += extended_batch(rng, wild)
        elif batch < 10:  # COPY FROM STDIN by a simple Query, sent whole or not (psql)
            out.append(request(rng, Q, copies=True))
            out += copy_data(rng, libpq_sync=False, may_stay_open=open_ok)
        elif batch == 10:  # ... and by libpq's extended protocol
            out += [request(rng, P), request(rng, B), request(rng, E, copies=True)]
            out += copy_data(rng, libpq_sync=True, may_stay_open=open_ok)
        elif batch == 11:
            out.append(request(rng, F))
        elif batch == 12:  # a transaction block around a batch
            out.append(request(rng, Q, toggles=True))
            out += extended_batch(rng, wild)
            out.append(request(rng, Q, toggles=True))
        else:  # anything at all (a driver's strays start no COPY)
            for _ in range(rng.randint(1, 4)):
                kind = CLIENT_KINDS[rng.randrange(len(CLIENT_KINDS))]
                copies = wild and rng.randrange(5) == 0
                out.append(request(rng, kind, copies, rng.randrange(5) == 0))
    return out if wild else list(discipline(out))


def tracker_actions(rng: random.Random, n: int) -> List[Action]:
    """A schedule: client chunks (whole messages, pieces, empty), the server processing
    what it has, replies delivered in pieces, one message at a time or all at once."""
    actions: List[Action] = []
    for _ in range(rng.randint(0, 3 * n + 2)):
        r = rng.randrange(20)
        if r < 9:
            size = rng.choice((-1, -1, -1, -2, 0, rng.randint(1, 6), rng.randint(1, 40)))
            actions.append((SEND, size))
        elif r < 14:
            actions.append((PROCESS, rng.choice((1, 1, 1, 2, 3, 1000))))
        else:
            size = rng.choice((-1, -1, -2, -2, rng.randint(1, 6), rng.randint(1, 60)))
            actions.append((DELIVER, size))
    return actions


def tracker_case(rng: random.Random, wild: bool = False) -> TrackerCase:
    requests = tracker_requests(rng, wild)
    return TrackerCase(tuple(requests), tuple(tracker_actions(rng, len(requests))))


def make_tracker_case(seed: int, index: int, wild: bool = False) -> TrackerCase:
    return tracker_case(case_rng(seed, index), wild)


# -- running -------------------------------------------------------------------------------

Failure = Tuple[int, str, str]  # (index, what failed, the case)


TARGETS = ("wire", "tracker", "tracker-wild")
PRINTED = 20  # failures printed in full; the rest are counted


def run_one(target: str, seed: int, index: int) -> Tuple[str, str, Callable[[], str]]:
    """Case ``index`` of ``target``: its name in the counts, its description, its check."""
    if target.startswith("tracker"):
        tracked = make_tracker_case(seed, index, wild=target == "tracker-wild")
        return target, tracked.describe(), lambda: check_tracker(tracked)
    case = make_case(seed, index)
    name = "scan" if isinstance(case, ScanCase) else "startup"
    return name, case.describe(), lambda: check(case)


def run_range(
    seed: int, start: int, stop: int, target: str = "wire"
) -> Tuple[Dict[str, int], List[Failure]]:
    """Run cases ``start..stop-1``: counts by target and outcome, and the failures."""
    counts: Dict[str, int] = {}
    failures: List[Failure] = []
    for index in range(start, stop):
        name, described, run = run_one(target, seed, index)
        try:
            outcome = run()
        except PropertyFailure as exc:
            failures.append((index, str(exc), described))
            outcome = "FAILED" + (f" ({exc.label})" if isinstance(exc, TrackerFailure) else "")
        key = f"{name}/{outcome}"
        counts[key] = counts.get(key, 0) + 1
    return counts, failures


def fuzz(
    seed: int, count: int, start: int = 0, target: str = "wire"
) -> Tuple[Dict[str, int], List[Failure]]:
    """Run ``count`` cases of ``seed`` in this process (what the unit tests call)."""
    return run_range(seed, start, start + count, target)


def report_failure(seed: int, failure: Failure, target: str = "wire") -> None:
    index, what, case = failure
    print(f"FAILURE seed={seed} case={index}: {what}", flush=True)
    print(f"  {case}", flush=True)
    option = "" if target == "wire" else f"--target {target} "
    print(f"  replay: python fuzz/run.py {option}--seed {seed} --case {index}", flush=True)


def replay(seed: int, index: int, target: str = "wire") -> int:
    _, described, run = run_one(target, seed, index)
    print(described)
    try:
        print("outcome:", run())
    except PropertyFailure as exc:
        print("FAILURE:", exc)
        return 1
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", choices=TARGETS, default="wire", help="what to fuzz")
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
        return replay(seed, args.case, args.target)
    print(
        f"target={args.target} seed={seed} count={args.count} start={args.start} "
        f"jobs={args.jobs} "
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
                running.add(pool.submit(run_range, seed, next_start, stop, args.target))
                next_start = stop
            if not running:
                break
            finished, running = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                counts, found = future.result()
                for key, value in counts.items():
                    totals[key] = totals.get(key, 0) + value
                    done += value
                for failure in found[: max(0, PRINTED - len(failures))]:
                    report_failure(seed, failure, args.target)
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
