"""The one base exception of igtv-node.

It lives in the lowest layer (``model``) so every layer can subclass it while
imports keep pointing down only (pacs_node -> pipeline -> model).
"""


class IgtvError(Exception):
    """Base class of every expected igtv-node failure.

    Messages say what is wrong, with which series or file, and what the
    operator can do. Expected bad input raises a subclass and is shown without
    a stack trace; the input is kept (quarantined), never deleted.
    """


class CheckpointError(IgtvError):
    """A checkpoint is missing, unreadable, or inconsistent with its metadata."""
