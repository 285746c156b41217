"""Settings: the seed's JSON layout, ``ERP_PUSH_*`` overrides, and validation messages.

The file keeps the seed's shape::

    {"customer_number": "...", "secrets": {...}, "config": {...}}

Every key can also be set in the environment as ``ERP_PUSH_<KEY>`` (flat, upper-cased,
without the section: ``ERP_PUSH_SFTP_PASSWORD`` sets ``secrets.sftp_password``). The
environment beats the file, so secrets can stay out of the file entirely.

Validation happens once, before any work: every problem is collected and reported in one
``SettingsError``, one line per key, naming both the JSON key and its env var. Secret
values never appear in those lines (nor in ``repr(settings)``: they are ``SecretStr``).

Each command asks only for what it uses (``Need``): ``render`` needs Nuntiq but no SFTP
login; ``cleanup-tmp`` needs SFTP but no Nuntiq key.

The settings are the one source of every default: the objects the core is built from
(``SftpOptions``, ``FieldKeys``, ``PushPlan``, the Nuntiq client's options) come from
``Settings`` methods and state none of their own.
"""

from __future__ import annotations

import base64
import binascii
import difflib
import json
import os
from collections.abc import Iterator, Mapping
from collections.abc import Set as AbstractSet
from contextvars import ContextVar
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, TypedDict, TypeVar
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator
from pydantic.fields import FieldInfo
from pydantic_core import ErrorDetails
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from erp_push import wire
from erp_push.errors import JournalUnusable, SettingsError
from erp_push.journal import Journal
from erp_push.render import FieldKeys, FileNameCharset, FormulaGuard, RenderRules

if TYPE_CHECKING:
    from erp_push.attachments import AttachmentOptions
    from erp_push.pipeline import PushPlan
    from erp_push.transport import SftpOptions

ENV_PREFIX = "ERP_PUSH_"
DEFAULT_SETTINGS_FILE = Path("settings.json")
# The value settings.example.json uses for everything an operator must fill in.
PLACEHOLDER = "CHANGE-ME"


class Need(Enum):
    """What a command is about to use; ``load_settings`` requires only the matching keys."""

    NUNTIQ = "nuntiq"  # nuntiq_base_url + secrets.nuntiq_api_key
    SFTP = "sftp"  # host, user, outbox, one host-key check, one login method
    STATE = "state"  # a usable state_dir for the local journal
    CONNECTOR = "connector"  # connector_name: the run is recorded in Nuntiq's delta stream


# --- the model ------------------------------------------------------------------------


