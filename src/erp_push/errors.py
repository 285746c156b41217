"""One error tree for the whole tool.

Every failure erp-push knows about is one of these. Each class says
- whether trying again later can help (``transient``),
- which exit code the CLI ends with when the error stops a run (``exit_code``),
- a short ``hint`` telling the operator what to do.

``FailureCode`` lists every code an invoice can be reported to Nuntiq with: Nuntiq's users
see them, so they are a contract (the README's table lists each one, checked by a test).

Only ``cli.py`` turns them into output. Messages never contain secrets: code that
raises these builds messages from hosts, paths, status codes and server error codes,
never from credentials or request headers.
"""

from __future__ import annotations

from enum import IntEnum, StrEnum


class ExitCode(IntEnum):
    OK = 0
    SOME_FAILED = 1  # some invoices failed, and each failure was reported to Nuntiq
    USAGE = 2  # bad command line (Typer/Click's own code)
    SETTINGS = 3  # bad or missing settings; nothing was done
    NUNTIQ = 4  # Nuntiq unreachable or refusing (auth, permissions, protocol)
    SFTP = 5  # SFTP server unreachable or refusing (host key, login, folders)
    # Not errors of this tree, but the codes a run ends with all the same (cli.py).
    INTERNAL_ERROR = 70  # EX_SOFTWARE: a bug in erp-push
    INTERRUPTED = 130  # Ctrl-C
    TERMINATED = 143  # SIGTERM


class FailureCode(StrEnum):
    """Why one invoice failed, as reported to Nuntiq (``failure_code``, status 97)."""

    # The invoice cannot be written as a file the ERP reads correctly (render.py).
    RENDER_MISSING_FIELD = "RENDER_MISSING_FIELD"
    RENDER_UNSAFE_VALUE = "RENDER_UNSAFE_VALUE"
    RENDER_INVALID_VALUE = "RENDER_INVALID_VALUE"
    RENDER_FAILED = "RENDER_FAILED"  # an unexpected error while rendering: a bug
    # Nuntiq served this invoice in a shape erp-push cannot use (claim.py).
    NUNTIQ_INVOICE_INVALID = "NUNTIQ_INVOICE_INVALID"
    NUNTIQ_INVOICE_TOO_LARGE = "NUNTIQ_INVOICE_TOO_LARGE"
    # The SFTP server refused this file (transport.py decides from the status code,
    # publish.py from statvfs where the status says nothing).
    SFTP_PERMISSION_DENIED = "SFTP_PERMISSION_DENIED"
    SFTP_DISK_FULL = "SFTP_DISK_FULL"
    SFTP_PUBLISH_FAILED = "SFTP_PUBLISH_FAILED"
    SFTP_UPLOAD_FAILED = "SFTP_UPLOAD_FAILED"
    # A failure the journal holds without its code (never written by this version).
    UNKNOWN_FAILURE = "UNKNOWN_FAILURE"
    # An attachment of the invoice cannot be pushed with it (attachments.py).
    ATTACHMENT_MISSING = "ATTACHMENT_MISSING"  # Nuntiq no longer has it (404)
    ATTACHMENT_TOO_LARGE = "ATTACHMENT_TOO_LARGE"  # over config.max_attachment_bytes


class ErpPushError(Exception):
    """Base of every error erp-push raises on purpose."""

    exit_code: ExitCode = ExitCode.SOME_FAILED
    transient: bool = False
    hint: str | None = None

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if hint is not None:
            self.hint = hint

    def __str__(self) -> str:
        return self.message


# --- settings -------------------------------------------------------------------------


class SettingsError(ErpPushError):
    """Settings are missing or invalid. ``problems`` holds one line per bad field."""

    exit_code = ExitCode.SETTINGS

    def __init__(self, problems: list[str], *, source: str | None = None) -> None:
        self.problems = problems
        self.source = source
        where = f" in {source}" if source else ""
        super().__init__(
            f"{len(problems)} settings problem(s){where}:\n"
            + "\n".join(f"  - {p}" for p in problems),
            hint="Fix the settings file or the ERP_PUSH_* environment variables; see "
            "settings.example.json and the README's configuration reference.",
        )


