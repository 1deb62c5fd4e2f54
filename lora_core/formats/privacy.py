"""What a file meant to be shared may say about the machine it was made on: nothing.

LoRA files travel: people upload them to model sites, and every metadata value is readable there. A folder as
typed (``/home/alice/photos/cat``) names the user and the folder layout; a workflow can carry the host name. The
functions here turn every absolute path into its base name (``cat``), then replace what is left of the home
directory (``~``), the user name as a path component (``<user>``) and the host name (``<host>``).

Plain strings, JSON-like values (dicts/lists, keys too) and ``safetensors`` metadata dicts are handled; the rules
are textual, so they work for POSIX and Windows paths alike, whatever the machine running them.
"""

from __future__ import annotations

import functools
import getpass
import json
import os
import re
import socket
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

USER_MARK = "<user>"
HOST_MARK = "<host>"
HOME_MARK = "~"

_SEP = r"[\\/]"
# A path segment: no separator, no whitespace, nothing that cannot be in a file name or that ends a quoted value.
_SEGMENT = r"[^\s\\/\"'<>|*?]+"
# A whole string that is an absolute path: POSIX "/x", "~/x", Windows "C:\x" or "C:/x", UNC "\\server\share".
_ABSOLUTE = re.compile(r"^(?:file://)?(?:/|~(?:[\\/]|$)|[A-Za-z]:[\\/]|\\\\)")
# An absolute path inside a longer text: at least two segments (so "/r" or "w/o" are left alone), not preceded by
# a character that would make it part of a word, a relative path or a URL ("https://host/a/b").
_EMBEDDED = re.compile(
    rf"(?<![\w.~:\\/-])(?:file://)?(?:~|[A-Za-z]:|\\\\{_SEGMENT})?(?:{_SEP}{_SEGMENT}){{2,}}{_SEP}?"
)
_NOT_IDENTIFYING = {"localhost", "localhost.localdomain", "(none)"}


@dataclass(frozen=True)
class Identity:
    """What identifies this machine and its user: the home folder, user names and host names."""

    home: str = ""
    users: tuple[str, ...] = ()
    hosts: tuple[str, ...] = ()

    @classmethod
    def of_this_machine(cls) -> Identity:
        users: list[str] = []
        try:
            users.append(getpass.getuser())
        except (KeyError, OSError):  # no user database entry (some containers)
            pass
        users += [os.environ.get(k, "") for k in ("USER", "USERNAME", "LOGNAME")]
        home = ""
        try:
            home = str(Path.home())
        except (KeyError, RuntimeError):
            pass
        if home:
            users.append(Path(home).name)
        hosts: list[str] = []
        try:
            hosts.append(socket.gethostname())
        except OSError:
            pass
        hosts += [os.environ.get(k, "") for k in ("HOSTNAME", "COMPUTERNAME")]
        hosts += [h.split(".", 1)[0] for h in hosts]
        return cls(home=home, users=_unique(users), hosts=_unique(hosts))

    def __post_init__(self) -> None:
        # A home of "/" (some service accounts) would match every path; it identifies nothing anyway.
        home = self.home.rstrip("\\/")
        object.__setattr__(self, "home", "" if re.fullmatch(r"(?:[A-Za-z]:)?", home) else home)
        object.__setattr__(self, "users", _unique(u for u in self.users if len(u) >= 2))
        object.__setattr__(self, "hosts", _unique(h for h in self.hosts if len(h) >= 2
                                                  and h.lower() not in _NOT_IDENTIFYING))


def _unique(items: Iterable[str]) -> tuple[str, ...]:
    out: list[str] = []
    for item in items:
        item = item.strip()
        if item and item.lower() not in (o.lower() for o in out):
            out.append(item)
    return tuple(out)


@functools.lru_cache(maxsize=1)
def this_machine() -> Identity:
    return Identity.of_this_machine()


def base_name(path: str) -> str:
    """The last component of a POSIX or Windows path (``""`` for a root such as ``/`` or ``C:\\``)."""
    if path.startswith("file://"):
        path = path[len("file://"):]
    parts = [p for p in re.split(_SEP, path) if p]
    if not parts or re.fullmatch(r"[A-Za-z]:", parts[-1]):
        return ""
    return parts[-1]


