"""Client parameters carried across server connections.

Each client has the values it wants (the server defaults, overridden by its startup
packet, then by every ParameterStatus its server sends while attached); each server
connection has its current values. On attach the differences become one
``SET …; SET …`` query. Names are compared case-insensitively, as PostgreSQL does.

Values are text, decoded from the encoding the server connection was in when it
reported them, and always sent back as UTF-8 while the connection's client_encoding is
UTF8: a server left in another client's LATIN1 or SJIS first gets ``SET client_encoding``
alone (ASCII, read the same in every encoding PostgreSQL allows a client), so no value's
bytes are ever read in an encoding they were not written in (with SJIS and
``backslash_quote = on`` that would let a crafted value end its quoted literal).
"""

from __future__ import annotations

from typing import Callable, Iterable, Mapping

#: Startup keys that are not run-time parameters.
NOT_PARAMETERS = frozenset({"user", "database", "replication", "options"})

#: Reported parameters a client cannot (or must not) change through the pooler.
READ_ONLY = frozenset({
    "server_version", "server_encoding", "integer_datetimes", "is_superuser",
    "session_authorization", "in_hot_standby", "scram_iterations",
})

Params = dict[str, tuple[str, str]]  # lower-case name -> (name as spelled, value)


#: PostgreSQL's client encodings (as reported) -> Python codecs. SQL_ASCII passes bytes
#: through, as latin-1 does; EUC_TW and MULE_INTERNAL have no codec and fall back to it.
CODECS = {
    "UTF8": "utf-8", "SQL_ASCII": "latin-1", "LATIN1": "latin-1", "LATIN2": "iso8859-2",
    "LATIN3": "iso8859-3", "LATIN4": "iso8859-4", "LATIN5": "iso8859-9", "LATIN6": "iso8859-10",
    "LATIN7": "iso8859-13", "LATIN8": "iso8859-14", "LATIN9": "iso8859-15", "LATIN10": "iso8859-16",
    "ISO_8859_5": "iso8859-5", "ISO_8859_6": "iso8859-6", "ISO_8859_7": "iso8859-7",
    "ISO_8859_8": "iso8859-8", "WIN866": "cp866", "WIN874": "cp874", "WIN1250": "cp1250",
    "WIN1251": "cp1251", "WIN1252": "cp1252", "WIN1253": "cp1253", "WIN1254": "cp1254",
    "WIN1255": "cp1255", "WIN1256": "cp1256", "WIN1257": "cp1257", "WIN1258": "cp1258",
    "KOI8R": "koi8-r", "KOI8U": "koi8-u", "EUC_JP": "euc_jp", "EUC_JIS_2004": "euc_jis_2004",
    "EUC_CN": "gb2312", "EUC_KR": "euc_kr", "SJIS": "cp932", "SHIFT_JIS_2004": "shift_jis_2004",
    "BIG5": "cp950", "GBK": "gbk", "GB18030": "gb18030", "UHC": "cp949", "JOHAB": "johab",
}


class Fingerprints:
    """One shared object per distinct parameter set, so that a relay compares what its
    client wants with what a server has by identity: comparing the two dicts on every
    attach costs 1.7 µs under CPython and 8 µs under PyPy, a large part of a
    transaction. Each side recomputes its fingerprint only after its values changed."""

    LIMIT = 1024  # distinct sets remembered; past it the memory starts afresh

    def __init__(self) -> None:
        self._known: dict[frozenset[tuple[str, tuple[str, str]]], frozenset[tuple[str, tuple[str, str]]]] = {}
        #: Bumped when the memory starts afresh: a fingerprint kept from before (a pool's
        #: memo of logins) is then to be taken again.
        self.generation = 0

    def of(self, params: Params) -> frozenset[tuple[str, tuple[str, str]]]:
        key = frozenset(params.items())
        known = self._known.get(key)
        if known is None:
            if len(self._known) >= self.LIMIT:
                self._known.clear()  # (equal sets may then differ in identity: a slower, still right, path)
                self.generation += 1
            known = self._known[key] = key
        return known


def codec_for(encoding: str) -> str:
    return CODECS.get(encoding.upper(), "latin-1")


def params_from(pairs: Iterable[tuple[str, str]]) -> Params:
    return {name.lower(): (name, value) for name, value in pairs}


def login_parameters(
    wanted: Params, told: Mapping[str, str], wants: Iterable[tuple[str, str]],
    canonical: Callable[[str, str], str],
) -> tuple[Params, dict[str, str]]:
    """A login's wanted and told parameters: the servers' (``wanted``, and ``told`` as
    the client hears them), with the startup packet's ``wants`` applied. A parameter the
    servers report keeps their spelling of its name and takes its value as PostgreSQL
    reports it (``canonical(key, value)``); the others are carried as the client wrote them."""
    wanted, told = dict(wanted), dict(told)
    for name, value in wants:
        key = name.lower()
        if key in wanted:
            name = wanted[key][0]
            value = canonical(key, value)
            told[key] = value
        wanted[key] = (name, value)
    return wanted, told


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


def set_statements(changes: list[tuple[str, str | None]], wanted: Params, current: Params) -> list[str]:
    """The queries that apply ``changes`` to a server whose parameters are ``current``.

    Run while the server's client_encoding is UTF8 (switching it first, in a query of its
    own, if it is not), with client_encoding itself set last."""
    encoding = current.get("client_encoding", ("client_encoding", "UTF8"))[1]
    if encoding.upper() in ("UTF8", "UNICODE"):
        return [set_query(changes)]
    rest = [(name, value) for name, value in changes if name.lower() != "client_encoding"]
    back = wanted.get("client_encoding", ("client_encoding", encoding))
    if back[1].upper() not in ("UTF8", "UNICODE"):
        rest.append(back)
    return ["SET client_encoding TO 'UTF8'"] + ([set_query(rest)] if rest else [])


#: Parameters PostgreSQL reads as a list of possibly quoted names (GUC_LIST_QUOTE): from
#: a startup packet, ``search_path=a,b`` is two schemas, while ``SET search_path TO
#: 'a,b'`` is one schema called "a,b". ``set_config`` reads its value as the startup
#: packet does.
_LIST_QUOTED = frozenset(("search_path", "temp_tablespaces", "session_preload_libraries",
                          "local_preload_libraries"))


def set_query(changes: list[tuple[str, str | None]], local: bool = False) -> str:
    verb = "SET LOCAL" if local else "SET"
    return "; ".join(
        f"RESET {quote_ident(name)}" if value is None
        else f"SELECT pg_catalog.set_config({quote_literal(name)}, {quote_literal(value)}, {str(local).lower()})"
        if name.lower() in _LIST_QUOTED
        else f"{verb} {quote_ident(name)} TO {quote_literal(value)}"
        for name, value in changes
    )
