"""The exception types a user sees: caught once by the CLI, shown as a single line, exit code 2."""

import errno

# Failures of the machine around sft, not of sft: a full or read-only disk, permissions, I/O errors.
STORAGE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO, errno.EFBIG)


class SftError(Exception):
    """A mistake in the user's recipe, data, or command line (not a bug in sft)."""

    exit_code = 2


class StorageError(SftError):
    """A file could not be written or read (disk full, read-only, permissions); what was saved before is intact."""


def is_storage_error(err: BaseException) -> bool:
    """True for a StorageError, or an OSError the file system raised (disk full, permissions, I/O)."""
    return isinstance(err, StorageError) or (isinstance(err, OSError) and err.errno in STORAGE_ERRNOS)


def storage_message(err: OSError, then: str = "run again") -> str:
    """One line for an OSError from the file system: what failed, where, and what to do."""
    where = f" {err.filename}" if err.filename else ""
    return f"could not read or write{where}: {err.strerror or err} — free space or fix the permissions, then {then}"
