"""The exception the caption engine raises for problems the user can fix."""

from __future__ import annotations

__all__ = ["CaptionError"]


class CaptionError(ValueError):
    """A missing or broken model folder, an unreadable image, an unwritable caption file: the message says
    which file or folder and what to do about it."""