class Secrets(BaseModel):
    """Credentials. Optional here; ``Need`` decides which ones a command requires."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sftp_password: SecretStr | None = Field(
        default=None, description="SFTP login password (or use sftp_private_key_path)."
    )
    nuntiq_api_key: SecretStr | None = Field(
        default=None, description="Nuntiq API key, sent as X-API-Key."
    )
    sftp_private_key_passphrase: SecretStr | None = Field(
        default=None, description="Passphrase of the SFTP private key, if it has one."
    )

    @field_validator("nuntiq_api_key")
    @classmethod
    def _one_clean_token(cls, value: SecretStr | None) -> SecretStr | None:
        # `echo KEY > file` and CRLF env files add a line end: strip it. Anything else
        # unprintable would make the HTTP library refuse the header and quote the key in
        # its error, so it is refused here, without showing the value.
        if value is None:
            return None
        key = value.get_secret_value().strip()
        if any(c.isspace() or not c.isprintable() for c in key):
            raise ValueError("must be one token without spaces or control characters")
        return SecretStr(key)


# The default when there is no XDG_STATE_HOME, before "~" is expanded.
_HOME_STATE_DIR = Path("~/.local/state/erp-push")


def _default_state_dir() -> Path:
    # XDG says a relative XDG_STATE_HOME is invalid and must be ignored.
    xdg = os.environ.get("XDG_STATE_HOME", "")
    if xdg and Path(xdg).is_absolute():
        return Path(xdg) / "erp-push"
    # Without a home folder (HOME unset, no passwd entry) "~" stays: load_settings then
    # names it as a problem of state_dir instead of failing while building defaults.
    try:
        return _HOME_STATE_DIR.expanduser()
    except RuntimeError:
        return _HOME_STATE_DIR


_STATE_DIR_DEFAULT_TEXT = "$XDG_STATE_HOME/erp-push or ~/.local/state/erp-push"


# The most invoices in flight in one process (``concurrency``): past this, lanes only
# take turns for the one core a Python process gets (README, Speed).
MAX_CONCURRENCY = 64
# How many processes may share a drain (``processes``), and how many auto starts at
# most: one per core, and a few at most, since each brings its lanes and SFTP logins.
MAX_PROCESSES = 8
MOST_PROCESSES_AUTO = 4


def _usable_cores() -> int:
    """The CPU cores this process may run on (its affinity, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def _auto_or_a_count(value: Any, most: int) -> Any:
    """ "auto" or a whole number from 1 to ``most`` (a JSON number or text, as from env),
    with one clear message for both shapes instead of one per member of the union."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    count = None
    if isinstance(value, int) and not isinstance(value, bool):
        count = value
    elif isinstance(value, str) and value.strip().isdigit():
        count = int(value)
    if count is None or not 1 <= count <= most:
        raise ValueError(f"must be auto or a whole number from 1 to {most}, got {_show(value)}")
    return count


class Config(BaseModel):
    """Everything that is not a secret. Field order is the order of the reference table."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Nuntiq
    connector_name: str | None = Field(
        default=None,
        description="Name under which runs are recorded in Nuntiq's delta stream "
        "(required by push).",
    )
    nuntiq_base_url: str | None = Field(
        default=None,
        description="Nuntiq API base URL, e.g. https://api.apreceiving.com/api. "
        "https is required except for loopback hosts.",
    )
    nuntiq_timeout_seconds: float = Field(
        default=wire.DEFAULT_TIMEOUT_SECONDS,
        gt=0,
        le=600,
        description="Timeout of each Nuntiq HTTP request as a whole, from connecting to "
        "its last byte.",
    )
    max_invoice_bytes: int = Field(
        default=wire.DEFAULT_MAX_REPLY_BYTES,
        ge=100_000,
        le=2_000_000_000,
        description="Largest invoice answer read from Nuntiq, in bytes; a larger one fails "
        "that invoice alone (NUNTIQ_INVOICE_TOO_LARGE).",
    )
    batch_size: int = Field(
        default=20,
        ge=1,
        le=50,
        description="Invoices claimed at a time (a run without --drain claims one batch); "
        "in output_mode batch, the most rows a batch file holds.",
    )
    lease_ttl_seconds: int = Field(
        default=600, ge=60, le=1800, description="How long a claim holds an invoice."
    )
    concurrency: int | Literal["auto"] = Field(
        default="auto",
        description="Invoices in flight at once (each its own SFTP channel; "
        "sftp_max_channels per SSH login, more logins beyond that): a number from 1 to "
        f"{MAX_CONCURRENCY}, or auto: as many as the first invoice's round trips show are "
        f"needed, {MAX_CONCURRENCY} at most.",
    )
    processes: int | Literal["auto"] = Field(
        default="auto",
        description="How many erp-push processes share a drain (push --drain; each "
        "brings its own lanes): a number from 1 to "
        f"{MAX_PROCESSES}, or auto: one per CPU core this process may use, "
        f"{MOST_PROCESSES_AUTO} at most. Helpers start only when there is something to "
        "claim.",
    )
    max_run_seconds: float = Field(
        default=1200.0,
        gt=0,
        le=86400,
        description="A run stops claiming and starting invoices after this long, and "
        "exits with the rest pending (keep it under the cron interval).",
    )

    # SFTP
    sftp_host: str | None = Field(default=None, description="SFTP server host name or IP.")
    sftp_port: int = Field(default=22, ge=1, le=65535, description="SFTP server port.")
    sftp_user: str | None = Field(default=None, description="SFTP login name.")
    sftp_known_hosts: Path | None = Field(
        default=None,
        description="OpenSSH known_hosts file that holds the server's host key "
        "(set this or sftp_host_key_sha256).",
    )
    sftp_host_key_sha256: str | None = Field(
        default=None,
        description="Pinned host key fingerprint, SHA256:<base64> as printed by "
        "ssh-keygen -lf (set this or sftp_known_hosts).",
    )
    sftp_private_key_path: Path | None = Field(
        default=None, description="Private key file for SFTP login (or use sftp_password)."
    )
    remote_outbox: str | None = Field(
        default=None, description="Remote drop folder the ERP polls, e.g. /inbound/invoices."
    )
    remote_sent: str | None = Field(
        default=None,
        description="Remote folder the ERP moves picked-up files to; names there are "
        "never reused. Unset: not checked.",
    )
    publish_mode: Literal["rename", "direct"] = Field(
        default="rename",
        description="rename: write a tmp file, then rename it (the ERP never sees a "
        "partial file). direct: write under the final name, for servers that forbid "
        "rename; NOT atomic, the ERP may see a partial file.",
    )
    sftp_connect_timeout_seconds: float = Field(
        default=10.0, gt=0, le=600, description="TCP connect + SSH handshake timeout."
    )
    sftp_operation_timeout_seconds: float = Field(
        default=30.0, gt=0, le=600, description="Timeout of each SFTP operation."
    )
    sftp_keepalive_seconds: float = Field(
        default=15.0, ge=0, le=600, description="SSH keepalive interval; 0 turns it off."
    )
    sftp_max_channels: int = Field(
        default=10,
        ge=1,
        le=64,
        description="SFTP channels opened on one SSH login at most (OpenSSH MaxSessions "
        "and ProFTPD SFTPMaxChannels are 10; ProFTPD drops the connection on the 11th).",
    )

    # Local state
    state_dir: Path = Field(
        default_factory=_default_state_dir,
        description="Folder of the local journal. Relative paths are relative to the "
        "settings file's folder.",
    )

    # The customer's invoice template
    field_invoice_number: str = Field(
        default="invoiceNumber", min_length=1, description="Template key of the invoice number."
    )
    field_invoice_date: str = Field(
        default="invoiceDate", min_length=1, description="Template key of the invoice date."
    )
    field_currency: str = Field(
        default="currencyCode", min_length=1, description="Template key of the currency."
    )
    field_total: str = Field(
        default="grossAmount", min_length=1, description="Template key of the invoice total."
    )
    field_supplier_code: str = Field(
        default="supplierCode", min_length=1, description="Template key of the supplier code."
    )
    vendor_address_type: str = Field(
        default="vendor",
        min_length=1,
        description="Address type whose address_name is the supplier code fallback.",
    )
    sftp_use_agent: bool = Field(
        default=False,
        description="Log in with the keys of a running ssh-agent (SSH_AUTH_SOCK), tried "
        "before sftp_private_key_path and sftp_password.",
    )

    # How the file is written
    formula_guard: FormulaGuard = Field(
        default="reject",
        description="reject: an invoice whose invoice number, date, currency or supplier "
        "code starts with = + - @ (a spreadsheet would run it as a formula), or whose total "
        "starts so without being a number, fails alone (RENDER_UNSAFE_VALUE). off: written "
        "as sent.",
    )
    file_name_charset: FileNameCharset = Field(
        default="unicode",
        description="unicode: file names keep letters and digits of any script "
        "(NFC-normalized). ascii: only A-Z, a-z, 0-9, - and _ are kept, the rest becomes _, "
        "for servers that mangle non-ASCII names.",
    )
    # Monitoring
    log_format: Literal["text", "json"] = Field(
        default="text",
        description="Log lines on stderr: text for people, or json (one JSON object per "
        "line, for log collectors). --log-format overrides it.",
    )
    metrics_file: Path | None = Field(
        default=None,
        description="Prometheus textfile-collector file push rewrites at the end of every "
        "run (e.g. /var/lib/node_exporter/textfile/erp_push.prom). Unset: none. "
        "--metrics-file overrides it.",
    )

    # Attachments
    push_attachments: bool = Field(
        default=False,
        description="Also upload each invoice's attachments, named after its CSV, "
        "before the CSV (which is published last).",
    )
    attachment_types: list[str] | None = Field(
        default=None,
        description="Attachment types pushed, e.g. INVOICE_IMAGE,EMAIL_ATTACHMENT "
        "(comma-separated in the variable). Unset: every type.",
    )
    max_attachment_bytes: int = Field(
        default=wire.DEFAULT_MAX_ATTACHMENT_BYTES,
        ge=1,
        le=100_000_000_000,
        description="Largest attachment downloaded, in bytes; a larger one fails its "
        "invoice alone (ATTACHMENT_TOO_LARGE).",
    )

    # What the ERP gets
    output_mode: Literal["per_invoice", "batch"] = Field(
        default="per_invoice",
        description="per_invoice: one file per invoice. batch: one file "
        "invoices-<YYYYMMDDTHHMMSSZ>.csv per claimed batch, one row per invoice "
        "(batch_size rows at most).",
    )

    @field_validator("nuntiq_base_url")
    @classmethod
    def _https_unless_loopback(cls, value: str | None) -> str | None:
        if value is None:
            return None
        return _check_base_url(value)

    @field_validator("concurrency", mode="before")
    @classmethod
    def _concurrency_auto_or_a_count(cls, value: Any) -> Any:
        return _auto_or_a_count(value, MAX_CONCURRENCY)

    @field_validator("processes", mode="before")
    @classmethod
    def _processes_auto_or_a_count(cls, value: Any) -> Any:
        return _auto_or_a_count(value, MAX_PROCESSES)

    @property
    def most_in_flight(self) -> int:
        """The most invoices in flight at once: concurrency, or its ceiling for auto."""
        return MAX_CONCURRENCY if self.concurrency == "auto" else self.concurrency

    @property
    def drain_processes(self) -> int:
        """How many processes a drain uses: processes, or for auto one per usable core."""
        if self.processes == "auto":
            return min(_usable_cores(), MOST_PROCESSES_AUTO)
        return self.processes

    @field_validator("sftp_host_key_sha256")
    @classmethod
    def _fingerprint_format(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        return _normalize_fingerprint(value)

    @field_validator("attachment_types", mode="before")
    @classmethod
    def _types_from_text(cls, value: Any) -> Any:
        # ERP_PUSH_ATTACHMENT_TYPES=INVOICE_IMAGE,EMAIL: a list in a variable.
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",")]
        if isinstance(value, list) and any(not isinstance(v, str) or not v for v in value):
            raise ValueError("each attachment type must be a non-empty name")
        return value

    @field_validator("state_dir", mode="before")
    @classmethod
    def _state_dir_default_for_null(cls, value: Any) -> Any:
        # null in the file (as in settings.example.json) means "use the default".
        return _default_state_dir() if value is None or value == "" else value

    def render_rules(self) -> RenderRules:
        """How files are written, for ``render.render_invoice``."""
        return RenderRules(
            formula_guard=self.formula_guard, file_name_charset=self.file_name_charset
        )

    def field_keys(self) -> FieldKeys:
        """The customer's template keys, for ``render.render_invoice``."""
        return FieldKeys(
            invoice_number=self.field_invoice_number,
            invoice_date=self.field_invoice_date,
            currency=self.field_currency,
            total=self.field_total,
            supplier_code=self.field_supplier_code,
            vendor_address_type=self.vendor_address_type,
        )

    def attachment_options(self) -> AttachmentOptions | None:
        """What push does with attachments; None when it pushes none."""
        return self.attachment_selection() if self.push_attachments else None

    def attachment_selection(self) -> AttachmentOptions:
        """Which attachments, how large at most (also for `render --attachments`)."""
        from erp_push.attachments import AttachmentOptions

        types = None if self.attachment_types is None else frozenset(self.attachment_types)
        return AttachmentOptions(types=types, max_bytes=self.max_attachment_bytes)


