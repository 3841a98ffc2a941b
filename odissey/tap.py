"""twistd glue: ``twistd -n odissey -c conf.yaml`` and ``--check``."""

from __future__ import annotations

import sys
from typing import Union

from twisted.python import usage

from odissey import config, tls
from odissey.service import OdisseyService
from odissey.workers import Master, service_for


class Options(usage.Options):
    synopsis = "[-c conf.yaml] [--check]"
    longdesc = "Odissey: a PostgreSQL connection pooler and request router."
    optParameters = [["config", "c", "odissey.yaml", "Path to the YAML configuration file."]]
    optFlags = [["check", None, "Validate the configuration, print any problems, and exit."]]

    def postOptions(self) -> None:
        try:
            self.loaded = config.load(self["config"])
            tls.load(self.loaded)  # certificates and keys must load too
        except config.ConfigError as exc:
            sys.stderr.write(f"{self['config']}: invalid configuration:\n")
            for problem in exc.problems:
                sys.stderr.write(f"  {problem}\n")
            sys.exit(1)
        if self["check"]:
            sys.stdout.write(f"{self['config']}: configuration OK\n")
            sys.exit(0)


def makeService(options: Options) -> Union[OdisseyService, Master]:
    return service_for(options.loaded)
