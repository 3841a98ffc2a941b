"""Client parameters carried across server connections.

Each client has the values it wants (the server defaults, overridden by its startup
packet, then by every ParameterStatus its server sends while attached); each server
connection has its current values. On attach the differences become one
``SET …; SET …`` query. Names are compared case-insensitively, as PostgreSQL does.
"""

from __future__ import annotations

from typing import Iterable, Mapping

#: Startup keys that are not run-time parameters.
NOT_PARAMETERS = frozenset({"user", "database", "replication", "options"})

#: Reported parameters a client cannot (or must not) change through the pooler.
READ_ONLY = frozenset({
    "server_version", "server_encoding", "integer_datetimes", "is_superuser",
    "session_authorization", "in_hot_standby", "scram_iterations",
})

Params = dict[str, tuple[str, str]]  # lower-case name -> (name as spelled, value)


def params_from(pairs: Iterable[tuple[str, str]]) -> Params:
    return {name.lower(): (name, value) for name, value in pairs}


def parse_options(options: str) -> list[tuple[str, str]]:
    """``-c name=value`` and ``--name=value`` switches of the ``options`` startup key.

    Backslash escapes a space (and a backslash), as in PostgreSQL's pg_split_opts.
    """
    words, word, escaped = [], [], False
    for ch in options:
        if escaped:
            word.append(ch)
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch.isspace():
            if word:
                words.append("".join(word))
                word = []
        else:
            word.append(ch)
    if word:
        words.append("".join(word))
    pairs = []
    i = 0
    while i < len(words):
        w = words[i]
        setting = None
        if w == "-c" and i + 1 < len(words):
            setting = words[i + 1]
            i += 1
        elif w.startswith("-c") and len(w) > 2:
            setting = w[2:]
        elif w.startswith("--"):
            setting = w[2:]
        if setting and "=" in setting:
            name, value = setting.split("=", 1)
            pairs.append((name.replace("-", "_"), value))
        i += 1
    return pairs


def startup_wants(startup: Mapping[str, str]) -> list[tuple[str, str]]:
    """The run-time parameters a startup packet asks for (options last, as PostgreSQL)."""
    wants = [(k, v) for k, v in startup.items() if k not in NOT_PARAMETERS]
    if "options" in startup:
        wants += parse_options(startup["options"])
    return [(k, v) for k, v in wants if k.lower() not in READ_ONLY]


def differences(
    wanted: Params, current: Params, reported: frozenset[str]
) -> list[tuple[str, str | None]]:
    """What to SET (name, value) or RESET (name, None) to make ``current`` match ``wanted``.

    ``reported`` are the parameters the server reports itself: the client's wanted set
    always covers them. Others exist on a server only because a client asked; a client
    that did not ask gets them reset, so they never leak to it.
    """
    changes: list[tuple[str, str | None]] = []
    for key, (name, value) in wanted.items():
        have = current.get(key)
        if have is None or have[1] != value:
            changes.append((name, value))
    for key, (name, _value) in current.items():
        if key not in wanted and key not in reported:
            changes.append((name, None))
    return changes


def quote_ident(name: str) -> str:
    """``myext.setting`` -> ``"myext"."setting"``: each part a quoted identifier."""
    return ".".join('"' + part.replace('"', '""') + '"' for part in name.split("."))


def quote_literal(value: str) -> str:
    """An escape-string literal, read the same whatever standard_conforming_strings is."""
    return "E'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def set_query(changes: list[tuple[str, str | None]]) -> str:
    return "; ".join(
        f"SET {quote_ident(name)} TO {quote_literal(value)}"
        if value is not None
        else f"RESET {quote_ident(name)}"
        for name, value in changes
    )
