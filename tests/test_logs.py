"""The ``log`` section's observer (level, connection lines, text or JSON) and twistd's own
text observer, as Odissey starts it."""

from __future__ import annotations

import io
import json
import sys

from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import (FileLogObserver, Logger, LogLevel, LogPublisher, eventAsJSON,
                            formatEventAsClassicLogText, jsonFileLogObserver, textFileLogObserver)
from twisted.python.failure import Failure
from twisted.scripts._twistd_unix import ServerOptions, UnixAppLogger
from twisted.trial.unittest import SynchronousTestCase

from odissey import service, workers
from odissey.config import LogSettings, parse
from odissey.logs import CONNECTION_EVENT, JsonLines, Lines, Observer, speed_up_twistd_text
from odissey.logs import Logger as OdisseyLogger
from odissey.testing import in_this_thread
from tests.test_config import minimal


class ObserverTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.stream = io.StringIO()
        self.observer = Observer(LogSettings(), self.stream)
        self.log = Logger(namespace="odissey.test", observer=LogPublisher(self.observer))

    def test_level(self) -> None:
        """Events below the level are dropped; a new level applies at once."""
        self.log.debug("hidden {n}", n=1)
        self.log.info("shown {n}", n=2)
        self.observer.settings = LogSettings(level="warn")
        self.log.info("hidden {n}", n=3)
        self.log.warn("shown {n}", n=4)
        text = self.stream.getvalue()
        self.assertEqual([line.split("] ", 1)[1] for line in text.splitlines()], ["shown 2", "shown 4"])

    def test_connections_off(self) -> None:
        """connections: off drops the lines marked as routine connection events only."""
        self.observer.settings = LogSettings(connections=False)
        self.log.info("{id}: login", id="c1", connection=CONNECTION_EVENT)
        self.log.info("{id}: login failed", id="c2")
        self.assertEqual(self.stream.getvalue().count("\n"), 1)
        self.assertIn("c2: login failed", self.stream.getvalue())

    def test_text_as_twisted_writes_it(self) -> None:
        """Text lines are twisted.logger's textFileLogObserver's, character for character,
        across second boundaries (the timestamp is remembered per second)."""
        twisted_stream = io.StringIO()
        twisted_text = textFileLogObserver(twisted_stream)
        for when in (1700000000.0, 1700000000.25, 1700000000.999999, 1700000001.0, 1700000059.5,
                     1700000061.0, None):
            event = {"log_format": "{id}: login {user}", "id": "c1", "user": "app",
                     "log_level": LogLevel.info, "log_namespace": "odissey.client", "log_time": when}
            self.observer(dict(event))
            twisted_text(dict(event))
        self.assertEqual(self.stream.getvalue(), twisted_stream.getvalue())
        self.assertEqual(len(set(line.split(" ")[0] for line in self.stream.getvalue().splitlines())), 5)

    def test_lines_as_twisted_formats_them(self) -> None:
        """Lines (the text observer's formatter) gives Twisted's classic line for every
        kind of event, those it writes out itself and those it hands to Twisted."""
        try:
            1 / 0
        except ZeroDivisionError:
            failure = Failure()
        base = {"log_level": LogLevel.warn, "log_namespace": "odissey.relay", "log_time": 1700000000.5}
        events = [
            {"log_format": "{id}: logout after {seconds:.1f}s", "id": "c1", "seconds": 2.25},
            {"log_format": "{kind!r} from {who.name}", "kind": "Z", "who": LogLevel.info},
            {"log_format": "two\nlines {n}", "n": 1},
            {"log_format": "{missing} field"},
            {"log_format": "called {f()}", "f": lambda: "yes"},
            {"log_format": "unbalanced {"},
            {"log_format": b"bytes {n}", "n": 3},
            {"log_format": "failed {n}", "n": 4, "log_failure": failure},
            {"log_format": "{n}", "n": 5, "log_system": "worker 1"},
            {"log_format": "{n}", "n": 6, "log_level": None, "log_namespace": None},
            {"log_format": ""},
            {"log_text": "no format"},
        ]
        for event in events:
            event = {**base, **event}
            if event.get("log_level", 0) is None:
                del event["log_level"], event["log_namespace"]
            self.assertEqual(Lines()(dict(event)), formatEventAsClassicLogText(dict(event)), event)

    def test_json_lines_as_twisted_writes_them(self) -> None:
        """JsonLines (the JSON observer's formatter) gives Twisted's eventAsJSON line for
        every kind of event, character for character, and leaves the event flattened as
        Twisted does; what Twisted cannot write it cannot either."""
        try:
            1 / 0
        except ZeroDivisionError:
            failure = Failure()
        base = {"log_level": LogLevel.info, "log_namespace": "odissey.client", "log_time": 1700000000.5,
                "log_logger": OdisseyLogger(namespace="odissey.client"), "log_source": None}
        events = [
            {"log_format": "{id}: login {user}@{database} from {client}", "id": "c1", "user": "app",
             "database": "db", "client": "127.0.0.1", "connection": True},
            {"log_format": "{id}: logout after {seconds:.1f}s", "id": "c1", "seconds": 2.25},
            {"log_format": "{n} and {n} and {n!r} and {n:>3} and {n!a}", "n": "x\u00e9"},
            {"log_format": "{n:/2} {n} {n!r} {n}", "n": 1},  # (a key Twisted has seen: skipped)
            {"log_format": "{kind!r} from {who.name}", "kind": "Z", "who": LogLevel.info},
            {"log_format": "{items[0]} {items}", "items": [1]},
            {"log_format": "called {f()}", "f": lambda: "yes"},
            {"log_format": "bytes {b}", "b": b"\xff\x00", "nested": {1: "skipped", "k": [b"v", None]}},
            {"log_format": "{level} {logger}", "level": LogLevel.warn, "logger": Logger(), "other": object()},
            {"log_format": "failed {n}", "n": 4, "log_failure": failure},
            {"log_format": "{n}", "n": 5, "log_flattened": {"n!s:": "five"}},
            {"log_format": None},
            {"log_format": ""},
            {"log_text": "no format", "log_level": LogLevel.error, "log_logger": Logger(namespace="legacy")},
            {"log_format": "{n}", "n": float("nan"), "log_time": None},
        ]
        lines = JsonLines()
        self.patch(JsonLines, "PLANS", 5)  # (the plans kept are dropped, and made again)
        for event in events + events:
            event = {**base, **event}
            ours, theirs = dict(event), dict(event)
            self.assertEqual(lines(ours), eventAsJSON(theirs) + "\n", event)
            self.assertEqual(ours.keys(), theirs.keys())
        for bad in ({"log_format": "{missing} field"}, {"log_format": "unbalanced {"}, {"log_format": "{0}"},
                    {"log_format": b"bytes {n}", "n": 3}):
            event = {**base, **bad}
            with self.assertRaises(Exception) as twisted_raised:
                eventAsJSON(dict(event))
            ours = dict(event)
            with self.assertRaises(type(twisted_raised.exception)):
                lines(ours)
            self.assertEqual(ours, event)

    def test_json_without_twisteds_private_modules(self) -> None:
        """A Twisted that moved the flattening's keys or savers: eventAsJSON writes."""
        event = {"log_format": "{id}: x", "id": "c1", "log_level": LogLevel.info, "log_time": 1.5}
        for module in ("twisted.logger._flatten", "twisted.logger._json"):
            kept = sys.modules[module]
            sys.modules[module] = None  # type: ignore[assignment]  # (importing it raises)
            try:
                self.assertRaises(ImportError, JsonLines)
                observer = Observer(LogSettings(format="json"), io.StringIO())
            finally:
                sys.modules[module] = kept
            self.assertNotIsInstance(observer._json.formatEvent, JsonLines)
            self.assertEqual(observer._json.formatEvent(dict(event)), eventAsJSON(dict(event)) + "\n")
        self.assertIsInstance(Observer(LogSettings(format="json"), io.StringIO())._json.formatEvent, JsonLines)

    def test_json(self) -> None:
        """format: json writes one JSON object per line, with the event's fields."""
        self.observer.settings = LogSettings(format="json")
        self.log.info("{id}: login failed for {user}", id="c3", user="app")
        line = self.stream.getvalue()
        self.assertTrue(line.endswith("\n") and line.count("\n") == 1, line)
        event = json.loads(line)
        self.assertEqual((event["id"], event["user"], event["log_namespace"]), ("c3", "app", "odissey.test"))
        self.assertEqual(event["log_format"], "{id}: login failed for {user}")