class JournalUnusable(ErpPushError):
    """The state folder or the journal in it cannot be created, opened or written.

    A settings problem (exit 3), found before anything is claimed: ``load_settings``
    names it as a problem of ``config.state_dir`` together with any others.
    """

    exit_code = ExitCode.SETTINGS
    hint = (
        "Set config.state_dir (env ERP_PUSH_STATE_DIR) to a folder on a writable local "
        "disk that this user may write to."
    )


# --- Nuntiq ---------------------------------------------------------------------------


class NuntiqError(ErpPushError):
    """Nuntiq answered with an error, or could not be reached.

    ``status`` is the HTTP status (None when no response arrived), ``code`` the
    machine code from the ``error`` field of the body (e.g. ``LEASE_EXPIRED``).
    ``attempts`` is how many times the request was sent before giving up (0 when it was
    refused locally, before sending).
    """

    exit_code = ExitCode.NUNTIQ
    attempts: int = 1

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        hint: str | None = None,
    ) -> None:
        super().__init__(message, hint=hint)
        self.status = status
        self.code = code


class NuntiqTransientError(NuntiqError):
    """Might succeed later: 429, 502/503/504, timeouts, refused or reset connections."""

    transient = True
    hint = "Nuntiq is unreachable or overloaded; the next run will pick up where this one stopped."


class NuntiqUnavailable(NuntiqTransientError):
    """No HTTP response at all (DNS, refused, reset, timeout)."""


class NuntiqServerError(NuntiqTransientError):
    """500 or another 5xx outside the contract's retry list (429/502/503/504).

    Not retried within the call: a 500 may be a deterministic server bug for this very
    request, and repeating it at once only adds load. Still ``transient`` because nothing
    on our side is wrong: a later run may well succeed, so no invoice is failed for it.
    """

    hint = "Nuntiq reported an internal error; the next run will try again."


class NuntiqReplyMismatch(NuntiqTransientError):
    """A success answer about another invoice than the one asked for (a confused proxy or
    cache, or a server bug). Nothing in it is used: publishing it under the requested
    invoice would report that invoice Processed while its own data never arrived. The
    invoice stays pending for a later run."""

    hint = "Nuntiq (or a proxy in between) answered about another invoice; the next run asks again."


class NuntiqDeadlineReached(NuntiqTransientError):
    """The run's time limit came before this call could be sent, or retried. Nothing was
    decided: the invoice stays pending and a later run carries on."""

    hint = "The run reached its time limit; the next run picks up where this one stopped."


class NuntiqFatalError(NuntiqError):
    """Will not fix itself by retrying: any 4xx other than 429, or a malformed response."""


class NuntiqAuthError(NuntiqFatalError):
    """401 or 403: the API key is wrong, expired, or lacks a permission."""

    hint = "Check secrets.nuntiq_api_key (env ERP_PUSH_NUNTIQ_API_KEY) and its permissions."


class NuntiqNotFound(NuntiqFatalError):
    """404: unknown invoice, attachment or delta stream."""


class NuntiqValidationError(NuntiqFatalError):
    """400 or 422: the request was refused as invalid (includes CURSOR_REGRESSION)."""


class NuntiqConflict(NuntiqFatalError):
    """409: the invoice is not in a state that allows this call."""


class LeaseExpired(NuntiqConflict):
    """409 LEASE_EXPIRED: our lease lapsed, or another lease now holds the invoice."""


class InvalidTransition(NuntiqConflict):
    """409 INVALID_TRANSITION: e.g. success reported on an invoice already at 97."""


class NuntiqProtocolError(NuntiqFatalError):
    """A 2xx response whose body does not match the contract (after retries, for one that
    is not JSON at all). For an invoice, ``failure_code`` is what it fails with, alone."""

    failure_code = FailureCode.NUNTIQ_INVOICE_INVALID


class NuntiqReplyTooLarge(NuntiqProtocolError):
    """A 2xx response larger than the client reads (``max_reply_bytes``): reading stopped
    there, so memory stays bounded. An invoice that large fails alone."""

    failure_code = FailureCode.NUNTIQ_INVOICE_TOO_LARGE
    hint = "Raise config.max_invoice_bytes if invoices that large are expected."


class AttachmentTooLarge(NuntiqFatalError):
    """An attachment larger than the client downloads (``max_attachment_bytes``, as
    announced or as counted while streaming): reading stopped there. Its invoice fails
    alone."""

    failure_code = FailureCode.ATTACHMENT_TOO_LARGE
    hint = "Raise config.max_attachment_bytes if attachments that large are expected."


