"""What the bench scripts share: a throwaway PostgreSQL, an Odissey process in front of it,
free ports, a process's (and PostgreSQL's) CPU time, and one pgbench run that either gives a
TPS or fails.

Imported as ``common`` by ``bench/compare.py``, ``bench/ab.py`` and ``bench/soak.py`` (run
as scripts, so
``bench/`` is first on ``sys.path``). Importing it puts the working tree first on
``sys.path`` too, and the Odissey it starts runs this working tree's code (it checks
``odissey.__file__``), not an installed copy.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from odissey.postgres import LocalPostgres  # noqa: E402
from odissey.pypy import NURSERY, NURSERY_VARIABLE  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")
#: Runs Odissey through twistd after printing where the odissey package came from.
BOOT = (
    "import sys, odissey; print('odissey package:', odissey.__file__, flush=True); "
    "from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"
)


def runtime_env() -> Dict[str, str]:
    """The environment Odissey and the floors run with: this one, plus PyPy's nursery as
    docs/operations.md runs Odissey (``PYPY_GC_NURSERY``, odissey/pypy.py), so that a
    runtime setting is never the difference between Odissey and a floor. A
    ``PYPY_GC_NURSERY`` already set wins (a wrapper script that sets or unsets it is how
    ``bench/ab.py --old-python`` compares sizes)."""
    return {NURSERY_VARIABLE: NURSERY, **os.environ}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: Optional[subprocess.Popen] = None, patience: float = 30,
              name: str = "the process") -> None:
    """Waits until something listens on 127.0.0.1:``port``; fails early if ``proc`` (called
    ``name``) exits."""
    deadline = time.monotonic() + patience
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{name} exited with status {proc.returncode} before listening on {port}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"nothing listens on {port}")


def cpu_times(pid: int) -> Tuple[float, float]:
    """User and system CPU time of a process, in seconds, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def tree_cpu_times(pid: int) -> Tuple[float, float]:
    """User and system CPU time of a process and its children (a multi-worker Odissey's
    master and workers), live ones read from /proc, exited ones as the kernel credited
    them to the parent once reaped."""
    def stat(p: int) -> List[str]:
        return Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()

    fields = stat(pid)
    user = int(fields[11]) + int(fields[13])
    system = int(fields[12]) + int(fields[14])
    for path in Path("/proc").glob("[0-9]*/stat"):
        try:
            child = path.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(child[1]) == pid:
            user += int(child[11])
            system += int(child[12])
    return user / CLK_TCK, system / CLK_TCK


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, from /proc."""
    return sum(cpu_times(pid))


def postgres_cpu_seconds(pg: LocalPostgres) -> float:
    """User + system CPU time of a PostgreSQL cluster: the postmaster, its live children
    (backends and background processes) and the children it has reaped. A backend that
    was alive at an earlier reading and has exited since is counted whole, so a difference
    between two readings is exact only when the backends alive at the first one either
    outlive the second or were idle before it (true for a pooler's servers and for
    pgbench's own connections, which start and end within one run)."""
    postmaster = int(Path(pg.data_dir, "postmaster.pid").read_text().split()[0])

    def own_and_reaped() -> Tuple[int, int]:
        fields = Path(f"/proc/{postmaster}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12]), int(fields[13]) + int(fields[14])

    while True:
        own, reaped = own_and_reaped()
        children = 0
        # (os.listdir, not Path.glob: glob stats each entry, and a process that exits
        # meanwhile makes that stat raise ESRCH, which pathlib does not take as "gone")
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:  # (exited since the listing)
                continue
            if int(fields[1]) == postmaster:
                children += int(fields[11]) + int(fields[12])
        # A child reaped during the scan would be missed or counted twice: scan again.
        if own_and_reaped()[1] == reaped:
            return (own + reaped + children) / CLK_TCK


class PgbenchFailed(RuntimeError):
    """pgbench exited with an error, aborted clients or counted failed transactions;
    ``reason`` is its first error line, the message its whole output."""

    def __init__(self, reason: str, output: str) -> None:
        super().__init__(f"{reason}\n{output}")
        self.reason = reason


def pgbench(port: int, user: str, password: str, db: str, *, clients: int, jobs: int,
            protocol: str, seconds: int = 0, transactions: int = 0, select_only: bool = True,
            connect: bool = False, sslmode: str = "") -> float:
    """One ``pgbench -n [-S] [-C] -c clients -j jobs -M protocol -T seconds`` run (``-t
    transactions`` per client instead when given) against 127.0.0.1:``port``; returns its
    TPS (with ``connect``, a new connection per transaction, connecting included);
    ``sslmode`` is libpq's (``PGSSLMODE``), the environment's when empty. Raises
    :class:`PgbenchFailed` unless pgbench exited with status 0, printed a TPS and counted
    no failed transaction, so that a target that cannot run a protocol is never reported
    as a number."""
    length = ["-t", str(transactions)] if transactions else ["-T", str(seconds)]
    command = ["pgbench", "-h", "127.0.0.1", "-p", str(port), "-U", user, "-n",
               "-c", str(clients), "-j", str(min(clients, jobs)), *length, "-M", protocol]
    done = subprocess.run(command + (["-S"] if select_only else []) + (["-C"] if connect else []) + [db],
                          capture_output=True, text=True,
                          env={**pg_env(password), **({"PGSSLMODE": sslmode} if sslmode else {})})
    output = f"{' '.join(command)}\nexit status {done.returncode}\n{done.stdout}{done.stderr}"
    errors: List[str] = [line for line in done.stderr.splitlines() if "error" in line.lower()]
    failed = re.search(r"number of failed transactions: (\d+)", done.stdout)
    match = re.search(r"tps = ([\d.]+)", done.stdout)
    if done.returncode != 0 or errors or not match or (failed and int(failed.group(1))):
        reason = errors[0] if errors else f"pgbench exited with status {done.returncode}"
        raise PgbenchFailed(reason.strip(), output)
    return float(match.group(1))


def pg_env(password: str) -> Dict[str, str]:
    """The environment for libpq tools (pgbench) logging in with ``password``."""
    return {**os.environ, "PGPASSWORD": password}


def start_postgres(user: str, password: str, db: str, *, scale: int,
                   settings: Optional[Mapping[str, str]] = None) -> LocalPostgres:
    """A throwaway PostgreSQL on 127.0.0.1 (TCP, md5) with ``user`` owning ``db``, which
    ``pgbench -i -s scale`` has filled. ``settings`` add to postgresql.conf. The caller
    stops it (it is stopped here if the setup fails)."""
    pg = LocalPostgres(
        port=free_port(), users={user: password}, databases={db: user},
        hba=["host all all 127.0.0.1/32 md5"],
        settings={"listen_addresses": "127.0.0.1", "password_encryption": "md5", **(settings or {})},
    )
    try:
        pg.start()
        subprocess.run(["pgbench", "-i", "-q", "-s", str(scale), "-h", "127.0.0.1", "-p", str(pg.port),
                        "-U", user, db], check=True, capture_output=True, env=pg_env(password))
    except BaseException:
        pg.stop()
        raise
    return pg


def start_odissey(pg_port: int, user: str, password: str, db: str, *, mode: str, pool_size: int,
                  workdir: str, root: Path = ROOT, wrapper: Sequence[str] = (),
                  patience: float = 30, python: str = sys.executable,
                  name: str = "odissey", extra: str = "") -> Tuple[subprocess.Popen, int, str]:
    """Odissey (``twistd odissey``, this working tree's code) with one md5 route to
    127.0.0.1:``pg_port``, listening on a free port of 127.0.0.1. Its configuration, output
    (``odissey.out``) and log (``odissey.log``) go to ``workdir``; ``root`` is the checkout
    whose code it runs; ``wrapper`` goes before the Python command (``valgrind …``), and
    ``patience`` is how long it may take to listen; ``python`` the interpreter (PyPy's, say)
    and ``name`` what its files in ``workdir`` are called; ``extra`` is YAML appended to the
    configuration (top-level keys such as ``tls:``). Returns the process, its port and the
    path of the odissey package it runs."""
    port = free_port()
    conf = Path(workdir) / f"{name}.yaml"
    conf.write_text(
        f"listen: ['tcp:{port}:interface=127.0.0.1']\n"
        f"limits: {{max_clients: 2000}}\n"
        f"storages: {{pg: {{host: 127.0.0.1, port: {pg_port}}}}}\n"
        f"routes:\n"
        f"  - {{database: {db}, user: {user}, storage: pg,\n"
        f"     auth: {{method: md5, password: {password}}},\n"
        f"     pool: {{mode: {mode}, size: {pool_size}}}}}\n"
        + extra
    )
    env = runtime_env()
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH", "")) if p)
    with open(Path(workdir) / f"{name}.out", "w") as out:
        proc = subprocess.Popen(
            [*wrapper, python, "-c", BOOT, "--pidfile=", "-n", "--logfile", f"{workdir}/{name}.log",
             "odissey", "-c", str(conf)],
            cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT,
        )
    try:
        wait_port(port, proc, patience=patience, name="Odissey")
        found = re.search(r"odissey package: (\S+)", (Path(workdir) / f"{name}.out").read_text())
        package = found.group(1) if found else "?"
        if not package.startswith(str(root / "odissey")):
            raise RuntimeError(f"Odissey runs {package}, not the working tree {root}")
    except BaseException:
        stop(proc)
        raise
    return proc, port, package


def start_bench_script(script: str, args: Sequence[str], workdir: str, python: str, name: str,
                       wrapper: Sequence[str] = (), patience: float = 30) -> Tuple[subprocess.Popen, int]:
    """``bench/<script> PORT 127.0.0.1 *args`` on a free port of 127.0.0.1, its output to
    ``workdir/<name>.out``; returns once it listens (``wrapper`` and ``patience`` as for
    :func:`start_odissey`)."""
    port = free_port()
    with open(Path(workdir) / f"{name}.out", "w") as out:
        proc = subprocess.Popen([*wrapper, python, str(ROOT / "bench" / script), str(port), "127.0.0.1", *args],
                                env=runtime_env(), stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_port(port, proc, patience=patience, name=name)
    except BaseException:
        stop(proc)
        raise
    return proc, port


def start_floor(pg_port: int, workdir: str, python: str = sys.executable,
                name: str = "floor", twisted_write: bool = False, wrapper: Sequence[str] = (),
                patience: float = 30, short_reads: bool = False) -> Tuple[subprocess.Popen, int]:
    """bench/floor.py, the bare Twisted relay, in front of 127.0.0.1:``pg_port`` (``short_reads``:
    with Odissey's read path)."""
    flags = ["--twisted-write"] if twisted_write else []
    flags += ["--short-reads"] if short_reads else []
    return start_bench_script("floor.py", [str(pg_port), *flags], workdir, python, name, wrapper, patience)


def start_login_floor(pg_port: int, user: str, password: str, db: str, workdir: str,
                      python: str = sys.executable, name: str = "login-floor", wrapper: Sequence[str] = (),
                      patience: float = 30) -> Tuple[subprocess.Popen, int]:
    """bench/login_floor.py, the least a Twisted pooler does for a login, in front of
    127.0.0.1:``pg_port``, checking md5 passwords itself and logging in to PostgreSQL as
    ``user``."""
    return start_bench_script("login_floor.py", [str(pg_port), user, password, db], workdir, python, name,
                              wrapper, patience)


def stop(proc: subprocess.Popen, patience: float = 30) -> bool:
    """SIGTERM, then SIGKILL after ``patience`` seconds; True when SIGTERM sufficed."""
    if proc.poll() is not None:
        return True
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=patience)
        return True
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return False


def alternate_trees(script: str, trees: Sequence[str], rounds: int, options: Sequence[str]) -> None:
    """Run ``script --measure TREE *options`` for each Odissey checkout in ``trees``
    (default: this one), in a process of its own, tree after tree, ``rounds`` times:
    the in-process loops (relay_loop.py, login_loop.py) compare trees this way."""
    for round_ in range(rounds):
        for tree in trees or ["."]:
            print(f"round {round_ + 1}: {tree}", flush=True)
            subprocess.run([sys.executable, script, "--measure", str(Path(tree).resolve()), *options], check=True)


def remove_worktrees(made: List[Path], parent: Path) -> None:
    """Remove the temporary git worktrees made for other commits, and their parent."""
    for tree in made:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False)
    shutil.rmtree(parent, ignore_errors=True)
