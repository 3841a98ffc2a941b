"""The PostgreSQL v3 wire protocol, pure: bytes in, bytes or values out, no I/O.

Nothing here imports the rest of Odissey, so it can be tested (and fuzzed) on bytes alone.
"""
