"""Odissey: a PostgreSQL connection pooler and request router on Twisted."""

__version__ = "0.1.0"
