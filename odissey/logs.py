"""Where Odissey's log goes and what it keeps: the ``log`` section's observer.

Without a ``log`` section twistd's own observer is used (``--logfile``, ``--syslog``, or
standard output with ``-n``), its text lines written by :class:`Lines` once Odissey
starts (:func:`speed_up_twistd_text`). With one, Odissey's observer writes to standard
output (the journal under systemd) as text lines or one JSON object per line
(twisted.logger's ``eventAsJSON``, every field of the event kept, so a line can be
filtered by ``id`` or ``pool``), drops events below ``level`` and, with
``connections: off``, the lines about routine connection events (logins, logouts),
which are marked with :data:`CONNECTION`. A reload replaces the observer's settings in
place. Every module logs through :class:`Logger`.
"""

from __future__ import annotations

import json
import string
import sys
from time import time
from typing import IO, Any, Callable, Optional

from twisted.logger import (
    FileLogObserver,
    ILogObserver,
    LogLevel,
    LogPublisher,
    eventAsJSON,
    formatEventAsClassicLogText,
    formatTime,
    globalLogPublisher,
    timeFormatRFC3339,
)
from twisted.logger import Logger as TwistedLogger
from twisted.python.components import Componentized
from zope.interface import implementer

from odissey.config import LogSettings

#: The event field that marks a routine line about one connection (``connections: off``
#: drops it): ``log.info("...", connection=CONNECTION_EVENT, ...)``.
CONNECTION = "connection"
CONNECTION_EVENT = True

LEVELS = {"debug": LogLevel.debug, "info": LogLevel.info, "warn": LogLevel.warn,
          "error": LogLevel.error}


class Logger(TwistedLogger):
    """twisted.logger's ``Logger``, less its check that an event's level is one of
    ``LogLevel``'s, for which Twisted sorts ``LogLevel``'s constants at every event: a
    quarter of what a login line costs under PyPy, a fifth under CPython. Odissey emits
    only through the level methods (``info``, ``warn``...), which pass a ``LogLevel``."""

    def emit(self, level: LogLevel, format: Optional[str] = None, **kwargs: object) -> None:
        kwargs.update(log_logger=self, log_level=level, log_namespace=self.namespace,
                      log_source=self.source, log_format=format, log_time=time())
        if "log_trace" in kwargs:
            kwargs["log_trace"].append((self, self.observer))  # type: ignore[attr-defined]
        self.observer(kwargs)


class SecondStamps:
    """twisted.logger's ``formatTime``, remembered for the current second (its format
    shows whole seconds). Twisted builds three datetimes per line to find the local
    offset: with a login and a logout line per connection, that was a fifth of a line's
    cost under CPython and two thirds under PyPy, whose datetime is written in Python."""

    def __init__(self) -> None:
        self._second: int | None = None
        self._stamp = "-"

    def __call__(self, when: Optional[float]) -> str:
        if when is None:
            return formatTime(when)
        second = int(when)
        if second != self._second:
            self._second, self._stamp = second, formatTime(when)
        return self._stamp


class Lines:
    """twisted.logger's classic text line (``formatEventAsClassicLogText``), written
    out for the events Odissey itself logs: a plain ``str.format_map`` of the event,
    where Twisted parses the format string anew in Python for each line (``string.
    Formatter``): 1.4 µs a line instead of 11 under CPython, 0.8 instead of 3 under
    PyPy. Anything the plain call does not cover goes to Twisted's formatter, which
    gives the same text: a failure's traceback, a flattened or non-text format, a field
    Twisted calls (``{f()}``), a field the event lacks. (One difference, in no format
    Odissey or Twisted writes: Twisted 26 hands each field to the format wrapped, so
    ``{x.__class__}`` names its wrapper there and the value's class here.) Timestamps
    are :class:`SecondStamps`'."""

    def __init__(self) -> None:
        self.stamps = SecondStamps()

    def __call__(self, event: dict[str, Any]) -> Optional[str]:
        form = event.get("log_format")
        if type(form) is not str or "log_failure" in event or "log_flattened" in event:
            return formatEventAsClassicLogText(event, self.stamps)
        try:
            text = form.format_map(event)
        except BaseException:  # (Twisted's formatter then says what it could not format)
            return formatEventAsClassicLogText(event, self.stamps)
        if not text:
            return None
        system = event.get("log_system")
        if system is None:
            level = event.get("log_level")
            system = f"{event.get('log_namespace', '-')}#{'-' if level is None else level.name}"
        else:
            try:
                system = str(system)
            except Exception:
                system = "UNFORMATTABLE"
        stamp = self.stamps(event.get("log_time"))
        return f"{stamp} [{system}] {text}".replace("\n", "\n\t") + "\n"


