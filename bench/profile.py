"""Where Odissey's time goes under pgbench: a sampling profile, summed by area.

Starts a throwaway PostgreSQL and Odissey (this working tree, transaction mode, pool 20),
warms it up with unmeasured pgbench, then samples it while ``pgbench -S -c C -j 2`` runs:
with py-spy under CPython, with vmprof under PyPy (``pip install vmprof`` into the PyPy
venv first; PyPy ships the ``_vmprof`` core). Each sample's innermost frame is put in one
area: the kernel's side of ``send()`` and ``recv()`` (samples inside the socket calls),
waiting in ``epoll`` (only the part that was not idle), Twisted's reactor and transports,
and Odissey by module. The report gives each area's share of the samples, and of the samples outside the
socket and epoll calls (the interpreter's own work, which those calls' wall time hides).

    python bench/profile.py --clients 32 --protocol simple
    python bench/profile.py --python .ci/pypy/bin/python --clients 32 --protocol prepared

Under PyPy, the JIT inlines callees into their callers' traces, so a share belongs to
the outermost function of a trace: read PyPy's Odissey areas as "at least".
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from typing import Counter, Iterable, Tuple

import common
from common import pgbench, start_odissey, start_postgres, stop
from compare import DB, PASSWORD, USER

#: (function, file) of a leaf frame -> area. Checked in order; the first match wins.
AREAS = (
    (re.compile(r"^untilConcludes$|^send$"), re.compile(r"twisted/python/util\.py|socket"), "send() (kernel)"),
    # flow.send calls the socket's send itself: under PyPy the C call has no frame of
    # its own, so the syscall's samples end in flow.send (its Python part is ~80
    # bytecodes per write, a small share of them).
    (re.compile(r"^send$"), re.compile(r"odissey/flow\.py"), "send() (kernel)"),
    (re.compile(r"^doRead$"), re.compile(r"twisted/internet/tcp\.py"), "recv() (kernel) and the read loop"),
    (re.compile(r"^doPoll$"), re.compile(r"epollreactor\.py"), "epoll_wait (busy part)"),
    # odissey/reading.py's loop calls recv and epoll itself (the short read path): a
    # sample in its poll is almost always inside recv (its own Python part is ~40
    # bytecodes per read), one in _epoll_wait inside epoll_wait.
    (re.compile(r"^poll$"), re.compile(r"odissey/reading\.py"), "recv() (kernel) and the read loop"),
    (re.compile(r"^_epoll_wait$|^_poll_wait$"), re.compile(r"odissey/reading\.py"), "epoll_wait (busy part)"),
    (re.compile(r".*"), re.compile(r"(^|/)twisted/"), "Twisted (reactor, logging context, transports)"),
    (re.compile(r".*"), re.compile(r"(^|/)odissey/"), None),  # by module, below
)


#: Areas that are (mostly) the kernel's time. A sampler counts a call's wall time, and on
#: a loaded machine a process is often preempted inside send() (which wakes the peer):
#: their shares overstate CPU, which /proc's user and system times measure instead.
KERNEL = frozenset(label for _name, _where, label in AREAS[:6])


def area(function: str, path: str) -> str:
    for name, where, label in AREAS:
        if name.search(function) and where.search(path):
            return label or "Odissey: " + path[path.rindex("odissey/"):]
    return "other (interpreter, stdlib)"


def py_spy_leaves(raw: str) -> Iterable[Tuple[str, str, int]]:
    """(function, file, samples) of each stack's innermost frame in py-spy's raw output."""
    for line in raw.splitlines():
        stack, _, count = line.rstrip().rpartition(" ")
        if not stack:
            continue
        leaf = stack.split(";")[-1]
        found = re.match(r"(.*) \((.*):\d+\)", leaf)
        function, path = (found.group(1).split(".")[-1], found.group(2)) if found else (leaf, "")
        yield function, path, int(count)


def vmprof_leaves(python: str, profile: str) -> Iterable[Tuple[str, str, int]]:
    """(function, file, per-mille of samples) from vmprof's flat view (self time)."""
    shown = subprocess.run([python, "-m", "vmprof.show", profile, "flat"], capture_output=True, text=True,
                           check=True).stdout
    for line in re.sub(r"\x1b\[[0-9;]*m", "", shown).splitlines():
        found = re.match(r"\s*([\d.]+)% - (.*?):(.*?):\d+$", line)
        if found:
            yield found.group(2), found.group(3), round(float(found.group(1)) * 10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--protocol", default="simple")
    parser.add_argument("--seconds", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=15)
    parser.add_argument("--connect", action="store_true", help="a new connection per transaction (-C)")
    parser.add_argument("--log-section", action="store_true",
                        help="Odissey with a `log: {format: text}` section (its own observer, as compare.py's "
                             "--log-section) instead of twistd's --logfile observer")
    args = parser.parse_args()
    pypy = "pypy" in subprocess.run([args.python, "-c", "import sys; print(sys.implementation.name)"],
                                    capture_output=True, text=True, check=True).stdout
    workdir = tempfile.mkdtemp(prefix="odissey-profile-")
    output = os.path.join(workdir, "profile")
    if pypy:  # vmprof runs inside Odissey, switched on and off by signals
        common.BOOT = (
            "import sys, signal, vmprof, odissey; print('odissey package:', odissey.__file__, flush=True); "
            f"out = open({output!r}, 'w+b'); "
            "signal.signal(signal.SIGUSR1, lambda *a: vmprof.enable(out.fileno(), period=0.0005)); "
            "signal.signal(signal.SIGUSR2, lambda *a: (vmprof.disable(), out.close())); "
            "from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()")
    pg = start_postgres(USER, PASSWORD, DB, scale=10, settings={"max_connections": str(args.clients + 50)})
    proc = None
    try:
        proc, port, _package = start_odissey(pg.port, USER, PASSWORD, DB, mode="transaction", pool_size=20,
                                             workdir=workdir, python=args.python,
                                             extra="log: {format: text}\n" if args.log_section else "")
        pgbench(port, USER, PASSWORD, DB, clients=args.clients, jobs=2, protocol=args.protocol,
                seconds=args.warmup, connect=args.connect)
        if pypy:
            os.kill(proc.pid, signal.SIGUSR1)
            tps = pgbench(port, USER, PASSWORD, DB, clients=args.clients, jobs=2, protocol=args.protocol,
                          seconds=args.seconds, connect=args.connect)
            os.kill(proc.pid, signal.SIGUSR2)
            time.sleep(1)
            leaves = list(vmprof_leaves(args.python, output))
        else:
            spy = subprocess.Popen(["py-spy", "record", "-p", str(proc.pid), "-d", str(args.seconds), "-r", "500",
                                    "-f", "raw", "-o", output, "--nonblocking"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            tps = pgbench(port, USER, PASSWORD, DB, clients=args.clients, jobs=2, protocol=args.protocol,
                          seconds=args.seconds + 1, connect=args.connect)
            spy.wait()
            with open(output) as raw:
                leaves = list(py_spy_leaves(raw.read()))
    finally:
        if proc is not None:
            stop(proc)
        pg.stop()
    shares: Counter[str] = collections.Counter()
    for function, path, count in leaves:
        shares[area(function, path)] += count
    total = sum(shares.values()) or 1
    outside = sum(count for name, count in shares.items() if name not in KERNEL) or 1
    print(f"\n{'PyPy (vmprof)' if pypy else 'CPython (py-spy)'}, pgbench -S{' -C' if args.connect else ''} "
          f"-c {args.clients} -M {args.protocol}, "
          f"{tps:.0f} tps while sampled\n")
    print("| area | share of samples | share outside the socket and epoll calls |")
    print("|---|---|---|")
    for name, count in shares.most_common():
        print(f"| {name} | {100 * count / total:.1f} % | "
              f"{'-' if name in KERNEL else f'{100 * count / outside:.1f} %'} |")


if __name__ == "__main__":
    main()