def is_absolute_path(text: str) -> bool:
    """Whether ``text`` as a whole is an absolute POSIX or Windows path (a single line)."""
    return "\n" not in text and bool(_ABSOLUTE.match(text.strip()))


class Redactor:
    """Redacts strings, JSON-like values and metadata dicts for one :class:`Identity`."""

    def __init__(self, identity: Identity | None = None) -> None:
        self.identity = identity if identity is not None else this_machine()
        ident = self.identity
        self._home = None
        if ident.home:
            variants = {ident.home, ident.home.replace("\\", "/"), ident.home.replace("/", "\\")}
            self._home = re.compile("|".join(re.escape(v) for v in sorted(variants, key=len, reverse=True))
                                    + r"(?![\w.-])", re.IGNORECASE)
        names = "|".join(re.escape(u) for u in ident.users)
        # The user name as a whole path component: "x/alice/y", "alice/y", "x\alice" (not a lone word "alice").
        self._user = re.compile(rf"(?:(?<=[\\/])(?:{names})(?=[\\/]|$)|^(?:{names})(?=[\\/]))",
                                re.IGNORECASE) if names else None
        hosts = "|".join(re.escape(h) for h in sorted(ident.hosts, key=len, reverse=True))
        self._host = re.compile(rf"(?<![\w-])(?:{hosts})(?![\w-])", re.IGNORECASE) if hosts else None

    # ---- strings ------------------------------------------------------------------------------
    def _name(self, name: str) -> str:
        """A base name that is itself the user or host name says too much (trailing punctuation aside)."""
        core = name.rstrip(".,;:!?)]}'\"")
        low = core.lower()
        if any(low == u.lower() for u in self.identity.users):
            return USER_MARK + name[len(core):]
        if any(low == h.lower() for h in self.identity.hosts):
            return HOST_MARK + name[len(core):]
        return name

    def text(self, value: str) -> str:
        if not value:
            return value
        out = self._home.sub(HOME_MARK, value) if self._home is not None else value
        if is_absolute_path(out):
            out = self._name(base_name(out.strip()))
        else:
            out = _EMBEDDED.sub(lambda m: self._name(base_name(m.group(0))), out)
        if self._user is not None:
            out = "\n".join(self._user.sub(USER_MARK, line) for line in out.split("\n"))
        if self._host is not None:
            out = self._host.sub(HOST_MARK, out)
        return out

    # ---- structures ---------------------------------------------------------------------------
    def value(self, obj: Any) -> Any:
        """``obj`` with every string redacted, recursively (dict keys too); other values unchanged."""
        if isinstance(obj, str):
            return self.text(obj)
        if isinstance(obj, Mapping):
            return {self.text(k) if isinstance(k, str) else k: self.value(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return [self.value(v) for v in obj]
        return obj

    def metadata(self, metadata: Mapping[str, str], keep: Collection[str] = ()) -> dict[str, str]:
        """Every value redacted; a value holding a JSON object or array is redacted inside (then re-encoded).

        Values whose key is in ``keep`` are passed through unchanged; a value nothing was found in keeps its
        exact text.
        """
        out: dict[str, str] = {}
        for key, raw in metadata.items():
            if key in keep or not isinstance(raw, str):
                out[key] = raw
                continue
            out[key] = self._metadata_value(raw)
        return out

    def _metadata_value(self, raw: str) -> str:
        stripped = raw.lstrip()
        if stripped[:1] in ("{", "["):
            try:
                parsed = json.loads(raw)
            except ValueError:
                pass
            else:
                redacted = self.value(parsed)
                return raw if redacted == parsed else json.dumps(redacted, ensure_ascii=False)
        return self.text(raw)


def redact(obj: Any, identity: Identity | None = None) -> Any:
    """:meth:`Redactor.value` for this machine (or ``identity``)."""
    return Redactor(identity).value(obj)


def redact_metadata(metadata: Mapping[str, str], identity: Identity | None = None,
                    keep: Collection[str] = ()) -> dict[str, str]:
    """:meth:`Redactor.metadata` for this machine (or ``identity``)."""
    return Redactor(identity).metadata(metadata, keep)
