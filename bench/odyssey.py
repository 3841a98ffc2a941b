"""Yandex Odyssey as a benchmark target (bench/compare.py --odyssey BINARY): one md5 route
in front of a throwaway PostgreSQL, configured as PgBouncer and Odissey are there.

Odyssey is not part of Odissey and not committed: build it from its source
(github.com/yandex/odyssey, cmake) and pass the binary. Its ``workers`` are threads of one
process, so the process's CPU time is all of Odyssey's.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Optional, Tuple

from certs import postgres_owned
from common import free_port, stop, wait_port


def start_odyssey(binary: str, pg_port: int, user: str, password: str, db: str, *, mode: str,
                  pool_size: int, workers: int, workdir: Path, name: str,
                  tls: Optional[Tuple[Path, Path]] = None) -> Tuple[subprocess.Popen, int]:
    """Odyssey with ``workers`` worker threads listening on a free port of 127.0.0.1, md5 for
    the client and to PostgreSQL, ``mode`` pooling with ``pool_size`` servers, no
    ``DISCARD ALL`` between clients (as PgBouncer and Odissey in transaction mode), and
    client TLS allowed with ``tls`` (certificate, key) when given. Runs as the postgres
    user when we are root, as PgBouncer does. Returns the process and its port."""
    port = free_port()
    files = workdir / name
    files.mkdir()
    tls_lines = (f'\ttls "allow"\n\ttls_cert_file "{tls[0]}"\n\ttls_key_file "{tls[1]}"\n'
                 if tls else "")
    conf = files / "odyssey.conf"
    conf.write_text(
        f'daemonize no\nunix_socket_dir "{files}"\nunix_socket_mode "0644"\nlocks_dir "{files}"\n'
        f'log_file "{files}/odyssey.log"\nlog_to_stdout no\nlog_format "%p %t %l [%i %s] (%c) %m\\n"\nlog_debug no\nlog_config no\n'
        f'log_session no\nlog_query no\nlog_stats no\n'
        f'workers {workers}\nresolvers 1\nnodelay yes\n'
        f'listen {{\n\thost "127.0.0.1"\n\tport {port}\n\tbacklog 128\n{tls_lines}}}\n'
        f'storage "pg" {{\n\ttype "remote"\n\thost "127.0.0.1"\n\tport {pg_port}\n}}\n'
        f'database "{db}" {{\n\tuser "{user}" {{\n'
        f'\t\tauthentication "md5"\n\t\tpassword "{password}"\n'
        f'\t\tstorage "pg"\n\t\tstorage_password "{password}"\n'
        f'\t\tpool "{mode}"\n\t\tpool_size {pool_size}\n\t\tpool_timeout 0\n'
        f'\t\tpool_discard no\n\t\tpool_cancel yes\n\t\tpool_rollback yes\n'
        f'\t\tclient_fwd_error yes\n\t}}\n}}\n')
    postgres_owned(files, conf)
    with open(files / "odyssey.out", "w") as out:
        proc = subprocess.Popen([binary, str(conf)], user="postgres" if os.geteuid() == 0 else None,
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_port(port, proc, name="Odyssey")
    except BaseException:
        stop(proc)
        raise
    return proc, port
