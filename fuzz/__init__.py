"""Fuzz targets and drivers for the wire codec; see docs/reliability.md, "Fuzzing"."""