class JsonLines:
    """twisted.logger's JSON line (``eventAsJSON``, as ``jsonFileLogObserver`` writes it
    without a record separator), written out for the events Odissey itself logs: the
    fields a format names are flattened from a plan made once per format string, where
    Twisted parses the format anew and looks each field up through ``string.Formatter``,
    and the event is encoded by one encoder kept for the purpose, with the log level and
    the logger (in every event) turned into what Twisted writes for them without its
    search through its savers. A login line, from ``Logger.info`` to the stream, costs
    10 µs instead of 24 under CPython, 6 instead of 10 under PyPy. Anything a plan does
    not cover (a field that is not a plain name, an event already flattened, a format
    that is not text) goes to Twisted's ``eventAsJSON``, which gives the same text, or
    the same exception.

    The keys and the savers are Twisted's own, from its private modules: a Twisted that
    moved them raises ImportError here, and :func:`json_lines` writes with
    ``eventAsJSON`` instead."""

    #: Plans kept, at most (formats are Odissey's own, a few dozen; this only bounds them).
    PLANS = 512

    def __init__(self) -> None:
        from twisted.logger._flatten import KeyFlattener
        from twisted.logger._json import objectSaveHook

        self._keys = KeyFlattener
        self._save = objectSaveHook
        #: What Twisted writes for each log level (its saver's dict, with the class's UUID).
        self._levels = {level: objectSaveHook(level) for level in LogLevel.iterconstants()}
        #: Per format string: (flattened key, structured key, field, repr?) for each
        #: field in Twisted's order, or None when Twisted must flatten it.
        self._plans: dict[str, Optional[tuple[tuple[str, str, str, bool], ...]]] = {}
        self._encoder = json.JSONEncoder(skipkeys=True, default=self._default)  # (eventAsJSON's dumps)

    def __call__(self, event: dict[str, Any]) -> str:
        form = event.get("log_format")
        if type(form) is not str or "log_flattened" in event:
            return f"{eventAsJSON(event)}\n"
        try:
            plan = self._plans[form]
        except KeyError:
            if len(self._plans) >= self.PLANS:
                self._plans.clear()
            plan = self._plans[form] = self._flattening(form)
        if plan is None:
            return f"{eventAsJSON(event)}\n"
        if plan:
            fields: dict[str, Any] = {}
            for flat, structured, name, as_repr in plan:
                try:
                    value = event[name]
                except KeyError:  # (Twisted raises it, and says so)
                    return f"{eventAsJSON(event)}\n"
                fields[flat] = repr(value) if as_repr else str(value)
                fields[structured] = value
            event["log_flattened"] = fields  # (Twisted's flattenEvent leaves it on the event too)
        return f"{self._encoder.encode(event)}\n"

    def _flattening(self, form: str) -> Optional[tuple[tuple[str, str, str, bool], ...]]:
        """What Twisted's ``flattenEvent`` does with ``form``'s fields, when each is a
        plain name (``{id}``, ``{seconds:.1f}``, ``{why!r}``); None otherwise (attributes,
        items, calls, positions, a format Python cannot parse)."""
        keys = self._keys()  # (Twisted's own keys: a repeated field's key gets "/2", ...)
        plan = []
        seen: set[str] = set()
        try:
            for _text, name, spec, conversion in _FORMATTER.parse(form):
                if name is None:
                    continue
                if not name.isidentifier():
                    return None
                conversion = "r" if conversion == "r" else "s"
                flat, structured = keys.flatKey(name, spec, conversion), keys.flatKey(name, spec, "")
                if flat not in seen:  # (Twisted skips a key it has, after counting it)
                    seen.add(flat)
                    plan.append((flat, structured, name, conversion == "r"))
        except ValueError:
            return None
        return tuple(plan)

    def _default(self, value: object) -> object:
        """``eventAsJSON``'s encoder default, with its two usual cases answered first:
        the event's level and its logger (which no saver takes: "unpersistable")."""
        if type(value) is _LEVEL:
            saved = self._levels.get(value)
            if saved is not None:
                return saved
        elif isinstance(value, TwistedLogger):
            return {"unpersistable": True}
        if isinstance(value, bytes):
            return value.decode("charmap")
        return self._save(value)