class NuntiqRequestInvalid(NuntiqValidationError):
    """Refused locally, before anything was sent: the request breaks a contract limit.

    ``status`` is None (no request was made); ``code`` is ``VALIDATION_ERROR``, as the
    server would have answered.
    """


# --- SFTP -----------------------------------------------------------------------------


class SftpError(ErpPushError):
    """The SFTP server cannot be used at all: the run stops (exit 5)."""

    exit_code = ExitCode.SFTP


class SftpUnreachable(SftpError):
    """TCP connect, SSH handshake or keepalive failed or timed out."""

    transient = True
    hint = "Check sftp_host/sftp_port and that the server is up; invoices stay queued."


class SftpDropped(SftpUnreachable):
    """The server took the connection and closed it before its SSH banner.

    OpenSSH does this to connections beyond MaxStartups (10 unauthenticated at once by
    default, then at random), which several runs or clients logging in together reach:
    a moment later the same login goes through.
    """

    hint = (
        "Too many logins at once? OpenSSH drops them beyond MaxStartups; invoices stay "
        "queued for the next run."
    )


class HostKeyError(SftpError):
    """The server's host key is unknown or differs from the pinned one. Never auto-accepted."""

    hint = (
        "If you trust this key, add it to the file named by sftp_known_hosts "
        "(ssh-keyscan -p PORT HOST >> known_hosts, then compare the fingerprint), "
        "or set sftp_host_key_sha256 to the fingerprint shown."
    )

    def __init__(self, message: str, *, fingerprint: str) -> None:
        super().__init__(message)
        self.fingerprint = fingerprint


class HostKeyUnknown(HostKeyError):
    """The server is not in known_hosts and no fingerprint is pinned for it."""


class HostKeyMismatch(HostKeyError):
    """The server presented a different key than the one we trust: possible interception."""


class HostKeyRevoked(HostKeyMismatch):
    """The server presented a key that known_hosts marks ``@revoked``: never accepted."""

    hint = (
        "A revoked key is never accepted. Ask the server's administrators for the new "
        "host key, compare its fingerprint, and list it in sftp_known_hosts."
    )


class SftpAuthError(SftpError):
    """Login refused (password, key or passphrase wrong; user not allowed)."""

    hint = "Check sftp_user and secrets.sftp_password or sftp_private_key_path/passphrase."


class SftpFolderError(SftpError):
    """The outbox (or sent folder) is missing or not usable."""

    hint = "Check remote_outbox and remote_sent exist and are writable by sftp_user."


class SftpOperationError(ErpPushError):
    """One file operation failed (write, rename, stat). Fails one invoice, not the run.

    ``failure_code`` is what the invoice is reported with.
    """

    def __init__(
        self,
        message: str,
        *,
        failure_code: FailureCode = FailureCode.SFTP_UPLOAD_FAILED,
        sftp_code: int | None = None,
    ) -> None:
        super().__init__(message)
        self.failure_code = failure_code
        # The SFTP status code the server answered (3 permission denied, 4 a bare
        # "Failure", ...), so callers decide from the protocol, never from message text.
        self.sftp_code = sftp_code


class RemoteFileMissing(SftpOperationError):
    """The server says the path does not exist. Callers decide whether that is a failure."""


class LeaseLapsing(ErpPushError):
    """The invoice's lease no longer has its safety margin: nothing may be published.

    Not a failure of the invoice: it stays pending and comes back through claim.
    """


# --- rendering ------------------------------------------------------------------------


class NameTaken(ErpPushError):
    """The name a file had to be published under (the one its attachments carry) was
    taken meanwhile by someone else's file. Not the invoice's fault: it waits for the
    next run, which chooses its names afresh."""


class AttachmentFailed(ErpPushError):
    """An attachment stops its invoice (gone from Nuntiq, or too large): it fails alone."""

    def __init__(self, message: str, *, failure_code: FailureCode) -> None:
        super().__init__(message)
        self.failure_code = failure_code


class RenderError(ErpPushError):
    """The invoice cannot be written as a file the ERP would read correctly.

    Fails that invoice alone, reported with ``failure_code`` (e.g. RENDER_MISSING_FIELD,
    RENDER_UNSAFE_VALUE).
    """

    def __init__(self, message: str, *, failure_code: FailureCode) -> None:
        super().__init__(message)
        self.failure_code = failure_code
