"""The twistd plugin: thin on purpose, everything lives in odissey.tap."""

from twisted.application.service import ServiceMaker

odissey = ServiceMaker(
    "Odissey", "odissey.tap", "A PostgreSQL connection pooler and request router.", "odissey"
)
