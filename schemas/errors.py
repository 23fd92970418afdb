"""Error types shared by every imgpack command.

Each error carries the process exit code the CLI uses, so scripts can tell a usage mistake from a failed
transfer without parsing messages.
"""

from __future__ import annotations


class ImgpackError(Exception):
    """Bad input or a failed operation; the message names the file, tensor, layer or field at fault."""

    exit_code = 1

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class UsageError(ImgpackError):
    """The command line itself is wrong (bad option value, malformed reference)."""

    exit_code = 2


class AuthError(ImgpackError):
    """A registry refused our credentials, or none were found for it."""

    exit_code = 3


class NotFoundError(ImgpackError):
    """A reference, manifest or blob does not exist where it was looked for."""

    exit_code = 4


class TransferError(ImgpackError):
    """A network transfer failed after its retries."""

    exit_code = 5


class IntegrityError(ImgpackError):
    """Content does not match its digest or size, or a stored artifact is broken."""

    exit_code = 6