class NuntiqClientOptions(TypedDict):
    """``claim.NuntiqClient``'s keyword arguments that come from the settings."""

    base_url: str
    api_key: SecretStr
    timeout: float
    max_reply_bytes: int
    max_connections: int


class Settings(BaseSettings):
    """All settings. Build with ``load_settings``; ``Settings()`` reads env + ./settings.json."""

    model_config = SettingsConfigDict(
        extra="forbid",
        frozen=True,
        coerce_numbers_to_str=True,  # "customer_number": 10000001 is meant as text
    )

    customer_number: str | None = Field(
        default=None, description="Nuntiq tenant id (informational; no API call uses it)."
    )
    secrets: Secrets = Field(default_factory=Secrets)
    config: Config = Field(default_factory=Config)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # load_settings names its own sources (its file, or exactly the values left after
        # an error) through this documented hook; the public API has no per-call way.
        chosen = _SOURCES.get()
        if chosen is not None:
            return chosen
        # Highest priority first: explicit values (tests), ERP_PUSH_* env, the JSON file.
        # No .env or secrets-dir sources: one file and the environment are the whole story.
        return (init_settings, FlatEnvSource(settings_cls), SettingsFileSource(settings_cls))

    # --- what the core is built from. Each method needs what its ``Need`` checked; called
    # without it, it raises the SettingsError load_settings would have raised.

    def nuntiq_client_options(self) -> NuntiqClientOptions:
        """``NuntiqClient(**settings.nuntiq_client_options())`` (``Need.NUNTIQ``)."""
        c, why = self.config, "to talk to Nuntiq"
        return NuntiqClientOptions(
            base_url=_required("config.nuntiq_base_url", c.nuntiq_base_url, why),
            api_key=_required("secrets.nuntiq_api_key", self.secrets.nuntiq_api_key, why),
            timeout=c.nuntiq_timeout_seconds,
            max_reply_bytes=c.max_invoice_bytes,
            # one keep-alive connection per lane: no lane waits for another's socket
            max_connections=c.most_in_flight,
        )

    def sftp_options(self) -> SftpOptions:
        """How to reach and log in to the SFTP server (``Need.SFTP``)."""
        # Imported here: the SSH library loads on the first connect, never in an idle run.
        from erp_push.transport import SftpOptions

        c, s, why = self.config, self.secrets, "for SFTP"
        return SftpOptions(
            host=_required("config.sftp_host", c.sftp_host, why),
            port=c.sftp_port,
            user=_required("config.sftp_user", c.sftp_user, why),
            password=s.sftp_password,
            private_key_path=c.sftp_private_key_path,
            private_key_passphrase=s.sftp_private_key_passphrase,
            known_hosts=c.sftp_known_hosts,
            host_key_sha256=c.sftp_host_key_sha256,
            use_agent=c.sftp_use_agent,
            connect_timeout=c.sftp_connect_timeout_seconds,
            operation_timeout=c.sftp_operation_timeout_seconds,
            keepalive_interval=round(c.sftp_keepalive_seconds),
        )

    def remote_folders(self) -> tuple[str, str | None]:
        """The outbox and the ERP's sent folder (None: not checked) (``Need.SFTP``)."""
        outbox = _required("config.remote_outbox", self.config.remote_outbox, "for SFTP")
        return outbox, self.config.remote_sent

    def push_plan(self, *, drain: bool, max_invoices: int | None) -> PushPlan:
        """What one push does (``Need.SFTP`` and ``Need.CONNECTOR``)."""
        from erp_push.pipeline import PushPlan

        c = self.config
        outbox, sent = self.remote_folders()
        return PushPlan(
            connector_name=_required(
                "config.connector_name", c.connector_name, "to record the run in Nuntiq"
            ),
            outbox=outbox,
            sent=sent,
            field_keys=c.field_keys(),
            batch_size=c.batch_size,
            lease_ttl_seconds=c.lease_ttl_seconds,
            concurrency=c.most_in_flight,
            choose_lanes=c.concurrency == "auto",
            max_channels=c.sftp_max_channels,
            drain=drain,
            max_invoices=max_invoices,
            max_run_seconds=c.max_run_seconds,
            publish_mode=c.publish_mode,
            render_rules=c.render_rules(),
            attachments=c.attachment_options(),
            output_mode=c.output_mode,
            processes=c.drain_processes,
        )


