"""The one exception type the nodes raise for problems the user can fix."""


class KilnUserError(ValueError):
    """A problem the user can fix; the message says how."""
