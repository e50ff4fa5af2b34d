"""The (method, path) check of inspect mode: pure values and functions, no I/O, no mitmproxy.

::

    request-target ──normalize_path──▶ "/repos/acme/x"  or  Refusal (ambiguous: never judged, never allowed)
                                            │
    method, Inspect(entries) ──check_request──▶ RequestDecision(allowed, reason, entry file:line, path)

Paths are matched as the server should see them, so a trick that spells a forbidden path differently cannot pass
as an allowed one. :func:`normalize_path` takes the path of an origin-form target (``/a/b?q``) or of an
absolute-form one (``https://host/a/b``; binding its authority to the SNI is the caller's job), drops the query
and fragment, then per segment: a raw ``;`` or ``\\``, a control character, a byte outside ASCII, invalid
percent-encoding (``%zz``, ``%4``), and, once decoded, ``/`` (``%2F``), ``\\``, ``;``, ``%`` (``%25``: a server
that decodes twice would see another path), a control character or text that is not UTF-8 are refused. Doubled
slashes are collapsed, then dot segments (``.``, ``..``, also ``%2e%2e`` once decoded) are resolved; ``..`` above
the root is refused. ``*`` (asterisk-form) and ``host:port`` (authority-form) have no path: refused. Case is
kept: ``/REPOS/acme`` is not ``/repos/acme``.

A normalised path is ``/`` followed by segments joined with ``/``; only the last may be empty (a trailing
slash). A pattern is anchored at both ends, segment by segment: a literal segment equals the decoded segment,
``*`` is exactly one non-empty segment, ``**`` zero or more segments (so ``/repos/acme/**`` matches
``/repos/acme``, ``/repos/acme/`` and everything under it). Methods are compared exactly (upper case, no
wildcard, ``HEAD`` is not implied by ``GET``). A request is allowed when one entry lists its method and one of
that entry's paths matches.

The worker that uses this should forward the normalised path (re-encoded), not the raw one, so the origin
serves what was checked.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field

from egressd.policy.model import Reason, Verdict

__all__ = [
    "Inspect", "InspectEntry", "Refusal", "RequestDecision", "check_request", "describe", "inspect_unavailable",
    "match_path", "normalize_path", "parse_method", "parse_path", "path_covers",
]

ONE = "*"  # exactly one non-empty segment
ANY = "**"  # zero or more segments
_METHOD = re.compile(r"[A-Z][A-Z0-9_-]{0,31}\Z")
_LITERAL = re.compile(r"[A-Za-z0-9\-._~!$&'()+,=:@]+\Z")  # RFC 3986 pchar without "%", ";" and "*"
_ABSOLUTE = re.compile(r"https?://", re.IGNORECASE)
_HEX = frozenset("0123456789abcdefABCDEF")
_REFUSED_BYTES = {ord("/"): "an encoded slash (%2F)", ord("\\"): "an encoded backslash (%5C)",
                  ord(";"): "an encoded ';' (%3B)", ord("%"): "an encoded '%' (%25, a double encoding)"}


@dataclass(frozen=True, slots=True)
class InspectEntry:
    """One entry of a rule's ``inspect:``: the methods and path patterns it allows, and where it was written.

    ``compiled`` holds each pattern as segments (``ONE``/``ANY`` for the wildcards); it, ``source`` and
    ``column`` take no part in equality, so two entries are equal when they allow the same requests as written.
    """

    methods: frozenset[str]
    paths: tuple[str, ...]
    compiled: tuple[tuple[str, ...], ...] = field(compare=False)
    source: str = field(default="", compare=False)
    column: int | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not self.methods or not self.paths or len(self.paths) != len(self.compiled):
            raise ValueError("an inspect entry has methods and paths, each pattern compiled")

    def allows(self, method: str, segments: tuple[str, ...]) -> bool:
        return method in self.methods and any(match_path(pattern, segments) for pattern in self.compiled)

    def __str__(self) -> str:
        """``GET HEAD /repos/acme/**, /orgs/acme``: the methods (sorted), then the paths as written."""
        return f"{' '.join(sorted(self.methods))} {', '.join(self.paths)}"


@dataclass(frozen=True, slots=True)
class Inspect:
    """A rule's whole ``inspect:`` list (or the entries of several rules, merged by decide): never empty."""

    entries: tuple[InspectEntry, ...]

    def __post_init__(self) -> None:
        if not self.entries:
            raise ValueError("an inspect list has at least one entry")

    def joined(self, others: Iterable[Inspect]) -> Inspect:
        """These entries, then those of ``others``, in order: a request is allowed when one of them allows it."""
        more = tuple(entry for other in others for entry in other.entries)
        return Inspect(self.entries + more) if more else self


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a request-target's path is not judged: what is wrong with it, as a record or ``egressd check`` says."""

    message: str


@dataclass(frozen=True, slots=True)
class RequestDecision:
    """The outcome of :func:`check_request`.

    ``reason`` is ``allowed`` or ``request_not_allowed`` (also for a path :func:`normalize_path` refuses, whose
    message is ``refusal``); ``entry`` is the entry that allowed it; ``path`` the normalised path (None when
    refused).
    """

    verdict: Verdict
    reason: Reason
    entry: InspectEntry | None = None
    path: str | None = None
    refusal: str | None = None

    @property
    def allowed(self) -> bool:
        return self.verdict is Verdict.ALLOW

    @property
    def source(self) -> str | None:
        return self.entry.source if self.entry is not None else None


def check_request(inspect: Inspect, method: str, target: str | bytes) -> RequestDecision:
    """Whether ``inspect`` allows ``method`` on the request-target ``target`` (raw, as the client sent it).

    1. A target :func:`normalize_path` refuses -> DENY ``request_not_allowed``, with the refusal.
    2. The first entry that lists ``method`` and has a pattern matching the normalised path -> ALLOW ``allowed``.
    3. Otherwise DENY ``request_not_allowed``.
    """
    path = normalize_path(target)
    if isinstance(path, Refusal):
        return RequestDecision(Verdict.DENY, Reason.REQUEST_NOT_ALLOWED, refusal=path.message)
    segments = tuple(path[1:].split("/"))
    for entry in inspect.entries:
        if entry.allows(method, segments):
            return RequestDecision(Verdict.ALLOW, Reason.ALLOWED, entry, path)
    return RequestDecision(Verdict.DENY, Reason.REQUEST_NOT_ALLOWED, path=path)


def normalize_path(raw: str | bytes) -> str | Refusal:
    """The path of request-target ``raw`` as matching sees it, or a :class:`Refusal` (see the module docstring)."""
    if isinstance(raw, bytes):
        try:
            text = raw.decode("ascii")
        except UnicodeDecodeError:
            return Refusal("the request target has a byte outside ASCII")
    else:
        text = raw
        if not text.isascii():
            return Refusal("the request target has a character outside ASCII")
    if any(char <= " " or char == "\x7f" for char in text):
        return Refusal("the request target has a space or control character")
    if not text.startswith("/"):
        absolute = _ABSOLUTE.match(text)
        if text == "*":
            return Refusal('the request target is "*" (asterisk-form), which names no path')
        if absolute is None:
            return Refusal("the request target is neither a path nor an http(s) URL (a CONNECT authority has no path)")
        rest = text[absolute.end() :]
        end = min((at for at in (rest.find(c) for c in "/?#") if at >= 0), default=len(rest))
        text = rest[end:] if rest[end:].startswith("/") else "/"
    end = min((at for at in (text.find("?"), text.find("#")) if at >= 0), default=len(text))
    raw_segments = text[1:end].split("/")
    segments: list[str] = []
    for at, raw_segment in enumerate(raw_segments):
        if raw_segment or at == len(raw_segments) - 1:  # doubled slashes collapse; a trailing one stays
            decoded = _decode(raw_segment)
            if isinstance(decoded, Refusal):
                return decoded
            segments.append(decoded)
    resolved: list[str] = []
    for at, segment in enumerate(segments):
        if segment == "..":
            if not resolved:
                return Refusal('the path climbs above the root with ".."')
            resolved.pop()
        elif segment != ".":
            resolved.append(segment)
            continue
        if at == len(segments) - 1:  # "/a/." and "/a/b/.." end in a slash, as RFC 3986 resolves them
            resolved.append("")
    return "/" + "/".join(resolved or [""])


def _decode(segment: str) -> str | Refusal:
    """One raw segment, percent-decoded as UTF-8, or why it is refused."""
    if ";" in segment:
        return Refusal('the path has a ";" parameter, which servers read differently')
    if "\\" in segment:
        return Refusal('the path has a "\\", which some servers read as "/"')
    if "%" not in segment:
        return segment
    data = bytearray()
    at = 0
    while at < len(segment):
        if segment[at] != "%":
            data.append(ord(segment[at]))
            at += 1
            continue
        digits = segment[at + 1 : at + 3]
        if len(digits) != 2 or not _HEX.issuperset(digits):
            return Refusal(f'the path has invalid percent-encoding ("{segment[at:at + 3]}")')
        data.append(int(digits, 16))
        at += 3
    for byte in data:
        if byte in _REFUSED_BYTES:
            return Refusal(f"the path has {_REFUSED_BYTES[byte]}, which servers read differently")
        if byte < 0x20 or byte == 0x7F:
            return Refusal(f"the path has an encoded control character (%{byte:02X})")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return Refusal("the path's percent-encoding is not UTF-8 text")


def match_path(pattern: tuple[str, ...], segments: tuple[str, ...]) -> bool:
    """Whether the compiled ``pattern`` matches all of ``segments`` (a normalised path split after its first "/").

    Greedy, backtracking only to the last ``**``: O(len(pattern) * len(segments)), whatever the pattern.
    """
    p = s = 0
    star_p = star_s = -1
    while s < len(segments):
        if p < len(pattern) and pattern[p] == ANY:
            star_p, star_s = p, s
            p += 1
        elif p < len(pattern) and (pattern[p] == segments[s] or (pattern[p] == ONE and segments[s] != "")):
            p += 1
            s += 1
        elif star_p >= 0:
            star_s += 1
            p, s = star_p + 1, star_s
        else:
            return False
    while p < len(pattern) and pattern[p] == ANY:
        p += 1
    return p == len(pattern)


def path_covers(wide: tuple[str, ...], narrow: tuple[str, ...]) -> bool:
    """Whether every path the compiled ``narrow`` matches is matched by ``wide`` (for the review diff).

    ``**`` covers any run of segments, ``*`` any one non-empty segment (a literal or ``*``), a literal itself.
    """
    if not wide:
        return not narrow
    if wide[0] == ANY:
        return any(path_covers(wide[1:], narrow[n:]) for n in range(len(narrow) + 1))
    if not narrow or narrow[0] == ANY or (wide[0] == ONE and narrow[0] == ""):
        return False
    return (wide[0] == ONE or wide[0] == narrow[0]) and path_covers(wide[1:], narrow[1:])


def describe(inspect: Inspect) -> str:
    """The entries in one line, e.g. ``GET /repos/acme/**, /orgs/acme; POST /repos/acme/*/issues``."""
    return "; ".join(str(entry) for entry in inspect.entries)


# The grammar: text in, value out, or ValueError with the whole message (what is wrong; what to write).


def parse_method(text: str) -> str:
    """An HTTP method as an entry lists it: upper case, no wildcard, not CONNECT."""
    if text in ("*", "**") or text.upper() == "ANY":
        raise ValueError(f'method "{text}" is not a wildcard; list the methods the service needs, e.g. [GET, HEAD]')
    if not _METHOD.match(text):
        if _METHOD.match(text.upper()):
            raise ValueError(f'method "{text}" must be upper case (HTTP methods are case-sensitive); '
                             f"write {text.upper()}")
        raise ValueError(f'method "{text}" is not an HTTP method (upper-case letters, digits, "-" and "_"), e.g. GET')
    if text == "CONNECT":
        raise ValueError('method "CONNECT" would open a tunnel inside the inspected one, which nothing inspects; '
                         "remove it")
    return text


def parse_path(text: str) -> tuple[str, ...]:
    """A path pattern compiled to segments, or ValueError naming the problem and an example fix."""
    where = f'path "{text}"'
    absolute = _ABSOLUTE.match(text)
    if absolute is not None:
        rest = text[absolute.end() :]
        raise ValueError(f'{where} is a URL; write only its path, "{rest[rest.find("/") :] if "/" in rest else "/"}"')
    if not text.startswith("/"):
        raise ValueError(f'{where} must start with "/" (patterns are anchored at the root); write "/{text}"')
    for mark, what in (("?", "a query"), ("#", "a fragment")):
        if mark in text:
            raise ValueError(f'{where} has {what} ("{mark}"), which matching ignores; write "{text.split(mark)[0]}"')
    if "%" in text:
        raise ValueError(f'{where} has a percent escape; patterns match the decoded path and take none: write the '
                         'character itself (letters, digits and -._~!$&\'()+,=:@), or "*" for that segment')
    if ";" in text:
        raise ValueError(f'{where} has ";", which requests may not have (servers read parameters differently), so '
                         "it would never match; remove it")
    segments = tuple(text[1:].split("/"))
    for at, segment in enumerate(segments):
        fix = "/" + "/".join(segments[:at] + (ONE,) + segments[at + 1 :])
        if segment == "" and at < len(segments) - 1:
            merged = "/" + "/".join([kept for kept in segments[:-1] if kept] + [segments[-1]])
            raise ValueError(f'{where} has an empty segment ("//"); doubled slashes are collapsed before matching: '
                             f'write "{merged}"')
        if segment in (".", ".."):
            resolved = normalize_path(text)
            fix = f': "{resolved}"' if isinstance(resolved, str) else ""
            raise ValueError(f'{where} has a dot segment ("{segment}"); dot segments are resolved before matching, '
                             f"so write the path they resolve to{fix}")
        if segment == ANY and at > 0 and segments[at - 1] == ANY:
            raise ValueError(f'{where} has "**" twice in a row; one matches any number of segments: write '
                             f'"/{"/".join(segments[:at] + segments[at + 1 :])}"')
        if "*" in segment and segment not in (ONE, ANY):
            raise ValueError(f'{where}: "*" stands for a whole segment, never part of one ("{segment}"); write '
                             f'"*" for any one segment there, e.g. "{fix}"')
        if segment and segment not in (ONE, ANY) and not _LITERAL.match(segment):
            bad = next(char for char in segment if not _LITERAL.match(char))
            raise ValueError(f'{where} has {bad!r}, which a pattern cannot match literally (it takes letters, '
                             f'digits and -._~!$&\'()+,=:@); write "*" for that segment, e.g. "{fix}"')
    return segments


def inspect_unavailable() -> str | None:
    """Why a policy with ``inspect:`` cannot run here (Python too old, mitmproxy missing), or None.

    The loader calls this once per inspected rule; it never imports mitmproxy. Tests patch it.
    """
    if sys.version_info < (3, 12):
        running = f"{sys.version_info.major}.{sys.version_info.minor}"
        return (f"inspect: needs Python 3.12 or newer for mitmproxy; this egressd runs on {running} "
                "(run egressd on Python 3.12 or newer, or remove inspect:)")
    if importlib.util.find_spec("mitmproxy") is None:
        return "inspect: needs mitmproxy, which is not installed; pip install 'egressd[inspect]'"
    return None