# The sources a Settings() call reads instead of its defaults (see load_settings).
_SOURCES: ContextVar[tuple[PydanticBaseSettingsSource, ...] | None] = ContextVar(
    "erp_push_settings_sources", default=None
)


def _settings_from(*sources: PydanticBaseSettingsSource) -> Settings:
    """``Settings`` built from exactly these sources, highest priority first."""
    token = _SOURCES.set(sources)
    try:
        return Settings()
    finally:
        _SOURCES.reset(token)


_Value = TypeVar("_Value", str, SecretStr)


def _required(json_key: str, value: _Value | None, why: str) -> _Value:
    """A value that ``load_settings`` requires for some ``Need``. A caller that did not ask
    for that need gets the line load_settings would have written (an assert would be
    a traceback, and nothing at all under ``python -O``)."""
    if value is None or not _is_set(value):
        raise SettingsError([f"{_label(json_key)}: is required {why}"])
    return value


# --- sources --------------------------------------------------------------------------


class SettingsFileSource(PydanticBaseSettingsSource):
    """The JSON settings file, with errors that point at the line and column.

    A missing file yields no values (the environment may provide everything);
    ``load_settings`` complains separately when the file was named explicitly. Read here,
    not by subclassing pydantic-settings' JSON source: its reading hook is private API.
    """

    def __init__(
        self, settings_cls: type[BaseSettings], json_file: Path = DEFAULT_SETTINGS_FILE
    ) -> None:
        super().__init__(settings_cls)
        self.json_file = json_file
        # Read once: the values validated and the values salvaged after an error are the
        # same, even if the file changes in between.
        self.values = self._read(json_file) if json_file.is_file() else {}

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        # Only used by the default __call__, which this source replaces.
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        return self.values

    @staticmethod
    def _read(path: Path) -> dict[str, Any]:
        try:
            # A BOM is what some Windows editors write; it is not a reason to refuse the file.
            with path.open(encoding="utf-8-sig") as file:
                data = json.load(file)
        except json.JSONDecodeError as exc:
            # `from None`: the decode error carries the whole document, secrets included.
            raise SettingsError(
                [f"invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}"],
                source=str(path),
            ) from None
        except UnicodeDecodeError:
            raise SettingsError(["file is not UTF-8 text"], source=str(path)) from None
        except OSError as exc:
            raise SettingsError(
                [f"cannot read the settings file: {exc.strerror or exc}"], source=str(path)
            ) from None
        if not isinstance(data, dict):
            raise SettingsError(
                [
                    'the file must hold one JSON object: {"customer_number": ..., '
                    '"secrets": {...}, "config": {...}}'
                ],
                source=str(path),
            )
        return data