def json_lines() -> Callable[[dict[str, Any]], str]:
    """The JSON observer's formatter: :class:`JsonLines`, or ``eventAsJSON`` itself with
    a Twisted that keeps what JsonLines needs elsewhere."""
    try:
        return JsonLines()
    except ImportError:
        return lambda event: f"{eventAsJSON(event)}\n"


_FORMATTER = string.Formatter()
_LEVEL = type(LogLevel.info)


@implementer(ILogObserver)
class Observer:
    """The ``log`` section's observer; :attr:`settings` may be replaced (reload)."""

    def __init__(self, settings: LogSettings, stream: IO[str]) -> None:
        # (twisted.logger's textFileLogObserver, with the lines written out)
        self._text = FileLogObserver(stream, Lines())
        self._json = FileLogObserver(stream, json_lines())
        self.settings = settings

    @property
    def settings(self) -> LogSettings:
        return self._settings

    @settings.setter
    def settings(self, settings: LogSettings) -> None:
        """Each event is judged by what the settings come to, worked out here once: the
        levels dropped, whether connection lines are, and the writer."""
        self._settings = settings
        self._dropped = frozenset(level for level in LogLevel.iterconstants() if level < LEVELS[settings.level])
        self._connections = settings.connections
        self._write = self._json if settings.format == "json" else self._text

    def keeps(self, event: dict[str, Any]) -> bool:
        if event.get("log_level", LogLevel.info) in self._dropped:
            return False
        return self._connections or not event.get(CONNECTION)

    def __call__(self, event: dict[str, Any]) -> None:
        if self.keeps(event):
            self._write(event)


def observe_for(settings: Optional[LogSettings], parent: object) -> Optional[Observer]:
    """Under twistd (the plugin or the .tac) a service's parent is the application:
    with a ``log`` section, Odissey's observer is set on it, where twistd looks for one
    when it starts logging (after building the service, before starting it)."""
    if settings is None or not isinstance(parent, Componentized):
        return None
    observer = Observer(settings, sys.stdout)
    parent.setComponent(ILogObserver, observer)
    return observer


def speed_up_twistd_text(publisher: LogPublisher = globalLogPublisher) -> int:
    """Without a ``log`` section twistd logs through its own text observer (to
    ``--logfile``, or standard output with ``-n``), whose formatter parses each line's
    format string in Python: about 11 µs a line under CPython, 3 under PyPy, two lines
    per connection. That observer formats with :class:`Lines` from here on, which gives
    the same text; its file, rotation and flushing stay twistd's. Only an observer
    made by Twisted's ``textFileLogObserver`` with its default time format is changed
    (anything else, such as ``--syslog`` or ``--logger``, is left as it is). Returns how
    many were changed."""
    changed = 0
    for observer in list(getattr(publisher, "_observers", ())):
        format_event = getattr(observer, "formatEvent", None)
        if (type(observer) is FileLogObserver
                and getattr(format_event, "__qualname__", "") == "textFileLogObserver.<locals>.formatEvent"
                and _closure(format_event).get("timeFormat", None) == timeFormatRFC3339):
            observer.formatEvent = Lines()
            changed += 1
    return changed


def _closure(function: Any) -> dict[str, Any]:
    """The values a nested function closes over, by name."""
    cells = getattr(function, "__closure__", None) or ()
    return {name: cell.cell_contents for name, cell in zip(function.__code__.co_freevars, cells)}
