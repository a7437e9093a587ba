"""File integrity: the error every loader raises when a file differs from the hash recorded when it was written
(shards against their manifest's `file_sha256`, exports and checkpoints against their `files.sha256.json`).

Commands turn it into one line naming the file (`error: ...`); the message says what to do.
"""

from __future__ import annotations


class IntegrityError(RuntimeError):
    """A file is missing, truncated or altered against the hash recorded when it was written."""