class TwistdTextTests(SynchronousTestCase):
    """Without a ``log`` section, twistd's own text observer writes Lines' text."""

    def test_twistd_observer_formats_with_lines(self) -> None:
        """The observer twistd makes for ``-n`` (standard output) and for ``--logfile``
        is found and formats with Lines from then on; what it writes is unchanged."""
        options = ServerOptions()
        options.parseOptions(["--nodaemon", "--pidfile=", "--logfile", "-"])
        made = UnixAppLogger(options)._getLogObserver()  # (what twistd logs to)
        self.assertEqual(speed_up_twistd_text(LogPublisher(made)), 1)
        self.assertIsInstance(made.formatEvent, Lines)
        stream, twisted_stream = io.StringIO(), io.StringIO()
        ours, theirs = textFileLogObserver(stream), textFileLogObserver(twisted_stream)
        publisher = LogPublisher(ours)
        log = Logger(namespace="odissey.client", observer=publisher)
        log.info("{id}: login {user}@{database}", id="c1", user="app", database="db")
        self.assertEqual(speed_up_twistd_text(publisher), 1)
        self.assertIsInstance(ours.formatEvent, Lines)
        Logger(namespace="odissey.client", observer=LogPublisher(theirs)).info(
            "{id}: login {user}@{database}", id="c1", user="app", database="db")
        log.info("{id}: login {user}@{database}", id="c1", user="app", database="db")
        lines = stream.getvalue().splitlines()
        self.assertEqual(len(lines), 2)
        # (the two lines' timestamps may differ by a second; the rest is the same text)
        self.assertEqual({line.split(" ", 1)[1] for line in lines},
                         {twisted_stream.getvalue().rstrip("\n").split(" ", 1)[1]})

    def test_started_processes_speed_it_up(self) -> None:
        """Odissey's root service, single process or master, changes twistd's observer
        when it starts as the process's service, not as a test's."""
        called: list[str] = []
        self.patch(service, "speed_up_twistd_text", lambda: called.append("service"))
        self.patch(workers, "speed_up_twistd_text", lambda: called.append("master"))
        self.patch(workers.Master, "_start", lambda master: Deferred())
        cfg = parse(minimal())
        for process in (False, True):
            clock = MemoryReactorClock()
            clock.getThreadPool = lambda: None  # type: ignore[attr-defined]
            odissey = service.OdisseyService(cfg, clock, process=process)
            odissey.threads = in_this_thread
            odissey.startService()
        workers.Master(parse({**minimal(), "workers": 2}), MemoryReactorClock(), in_this_thread).startService()
        self.assertEqual(called, ["service", "master"])

    def test_other_observers_left_alone(self) -> None:
        """JSON, another time format, another formatter or a plain callable keep their own."""
        stream = io.StringIO()
        others = [jsonFileLogObserver(stream), textFileLogObserver(stream, timeFormat="%H:%M"),
                  FileLogObserver(stream, lambda event: "x\n"), lambda event: None]
        formatters = [getattr(observer, "formatEvent", None) for observer in others]
        self.assertEqual(speed_up_twistd_text(LogPublisher(*others)), 0)
        self.assertEqual([getattr(observer, "formatEvent", None) for observer in others], formatters)


class LogConfigTests(SynchronousTestCase):
    def test_section(self) -> None:
        """The log section parses, YAML's on/off included; absent means twistd's logging."""
        self.assertIsNone(parse(minimal()).log)
        document = {**minimal(), "log": {"format": "json", "level": "warn", "connections": False}}
        self.assertEqual(parse(document).log, LogSettings("json", "warn", False))
        self.assertEqual(parse({**minimal(), "log": {}}).log, LogSettings())

    def test_mistakes(self) -> None:
        """Bad values are named by key path."""
        from odissey.config import ConfigError
        with self.assertRaises(ConfigError) as caught:
            parse({**minimal(), "log": {"format": "xml", "level": "loud", "connections": "yes"}})
        problems = caught.exception.problems
        self.assertIn('log.format: must be text or json, got "xml"', problems)
        self.assertIn('log.level: must be debug or info or warn or error, got "loud"', problems)
        self.assertIn('log.connections: must be on or off, got "yes"', problems)
