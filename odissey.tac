"""For systemd and ``twistd -n -y odissey.tac``: the config path comes from ODISSEY_CONFIG."""

import os
import sys

from twisted.application import service

from odissey import config
from odissey.workers import service_for

path = os.environ.get("ODISSEY_CONFIG", "/etc/odissey/odissey.yaml")
try:
    loaded = config.load(path)
except config.ConfigError as exc:
    sys.stderr.write(f"{path}: invalid configuration:\n")
    for problem in exc.problems:
        sys.stderr.write(f"  {problem}\n")
    sys.exit(1)

application = service.Application("odissey")
service_for(loaded).setServiceParent(application)