class FlatEnvSource(PydanticBaseSettingsSource):
    """``ERP_PUSH_<KEY>`` variables, placed into their section of the seed layout.

    pydantic-settings' own env source maps nested fields with a delimiter
    (``ERP_PUSH_CONFIG__SFTP_PORT``); the seed's operators expect flat names, which works
    because every key name is unique across sections (a test checks it). An empty
    variable counts as unset, so ``ERP_PUSH_SFTP_PORT=`` in a cron file does not fail.
    """

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        # Only used by the default __call__, which this source replaces.
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for json_key in _all_json_keys():
            raw = os.environ.get(env_var_for(json_key), "")
            if raw == "":
                continue
            *section, name = json_key.split(".")
            target = values
            for part in section:
                target = target.setdefault(part, {})
            target[name] = raw
        return values


# --- reference table (README, docs test) ----------------------------------------------


class SettingInfo(NamedTuple):
    json_key: str  # "config.sftp_port"
    env_var: str  # "ERP_PUSH_SFTP_PORT"
    default: str | None  # display text; None when there is no default
    description: str


_SECTIONS: dict[str, type[BaseModel]] = {"secrets": Secrets, "config": Config}


def _all_json_keys() -> Iterator[str]:
    yield "customer_number"
    for section, model in _SECTIONS.items():
        for name in model.model_fields:
            yield f"{section}.{name}"


def env_var_for(json_key: str) -> str:
    """``config.sftp_port`` → ``ERP_PUSH_SFTP_PORT`` (the section is not part of the name)."""
    return ENV_PREFIX + json_key.rsplit(".", 1)[-1].upper()


def _field_info(json_key: str) -> FieldInfo:
    if "." not in json_key:
        return Settings.model_fields[json_key]
    section, name = json_key.split(".", 1)
    return _SECTIONS[section].model_fields[name]


def _default_text(json_key: str, info: FieldInfo) -> str | None:
    if json_key == "config.state_dir":
        return _STATE_DIR_DEFAULT_TEXT
    if info.default is None or info.default_factory is not None:
        return None
    default = info.default
    if isinstance(default, bool):
        return "true" if default else "false"  # as written in the JSON file
    return str(default) if not isinstance(default, float) else f"{default:g}"


def _build_reference() -> list[SettingInfo]:
    rows = []
    for json_key in _all_json_keys():
        info = _field_info(json_key)
        rows.append(
            SettingInfo(
                json_key=json_key,
                env_var=env_var_for(json_key),
                default=_default_text(json_key, info),
                description=info.description or "",
            )
        )
    return rows


SETTINGS_REFERENCE: list[SettingInfo] = _build_reference()
"""Every setting, in file order: the README's configuration reference is built from it."""


# --- value checks used by the validators ----------------------------------------------


def _check_base_url(value: str) -> str:
    url = value.strip()
    parts = urlsplit(url)
    if parts.username is not None or parts.password is not None:
        # Not echoed: the text before '@' is a credential.
        raise ValueError("must not contain a user or password; use secrets.nuntiq_api_key")
    if parts.query or parts.fragment:
        # Not echoed either: a query string is where keys end up. Paths are appended to
        # the base URL, so a query or fragment could not work anyway.
        raise ValueError("must not have a ?query or #fragment")
    if parts.scheme.lower() not in ("https", "http") or not parts.hostname:
        raise ValueError(f"must be an https:// URL with a host, got {_show(url)}")
    if parts.scheme.lower() == "http" and not wire.is_loopback(parts.hostname):
        raise ValueError(
            f"must use https (plain http is allowed only for loopback hosts), got {_show(url)}"
        )
    # Paths are appended to it ("/v1/..."), so a trailing slash would double up.
    return url.rstrip("/")


