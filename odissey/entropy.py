"""Random bytes for logins (md5 salts, cancel keys), read from the kernel in batches.

Each login needs about 12 random bytes: a 4-byte md5 salt, a pid and a secret for its
cancel key. One ``os.urandom`` call for each cost more than the rest of the md5
exchange (under PyPy 6 % of a login's time with ``pgbench -C``), so the bytes come from
one ``os.urandom`` read of :data:`BATCH` bytes, handed out in order and never twice.
They are the kernel's CSPRNG output all the same: a salt or a secret is as
unpredictable to a client as before. What changes is that the next few hundred of them
sit in the process's memory until used, which matters only to someone who can already
read that memory (and with it every live cancel key). A forked child starts a batch of
its own, so parent and child never hand out the same bytes (docs/security.md).
"""

from __future__ import annotations

import os

#: Bytes read from the kernel at once: about 340 logins' worth.
BATCH = 4096

_batch = b""
_used = 0


def random_bytes(n: int) -> bytes:
    """``n`` random bytes from the kernel's CSPRNG (``n`` at most :data:`BATCH`)."""
    global _batch, _used
    start = _used
    end = start + n
    if end > len(_batch):
        _batch, start, end = os.urandom(BATCH), 0, n
    _used = end
    return _batch[start:end]


def random_bits(k: int) -> int:
    """A random non-negative integer of at most ``k`` bits (``secrets.randbits``)."""
    if k <= 0:
        return 0
    size = (k + 7) >> 3
    return int.from_bytes(random_bytes(size), "big") >> ((size << 3) - k)


def _forget() -> None:
    """After a fork: the child must not hand out the bytes its parent will."""
    global _batch, _used
    _batch, _used = b"", 0


os.register_at_fork(after_in_child=_forget)
