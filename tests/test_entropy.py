"""Random bytes for logins: from the kernel in batches, each byte handed out once."""

from __future__ import annotations

import os

from twisted.trial.unittest import SynchronousTestCase

from odissey import entropy


class EntropyTests(SynchronousTestCase):
    def test_bytes_are_the_kernels_in_order(self) -> None:
        """Consecutive takes are consecutive slices of one os.urandom batch, and a take
        that does not fit in what is left starts a new batch."""
        reads: list[bytes] = []
        real = os.urandom

        def urandom(n: int) -> bytes:
            reads.append(real(n))
            return reads[-1]

        self.patch(entropy, "_batch", b"")
        self.patch(entropy, "_used", 0)
        self.patch(entropy.os, "urandom", urandom)
        first, second = entropy.random_bytes(4), entropy.random_bytes(6)
        self.assertEqual(len(reads), 1)
        self.assertEqual(first + second, reads[0][:10])
        entropy.random_bytes(entropy.BATCH - 12)
        third = entropy.random_bytes(4)  # 2 bytes left: not enough
        self.assertEqual(len(reads), 2)
        self.assertEqual(third, reads[1][:4])

    def test_random_bits_width(self) -> None:
        """random_bits(k) stays below 2**k, and over many draws uses the top bit."""
        for k in (1, 7, 8, 9, 31, 32):
            draws = [entropy.random_bits(k) for _ in range(200)]
            self.assertTrue(all(0 <= d < (1 << k) for d in draws), k)
            self.assertTrue(any(d >> (k - 1) for d in draws), k)
        self.assertEqual(entropy.random_bits(0), 0)

    def test_no_repeats(self) -> None:
        """Draws across several batches are all different (8 bytes each, so a repeat by
        chance is out of the question; bytes handed out twice would repeat)."""
        salts = [entropy.random_bytes(8) for _ in range(2000)]
        self.assertEqual(len(set(salts)), len(salts))

    def test_fork_starts_a_new_batch(self) -> None:
        """A forked child does not hand out the bytes its parent will."""
        entropy.random_bytes(1)
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: its next bytes, to the parent
            try:
                os.write(write, entropy.random_bytes(16))
            finally:
                os._exit(0)
        os.close(write)
        os.waitpid(pid, 0)
        child = os.read(read, 16)
        os.close(read)
        self.assertNotEqual(child, entropy.random_bytes(16))