def _normalize_fingerprint(value: str) -> str:
    """Accept ``SHA256:<base64>`` with or without padding; return OpenSSH's unpadded form."""
    text = value.strip()
    prefix, sep, digest = text.partition(":")
    if not sep or prefix.upper() != "SHA256" or not digest:
        raise ValueError(
            f"must look like SHA256:<base64> (as printed by ssh-keygen -lf), got {_show(text)}"
        )
    digest = digest.rstrip("=")
    try:
        raw = base64.b64decode(digest + "=" * (-len(digest) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"is not valid base64 after 'SHA256:', got {_show(text)}") from None
    if len(raw) != 32:
        raise ValueError(
            f"must encode a 32-byte SHA-256 digest (43 base64 characters), got {_show(text)}"
        )
    return f"SHA256:{digest}"


def _show(value: object, limit: int = 60) -> str:
    """A non-secret value for an error message, shortened so one line stays one line."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


# --- turning pydantic errors into one line per key ------------------------------------

_SECRET_KEYS = frozenset(f"secrets.{name}" for name in Secrets.model_fields)


def _describe_error(error: ErrorDetails) -> tuple[str, str]:
    """(json key, one line) for one pydantic error."""
    loc = tuple(str(part) for part in error["loc"])
    json_key = ".".join(loc)
    if error["type"] == "extra_forbidden":
        return json_key, f"{json_key}: unknown setting — {_suggest(loc)}"
    label = _label(json_key)
    return json_key, f"{label}: {_message(json_key, error)}"


def _label(json_key: str) -> str:
    known = set(_all_json_keys())
    return f"{json_key} (env {env_var_for(json_key)})" if json_key in known else json_key


def _message(json_key: str, error: ErrorDetails) -> str:
    kind = error["type"]
    secret = json_key in _SECRET_KEYS or json_key == "secrets"
    got = "" if secret else f", got {_show(error['input'])}"
    if kind == "value_error":
        # Our validators write complete, secret-free messages.
        return str(error["ctx"]["error"]) if "ctx" in error else error["msg"]
    if kind in ("greater_than_equal", "less_than_equal", "greater_than", "less_than"):
        return _range_message(json_key) + got
    if kind in ("int_parsing", "int_type", "int_from_float"):
        return "must be a whole number" + got
    if kind in ("float_parsing", "float_type", "finite_number"):
        return "must be a number" + got
    if kind == "literal_error":
        return f"must be one of {error['ctx']['expected']}" + got
    if kind in ("string_type", "path_type"):
        return "must be text" + got
    if kind == "string_too_short":
        return "must not be empty"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return "must be a JSON object of settings" + ("" if secret else got)
    if kind == "missing":
        return "is required"
    # Anything else: pydantic's own wording; never its input for a secret.
    return error["msg"] + got


def _range_message(json_key: str) -> str:
    low = high = None
    low_inclusive = True
    for rule in _field_info(json_key).metadata:
        if getattr(rule, "ge", None) is not None:
            low = rule.ge
        if getattr(rule, "gt", None) is not None:
            low, low_inclusive = rule.gt, False
        if getattr(rule, "le", None) is not None:
            high = rule.le
    if low is not None and high is not None:
        if low_inclusive:
            return f"must be between {low} and {high}"
        return f"must be more than {low} and at most {high}"
    return "is out of range"


def _suggest(loc: tuple[str, ...]) -> str:
    """Why a key is unknown, and the known key it most likely meant."""
    name = loc[-1]
    section = loc[0] if len(loc) > 1 else None
    known = list(_all_json_keys())
    # Right name in the wrong section (a password under "config") is the likeliest slip.
    for key in known:
        if key.rsplit(".", 1)[-1] == name and key != ".".join(loc):
            return f"did you mean {key}?"
    same_section = [k for k in known if (k.split(".")[0] if "." in k else None) == section]
    if section is None:
        same_section += list(_SECTIONS)
    for pool in (same_section, known + list(_SECTIONS)):
        leaves = {k.rsplit(".", 1)[-1]: k for k in pool}
        match = difflib.get_close_matches(name, list(leaves), n=1, cutoff=0.6)
        if match:
            return f"did you mean {leaves[match[0]]}?"
    return "not a setting erp-push knows (see settings.example.json)"


# --- what each command needs ----------------------------------------------------------


def _is_set(value: SecretStr | str | Path | None) -> bool:
    if value is None:
        return False
    if isinstance(value, SecretStr):
        return value.get_secret_value().strip() != ""
    return str(value).strip() != ""


_PLACEHOLDER_MESSAGE = f"still has the placeholder {PLACEHOLDER!r} from settings.example.json"


def _is_placeholder(value: SecretStr | str | None) -> bool:
    if isinstance(value, SecretStr):
        return value.get_secret_value().strip() == PLACEHOLDER
    return value is not None and value.strip() == PLACEHOLDER


class _Requirements:
    """Collects 'required' problems for keys that were not already reported as invalid."""

    def __init__(self, already_reported: set[str]) -> None:
        self.reported = already_reported
        self.problems: list[str] = []

    def add(self, json_key: str, message: str) -> None:
        if json_key not in self.reported:
            self.reported.add(json_key)
            self.problems.append(f"{_label(json_key)}: {message}")

    def require(self, json_key: str, value: SecretStr | str | None, why: str) -> None:
        if not _is_set(value):
            self.add(json_key, f"is required {why}")
        elif _is_placeholder(value):
            self.add(json_key, _PLACEHOLDER_MESSAGE)


def _check_needs(
    settings: Settings,
    needs: AbstractSet[Need],
    already_reported: set[str],
    unresolved: Mapping[str, str],
) -> list[str]:
    req = _Requirements(already_reported)
    # A path whose "~" cannot be expanded counts only where the command uses it.
    for json_key, message in unresolved.items():
        section_need = Need.STATE if json_key == "config.state_dir" else Need.SFTP
        if section_need in needs:
            req.add(json_key, message)
    c, s = settings.config, settings.secrets
    if c.output_mode == "batch" and c.push_attachments:
        # A batch file has no stem of one invoice for its attachments to carry.
        req.add(
            "config.push_attachments",
            "cannot be true with config.output_mode batch (attachments are pushed "
            "with per_invoice files only)",
        )
    if Need.NUNTIQ in needs:
        req.require("config.nuntiq_base_url", c.nuntiq_base_url, "to talk to Nuntiq")
        req.require("secrets.nuntiq_api_key", s.nuntiq_api_key, "to talk to Nuntiq")
    if Need.CONNECTOR in needs:
        req.require("config.connector_name", c.connector_name, "to record the run in Nuntiq")
    if Need.SFTP in needs:
        _check_sftp(settings, req)
    if Need.STATE in needs and "config.state_dir" not in req.reported:
        # Tried for real (folders, journal file, one write), so that /proc/x, a read-only
        # disk or a read-only journal is a settings problem before anything is claimed.
        try:
            Journal(c.state_dir).close()
        except JournalUnusable as exc:
            req.add("config.state_dir", exc.message)
    return req.problems


def _check_sftp(settings: Settings, req: _Requirements) -> None:
    c, s = settings.config, settings.secrets
    why = "for SFTP"
    req.require("config.sftp_host", c.sftp_host, why)
    req.require("config.sftp_user", c.sftp_user, why)
    req.require("config.remote_outbox", c.remote_outbox, why)

    # Host keys are always verified, so exactly one way to verify them must be set:
    # two would leave it unclear which one wins when they disagree.
    known_hosts, pin = c.sftp_known_hosts, c.sftp_host_key_sha256
    pin_was_invalid = "config.sftp_host_key_sha256" in req.reported
    if pin_was_invalid:
        pass  # already reported; "no way to verify" would only repeat it
    elif known_hosts is not None and pin is not None:
        req.add(
            "config.sftp_host_key_sha256",
            "set either config.sftp_known_hosts or config.sftp_host_key_sha256, not both",
        )
    elif known_hosts is None and pin is None:
        req.add(
            "config.sftp_known_hosts",
            "a way to verify the server's host key is required: set config.sftp_known_hosts "
            f"(env {env_var_for('sftp_known_hosts')}) or config.sftp_host_key_sha256 "
            f"(env {env_var_for('sftp_host_key_sha256')})",
        )
    elif known_hosts is not None and not known_hosts.is_file():
        req.add("config.sftp_known_hosts", f"file not found: {known_hosts}")

    key_path = c.sftp_private_key_path
    if "config.sftp_private_key_path" in req.reported:
        pass  # already reported as invalid
    elif key_path is not None and not key_path.is_file():
        req.add("config.sftp_private_key_path", f"file not found: {key_path}")
    elif key_path is None and not _is_set(s.sftp_password):
        if not c.sftp_use_agent:  # the agent's keys are a login method of their own
            req.add(
                "secrets.sftp_password",
                "a login method is required: set secrets.sftp_password or "
                f"config.sftp_private_key_path (env {env_var_for('sftp_private_key_path')}), "
                f"or config.sftp_use_agent (env {env_var_for('sftp_use_agent')})",
            )
    elif key_path is None and _is_placeholder(s.sftp_password):
        req.add("secrets.sftp_password", _PLACEHOLDER_MESSAGE)


# --- loading --------------------------------------------------------------------------


def load_settings(path: Path | None, *, needs: AbstractSet[Need]) -> Settings:
    """Read the settings file and ``ERP_PUSH_*`` env, validate, check what ``needs`` asks.

    ``path`` None means ``./settings.json``, which may be absent when the environment
    provides everything; a path named explicitly must exist. Relative paths in the
    settings (state_dir, sftp_known_hosts, sftp_private_key_path) are resolved against
    the settings file's folder. Raises ``SettingsError`` listing every problem at once.
    """
    file = DEFAULT_SETTINGS_FILE if path is None else path
    source = str(file)
    if path is not None and not file.exists():
        raise SettingsError([f"settings file not found: {file}"], source=source)
    if file.exists() and not file.is_file():
        raise SettingsError([f"not a file: {file}"], source=source)

    file_source = SettingsFileSource(Settings, json_file=file)
    env_source = FlatEnvSource(Settings)
    settings: Settings | None
    try:
        settings = _settings_from(env_source, file_source)  # env beats file
        problems: list[str] = []
        reported: set[str] = set()
    except ValidationError as exc:
        raw = _merge(file_source(), env_source())
        settings, problems, reported = _salvage(exc, raw)

    if settings is not None:
        base = file.parent.absolute() if file.is_file() else Path.cwd()
        settings, unresolved = _resolve_paths(settings, base)
        problems += _check_needs(settings, needs, reported, unresolved)
    if problems or settings is None:
        where = source if file.is_file() else f"the environment (no {file})"
        raise SettingsError(problems, source=where)
    return settings


def _merge(low: Mapping[str, Any], high: Mapping[str, Any]) -> dict[str, Any]:
    """``high`` over ``low``, section by section (the env over the file)."""
    merged = dict(low)
    for key, value in high.items():
        below = merged.get(key)
        if isinstance(value, Mapping) and isinstance(below, Mapping):
            merged[key] = _merge(below, value)
        else:
            merged[key] = value
    return merged


def _salvage(
    exc: ValidationError, raw: dict[str, Any]
) -> tuple[Settings | None, list[str], set[str]]:
    """Describe every error, then validate what is left so the per-command checks still
    run: a bad port and a missing host are reported in the same message, not one per run.
    """
    problems: list[str] = []
    reported: set[str] = set()
    pruned = raw
    for error in exc.errors():
        json_key, line = _describe_error(error)
        problems.append(line)
        reported.add(json_key)
        pruned = _without(pruned, tuple(str(p) for p in error["loc"]))
    try:
        return _validate_exactly(pruned), problems, reported
    except ValidationError:
        return None, problems, reported


def _validate_exactly(values: dict[str, Any]) -> Settings:
    # Not Settings.model_validate: on a BaseSettings that runs the env and file sources
    # again. One init source validates exactly these values and nothing else.
    return _settings_from(InitSettingsSource(Settings, init_kwargs=values))


def _without(data: Mapping[str, Any], loc: tuple[str, ...]) -> dict[str, Any]:
    head, rest = loc[0], loc[1:]
    out = dict(data)
    if not rest:
        out.pop(head, None)
    elif isinstance(out.get(head), Mapping):
        out[head] = _without(out[head], rest)
    return out


def _resolve_paths(settings: Settings, base: Path) -> tuple[Settings, dict[str, str]]:
    """Expand ``~`` and make relative paths relative to the settings file's folder, so a
    cron job started from any working directory finds the same files.

    Also returns, per JSON key, why a ``~`` could not be expanded (such a path is left
    as it was); ``_check_needs`` reports it when the command uses that path.
    """
    unresolved: dict[str, str] = {}

    def resolve(name: str, value: Path) -> Path:
        try:
            value = value.expanduser()
        except RuntimeError:
            unresolved[f"config.{name}"] = _unexpandable(value)
            return value
        return value if value.is_absolute() else base / value

    c = settings.config
    update: dict[str, Path] = {"state_dir": resolve("state_dir", c.state_dir)}
    if c.sftp_known_hosts is not None:
        update["sftp_known_hosts"] = resolve("sftp_known_hosts", c.sftp_known_hosts)
    if c.sftp_private_key_path is not None:
        update["sftp_private_key_path"] = resolve("sftp_private_key_path", c.sftp_private_key_path)
    if c.metrics_file is not None:
        update["metrics_file"] = resolve("metrics_file", c.metrics_file)
    return settings.model_copy(update={"config": c.model_copy(update=update)}), unresolved


def _unexpandable(value: Path) -> str:
    """Why ``~`` or ``~user`` at the start of ``value`` has no folder to stand for."""
    head = value.parts[0]
    if head != "~":
        return f"{_show(str(value))} starts with {head}, but there is no user {head[1:]!r}"
    why = f"HOME is not set and user id {os.getuid()} has no entry in the user database"
    if value == _HOME_STATE_DIR:
        return (
            f"the default {value} needs a home folder, but {why}; set state_dir to an "
            "absolute path (or set HOME or XDG_STATE_HOME)"
        )
    return f"{_show(str(value))} starts with ~, but {why}; use an absolute path"


# --- what must work when the settings do not ------------------------------------------


def peek(path: Path | None, json_key: str) -> str | None:
    """One key's raw value, from ``ERP_PUSH_<KEY>`` or else the settings file, validating
    nothing and raising nothing: for what a run that stops at bad settings still honours
    (its log format and metrics file). A relative path is returned relative to the
    settings file's folder, as ``load_settings`` resolves it."""
    value = os.environ.get(env_var_for(json_key), "")
    file = DEFAULT_SETTINGS_FILE if path is None else path
    if not value:
        try:
            with file.open(encoding="utf-8-sig") as handle:
                data: Any = json.load(handle)
            for part in json_key.split("."):
                data = data.get(part) if isinstance(data, dict) else None
        except (OSError, ValueError):
            return None
        value = data if isinstance(data, str) else ""
    if not value:
        return None
    if _field_info(json_key).annotation in (Path, Path | None):
        try:
            resolved = Path(value).expanduser()
        except RuntimeError:
            return None
        base = file.parent.absolute() if file.is_file() else Path.cwd()
        return str(resolved if resolved.is_absolute() else base / resolved)
    return value
