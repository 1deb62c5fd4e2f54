"""What the caption of one image becomes: the existing-caption policy, the trigger word, prefix and suffix.

Pure functions, no I/O. The rules (also in the README):

* ``keep`` (default): an image that already has a non-empty caption keeps it unchanged; only images without one
  get the generated caption.
* ``overwrite``: the generated caption replaces any existing one.
* ``append``: the generated caption is added after the existing one (``"existing, generated"``); it is not added
  again when the existing caption already ends with it, so re-running never stacks the same text twice.

The generated text is framed by ``prefix`` and ``suffix``; then the trigger word is put first (``"sks, ..."``)
unless the caption already contains it as a whole word (the trigger is never doubled). Kept captions are never
modified, not even to add the trigger.
"""

from __future__ import annotations

import re

from .._validate import check_choice

__all__ = ["POLICIES", "caption_policy", "ensure_trigger", "frame"]

POLICIES: tuple[str, ...] = ("keep", "overwrite", "append")

def _clean(text: str | None) -> str:
    """Whitespace-normalised single line: captions are one line in sidecars and CSV cells alike."""
    return " ".join((text or "").split())


def frame(text: str, prefix: str = "", suffix: str = "") -> str:
    """``prefix`` + ``text`` + ``suffix``, each joined with ``", "`` unless the user already put a separator there.

    A prefix ending with a space or with ``,;:`` is followed by one space; a suffix starting with a space is
    preceded by one space, one starting with ``,;:.!?)`` is attached as is. So ``("a cat", "photo of sks")`` gives
    ``"photo of sks, a cat"``, ``("a cat", "a photo of ")`` gives ``"a photo of a cat"`` and
    ``("a cat", "", ". Studio light")`` gives ``"a cat. Studio light"``.
    """
    body = _clean(text)
    pre, suf = _clean(prefix), _clean(suffix)
    if pre:
        if not body:
            body = pre
        elif (prefix or "")[-1:].isspace() or pre.endswith((",", ";", ":")):
            body = f"{pre} {body}"
        else:
            body = f"{pre}, {body}"
    if suf:
        if not body:
            body = suf
        elif (suffix or "")[:1].isspace():
            body = f"{body} {suf}"
        elif suf.startswith((",", ";", ":", ".", "!", "?", ")")):
            body = body + suf
        else:
            body = f"{body}, {suf}"
    return body


def _contains_words(caption: str, words: str) -> bool:
    """``words`` occurs in ``caption`` as whole words (case-insensitive): ``"sks"`` is in ``"photo of sks, man"``
    but not in ``"sksx man"``."""
    pattern = r"(?<!\w)" + r"\s+".join(re.escape(w) for w in words.split()) + r"(?!\w)"
    return re.search(pattern, caption, flags=re.IGNORECASE) is not None


def ensure_trigger(caption: str, trigger: str) -> str:
    """Put ``trigger`` first (``"trigger, caption"``) unless every comma-separated part of it is already in the
    caption as whole words. An empty trigger changes nothing; an empty caption becomes the trigger."""
    parts = [p for p in (_clean(t) for t in (trigger or "").split(",")) if p]
    caption = _clean(caption)
    if not parts:
        return caption
    if not caption:
        return ", ".join(parts)
    missing = [p for p in parts if not _contains_words(caption, p)]
    if not missing:
        return caption
    return ", ".join([*missing, caption])


def caption_policy(
    existing: str | None,
    new: str,
    policy: str = "keep",
    trigger: str = "",
    prefix: str = "",
    suffix: str = "",
) -> str:
    """The caption an image ends up with.

    ``existing`` is the caption found on disk (``None`` or blank: the image has none); ``new`` is what the model
    generated. See the module docstring for the rules. The result is a single line without surrounding spaces.
    """
    check_choice("policy", policy, POLICIES)
    old = _clean(existing)
    if old and policy == "keep":
        return (existing or "").strip()
    framed = frame(new, prefix, suffix)
    if old and policy == "append":
        combined = old if not framed or _ends_with(old, framed) else f"{old.rstrip(' ,;')}, {framed}"
        return ensure_trigger(combined, trigger)
    return ensure_trigger(framed, trigger)


def _ends_with(caption: str, tail: str) -> bool:
    return caption.casefold().rstrip(" ,.").endswith(tail.casefold().rstrip(" ,."))
