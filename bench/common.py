"""What the bench scripts share: a throwaway PostgreSQL, an Odissey process in front of it,
free ports, and a process's CPU time.

Imported as ``common`` by ``bench/compare.py`` and ``bench/soak.py`` (run as scripts, so
``bench/`` is first on ``sys.path``). Importing it puts the working tree first on
``sys.path`` too, and the Odissey it starts runs this working tree's code (it checks
``odissey.__file__``), not an installed copy.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, Mapping, Optional, Tuple

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from odissey.postgres import LocalPostgres  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")
#: Runs Odissey through twistd after printing where the odissey package came from.
BOOT = (
    "import sys, odissey; print('odissey package:', odissey.__file__, flush=True); "
    "from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"
)


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


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(fields[i]) for i in (11, 12)) / CLK_TCK


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
                  workdir: str, root: Path = ROOT) -> Tuple[subprocess.Popen, int, str]:
    """Odissey (``twistd odissey``, this working tree's code) with one md5 route to
    127.0.0.1:``pg_port``, listening on a free port of 127.0.0.1. Its configuration, output
    (``odissey.out``) and log (``odissey.log``) go to ``workdir``; ``root`` is the checkout
    whose code it runs. Returns the process, its port and the path of the odissey package
    it runs."""
    port = free_port()
    conf = Path(workdir) / "odissey.yaml"
    conf.write_text(
        f"listen: ['tcp:{port}:interface=127.0.0.1']\n"
        f"limits: {{max_clients: 2000}}\n"
        f"storages: {{pg: {{host: 127.0.0.1, port: {pg_port}}}}}\n"
        f"routes:\n"
        f"  - {{database: {db}, user: {user}, storage: pg,\n"
        f"     auth: {{method: md5, password: {password}}},\n"
        f"     pool: {{mode: {mode}, size: {pool_size}}}}}\n"
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH", "")) if p)
    with open(Path(workdir) / "odissey.out", "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", BOOT, "--pidfile=", "-n", "--logfile", f"{workdir}/odissey.log",
             "odissey", "-c", str(conf)],
            cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT,
        )
    try:
        wait_port(port, proc, name="Odissey")
        found = re.search(r"odissey package: (\S+)", (Path(workdir) / "odissey.out").read_text())
        package = found.group(1) if found else "?"
        if not package.startswith(str(root / "odissey")):
            raise RuntimeError(f"Odissey runs {package}, not the working tree {root}")
    except BaseException:
        stop(proc)
        raise
    return proc, port, package


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
