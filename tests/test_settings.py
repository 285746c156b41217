"""settings.py: seed layout, env overrides, every problem at once, per-command needs."""

from __future__ import annotations

import base64
import hashlib
import json
import traceback
from pathlib import Path
from typing import Any

import pytest

from erp_push.errors import ExitCode, SettingsError
from erp_push.settings import (
    SETTINGS_REFERENCE,
    Config,
    Need,
    Secrets,
    Settings,
    env_var_for,
    load_settings,
)

REPO = Path(__file__).resolve().parent.parent
SECRET = "pw-DO-NOT-LEAK-42"
API_KEY = "key-DO-NOT-LEAK-99"
PIN = "SHA256:" + base64.b64encode(hashlib.sha256(b"host key").digest()).decode().rstrip("=")

# Exactly the seed's settings.json.
SEED = {
    "customer_number": "10000001",
    "secrets": {"sftp_password": "rotated-quarterly"},
    "config": {
        "connector_name": "acme_erp_push",
        "sftp_host": "sftp.acme-erp.com",
        "sftp_port": 22,
        "sftp_user": "nuntiq_push",
        "remote_outbox": "/inbound/invoices",
        "remote_sent": "/inbound/invoices/sent",
        "batch_size": 20,
    },
}

ALL_NEEDS = {Need.NUNTIQ, Need.SFTP, Need.STATE, Need.CONNECTOR}


def write(tmp_path: Path, data: Any, name: str = "settings.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data, indent=2), encoding="utf-8")
    return path


def complete(tmp_path: Path) -> dict[str, Any]:
    """A seed-layout file that satisfies every need."""
    (tmp_path / "known_hosts").write_text("sftp.acme-erp.com ssh-ed25519 AAAA\n")
    data: dict[str, Any] = json.loads(json.dumps(SEED))
    data["secrets"] = {"sftp_password": SECRET, "nuntiq_api_key": API_KEY}
    data["config"].update(
        nuntiq_base_url="https://api.apreceiving.com/api", sftp_known_hosts="known_hosts"
    )
    return data


def problems_of(path: Path | None, needs: set[Need]) -> list[str]:
    with pytest.raises(SettingsError) as caught:
        load_settings(path, needs=needs)
    assert caught.value.exit_code == ExitCode.SETTINGS
    return caught.value.problems


# --- loading --------------------------------------------------------------------------


def test_seed_layout_loads_with_defaults(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, SEED), needs=set())

    assert settings.customer_number == "10000001"
    assert settings.secrets.sftp_password is not None
    assert settings.secrets.sftp_password.get_secret_value() == "rotated-quarterly"
    c = settings.config
    assert (c.connector_name, c.sftp_host, c.sftp_port, c.sftp_user) == (
        "acme_erp_push",
        "sftp.acme-erp.com",
        22,
        "nuntiq_push",
    )
    assert (c.remote_outbox, c.remote_sent, c.batch_size) == (
        "/inbound/invoices",
        "/inbound/invoices/sent",
        20,
    )
    assert (c.lease_ttl_seconds, c.concurrency, c.publish_mode) == (600, "auto", "rename")
    assert c.most_in_flight == 64
    assert (c.field_invoice_number, c.field_total, c.vendor_address_type) == (
        "invoiceNumber",
        "grossAmount",
        "vendor",
    )
    assert (c.nuntiq_timeout_seconds, c.sftp_connect_timeout_seconds) == (30, 10)
    assert (c.sftp_operation_timeout_seconds, c.sftp_keepalive_seconds) == (30, 15)


def test_complete_file_satisfies_every_need(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, complete(tmp_path)), needs=ALL_NEEDS)

    assert settings.config.sftp_known_hosts == tmp_path / "known_hosts"
    assert settings.config.nuntiq_base_url == "https://api.apreceiving.com/api"


def test_customer_number_as_json_number_is_text(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, {**SEED, "customer_number": 10000001}), needs=set())

    assert settings.customer_number == "10000001"


def test_example_file_loads(tmp_path: Path) -> None:
    settings = load_settings(REPO / "settings.example.json", needs=set())

    assert settings.config.publish_mode == "rename"


def test_example_file_lists_every_setting() -> None:
    data = json.loads((REPO / "settings.example.json").read_text())
    in_example = {"customer_number"} | {
        f"{section}.{key}" for section in ("secrets", "config") for key in data[section]
    }

    assert in_example == {row.json_key for row in SETTINGS_REFERENCE}


def test_example_placeholders_are_refused_when_needed() -> None:
    problems = problems_of(REPO / "settings.example.json", {Need.NUNTIQ})

    assert problems == [
        "secrets.nuntiq_api_key (env ERP_PUSH_NUNTIQ_API_KEY): still has the placeholder "
        "'CHANGE-ME' from settings.example.json"
    ]


def test_explicit_file_that_does_not_exist(tmp_path: Path) -> None:
    missing = tmp_path / "nope.json"

    problems = problems_of(missing, set())

    assert problems == [f"settings file not found: {missing}"]


def test_default_file_may_be_absent_when_env_provides_everything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # no settings.json here
    monkeypatch.setenv("ERP_PUSH_NUNTIQ_BASE_URL", "https://api.apreceiving.com/api")
    monkeypatch.setenv("ERP_PUSH_NUNTIQ_API_KEY", API_KEY)

    settings = load_settings(None, needs={Need.NUNTIQ})

    assert settings.secrets.nuntiq_api_key is not None
    assert settings.secrets.nuntiq_api_key.get_secret_value() == API_KEY


def test_default_file_is_read_from_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path, SEED)
    monkeypatch.chdir(tmp_path)

    assert load_settings(None, needs=set()).config.sftp_user == "nuntiq_push"


def test_missing_default_file_is_mentioned_when_something_is_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)

    with pytest.raises(SettingsError) as caught:
        load_settings(None, needs={Need.NUNTIQ})

    assert "no settings.json" in caught.value.message


def test_invalid_json_names_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "settings.json"
    path.write_text('{\n  "config": {\n    "sftp_host": "x"\n    "sftp_port": 22\n  }\n}\n')

    problems = problems_of(path, set())

    assert len(problems) == 1
    assert problems[0].startswith("invalid JSON at line 4, column 5:")


def test_invalid_json_error_does_not_carry_the_document(tmp_path: Path) -> None:
    path = tmp_path / "settings.json"
    path.write_text('{"secrets": {"sftp_password": "' + SECRET + '",}}')

    with pytest.raises(SettingsError) as caught:
        load_settings(path, needs=set())

    assert SECRET not in "".join(traceback.format_exception(caught.value))


def test_top_level_must_be_an_object(tmp_path: Path) -> None:
    problems = problems_of(write(tmp_path, [SEED]), set())

    assert "one JSON object" in problems[0]


def test_utf8_bom_in_the_file_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "settings.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(SEED).encode())

    assert load_settings(path, needs=set()).customer_number == "10000001"


# --- environment ----------------------------------------------------------------------


def test_env_overrides_secret_config_int_and_customer_number(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ERP_PUSH_SFTP_PASSWORD", SECRET)
    monkeypatch.setenv("ERP_PUSH_BATCH_SIZE", "5")
    monkeypatch.setenv("ERP_PUSH_CUSTOMER_NUMBER", "20000002")

    settings = load_settings(write(tmp_path, SEED), needs=set())

    assert settings.secrets.sftp_password is not None
    assert settings.secrets.sftp_password.get_secret_value() == SECRET
    assert settings.config.batch_size == 5
    assert settings.customer_number == "20000002"
    assert settings.config.sftp_host == "sftp.acme-erp.com"  # the rest still from the file


def test_env_fills_a_key_the_file_lacks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ERP_PUSH_NUNTIQ_BASE_URL", "http://127.0.0.1:8765/api")

    settings = load_settings(write(tmp_path, SEED), needs=set())

    assert settings.config.nuntiq_base_url == "http://127.0.0.1:8765/api"


def test_empty_env_var_counts_as_unset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ERP_PUSH_SFTP_PORT", "")

    assert load_settings(write(tmp_path, SEED), needs=set()).config.sftp_port == 22


def test_bad_env_value_names_the_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ERP_PUSH_SFTP_PORT", "twenty-two")

    problems = problems_of(write(tmp_path, SEED), set())

    assert problems == [
        "config.sftp_port (env ERP_PUSH_SFTP_PORT): must be a whole number, got 'twenty-two'"
    ]


@pytest.mark.parametrize(
    ("in_file", "in_env", "expected"),
    [
        (None, None, "auto"),
        (16, None, 16),
        ("AUTO", None, "auto"),
        (None, "8", 8),
        (64, "auto", "auto"),
    ],
)
def test_concurrency_is_auto_or_a_count(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    in_file: object,
    in_env: str | None,
    expected: object,
) -> None:
    data = json.loads(json.dumps(SEED))
    if in_file is not None:
        data["config"]["concurrency"] = in_file
    if in_env is not None:
        monkeypatch.setenv("ERP_PUSH_CONCURRENCY", in_env)
    config = load_settings(write(tmp_path, data), needs=set()).config
    assert config.concurrency == expected
    assert config.most_in_flight == (64 if expected == "auto" else expected)


@pytest.mark.parametrize(
    ("key", "most", "bad"),
    [
        *[("concurrency", 64, bad) for bad in (0, 65, True, 2.5, "sixteen", "-3", None)],
        *[("processes", 8, bad) for bad in (0, 9, "two", False)],
    ],
)
def test_a_bad_count_is_named_in_one_line(tmp_path: Path, key: str, most: int, bad: object) -> None:
    data = json.loads(json.dumps(SEED))
    data["config"][key] = bad
    assert problems_of(write(tmp_path, data), set()) == [
        f"config.{key} (env ERP_PUSH_{key.upper()}): must be auto or a whole number "
        f"from 1 to {most}, got {bad!r}"
    ]


@pytest.mark.parametrize(("value", "expected"), [("auto", "auto"), (1, 1), ("3", 3), (8, 8)])
def test_processes_is_auto_or_a_count(tmp_path: Path, value: object, expected: object) -> None:
    data = json.loads(json.dumps(SEED))
    data["config"]["processes"] = value
    assert load_settings(write(tmp_path, data), needs=set()).config.processes == expected


def test_processes_auto_is_one_per_usable_core_and_four_at_most(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import erp_push.settings as settings_module

    config = load_settings(write(tmp_path, SEED), needs=set()).config
    for cores, expected in [(1, 1), (2, 2), (4, 4), (16, 4)]:
        monkeypatch.setattr(settings_module, "_usable_cores", lambda n=cores: n)
        assert config.drain_processes == expected
    explicit = config.model_copy(update={"processes": 6})
    assert explicit.drain_processes == 6


def test_env_var_names_are_flat_and_unique() -> None:
    names = [row.env_var for row in SETTINGS_REFERENCE]

    assert len(names) == len(set(names))
    assert env_var_for("config.sftp_port") == "ERP_PUSH_SFTP_PORT"
    assert env_var_for("secrets.sftp_password") == "ERP_PUSH_SFTP_PASSWORD"
    assert env_var_for("customer_number") == "ERP_PUSH_CUSTOMER_NUMBER"


def test_reference_lists_every_field() -> None:
    keys = [row.json_key for row in SETTINGS_REFERENCE]

    assert keys[0] == "customer_number"
    assert {f"secrets.{n}" for n in Secrets.model_fields} <= set(keys)
    assert {f"config.{n}" for n in Config.model_fields} <= set(keys)
    assert all(row.description for row in SETTINGS_REFERENCE)
    port = next(row for row in SETTINGS_REFERENCE if row.json_key == "config.sftp_port")
    assert tuple(port)[:3] == ("config.sftp_port", "ERP_PUSH_SFTP_PORT", "22")


# --- every problem at once ------------------------------------------------------------


def test_every_problem_is_reported_together(tmp_path: Path) -> None:
    data = json.loads(json.dumps(SEED))
    data["config"].update(
        sftp_port=70000,
        batch_size=0,
        lease_ttl_seconds=5000,
        concurrency="many",
        publish_mode="move",
        sftp_host_key_sha256="MD5:aa:bb",
    )
    del data["config"]["sftp_user"]

    problems = problems_of(write(tmp_path, data), {Need.NUNTIQ, Need.SFTP})

    assert problems == [
        "config.batch_size (env ERP_PUSH_BATCH_SIZE): must be between 1 and 50, got 0",
        "config.lease_ttl_seconds (env ERP_PUSH_LEASE_TTL_SECONDS): must be between 60 and "
        "1800, got 5000",
        "config.concurrency (env ERP_PUSH_CONCURRENCY): must be auto or a whole number from 1 "
        "to 64, got 'many'",
        "config.sftp_port (env ERP_PUSH_SFTP_PORT): must be between 1 and 65535, got 70000",
        "config.sftp_host_key_sha256 (env ERP_PUSH_SFTP_HOST_KEY_SHA256): must look like "
        "SHA256:<base64> (as printed by ssh-keygen -lf), got 'MD5:aa:bb'",
        "config.publish_mode (env ERP_PUSH_PUBLISH_MODE): must be one of 'rename' or "
        "'direct', got 'move'",
        # ...and what the commands need, in the same message:
        "config.nuntiq_base_url (env ERP_PUSH_NUNTIQ_BASE_URL): is required to talk to Nuntiq",
        "secrets.nuntiq_api_key (env ERP_PUSH_NUNTIQ_API_KEY): is required to talk to Nuntiq",
        "config.sftp_user (env ERP_PUSH_SFTP_USER): is required for SFTP",
    ]


def test_error_message_lists_each_problem_on_its_own_line(tmp_path: Path) -> None:
    data = json.loads(json.dumps(SEED))
    data["config"].update(sftp_port=70000, batch_size=99)

    with pytest.raises(SettingsError) as caught:
        load_settings(write(tmp_path, data), needs=set())

    text = str(caught.value)
    assert text.startswith(f"2 settings problem(s) in {tmp_path / 'settings.json'}:")
    assert "\n  - config.sftp_port (env ERP_PUSH_SFTP_PORT): must be between 1 and 65535, " in text
    assert caught.value.source == str(tmp_path / "settings.json")


@pytest.mark.parametrize(
    ("section", "key", "suggestion"),
    [
        ("config", "sftp_hots", "config.sftp_host"),
        ("config", "batchsize", "config.batch_size"),
        ("config", "remote_send", "config.remote_sent"),
        ("secrets", "sftp_pasword", "secrets.sftp_password"),
        # the right name in the wrong section
        ("config", "nuntiq_api_key", "secrets.nuntiq_api_key"),
        ("secrets", "sftp_host", "config.sftp_host"),
        (None, "secret", "secrets"),
        (None, "customer_numbr", "customer_number"),
    ],
)
def test_unknown_key_suggests_the_closest(
    tmp_path: Path, section: str | None, key: str, suggestion: str
) -> None:
    data = json.loads(json.dumps(SEED))
    (data[section] if section else data)[key] = "x"
    where = f"{section}.{key}" if section else key

    problems = problems_of(write(tmp_path, data), set())

    assert problems == [f"{where}: unknown setting — did you mean {suggestion}?"]


def test_unknown_key_without_a_close_match(tmp_path: Path) -> None:
    data = json.loads(json.dumps(SEED))
    data["config"]["zzqx"] = 1

    assert problems_of(write(tmp_path, data), set()) == [
        "config.zzqx: unknown setting — not a setting erp-push knows (see settings.example.json)"
    ]


def test_section_that_is_not_an_object(tmp_path: Path) -> None:
    problems = problems_of(write(tmp_path, {**SEED, "config": ["sftp_host"]}), set())

    assert problems == ["config: must be a JSON object of settings, got ['sftp_host']"]


# --- secrets never leak ---------------------------------------------------------------


def test_secrets_never_appear_in_errors_or_repr(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = json.loads(json.dumps(SEED))
    data["secrets"] = {"sftp_password": SECRET, "nuntiq_api_key": ["not", API_KEY]}
    data["config"]["sftp_password"] = SECRET  # wrong section: unknown key
    data["config"]["nuntiq_base_url"] = f"https://user:{SECRET}@api.example.com/api"
    monkeypatch.setenv("ERP_PUSH_SFTP_PRIVATE_KEY_PASSPHRASE", SECRET)

    with pytest.raises(SettingsError) as caught:
        load_settings(write(tmp_path, data), needs=ALL_NEEDS)

    everything = "".join(traceback.format_exception(caught.value)) + repr(caught.value)
    assert SECRET not in everything
    assert API_KEY not in everything
    assert "secrets.nuntiq_api_key (env ERP_PUSH_NUNTIQ_API_KEY): must be text" in (
        caught.value.problems
    )
    assert (
        "config.nuntiq_base_url (env ERP_PUSH_NUNTIQ_BASE_URL): must not contain a user or "
        "password; use secrets.nuntiq_api_key"
    ) in caught.value.problems


def test_secrets_never_appear_in_repr_or_dump(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ERP_PUSH_NUNTIQ_API_KEY", API_KEY)
    data = complete(tmp_path)
    data["secrets"]["sftp_private_key_passphrase"] = SECRET

    settings = load_settings(write(tmp_path, data), needs=ALL_NEEDS)

    for text in (repr(settings), str(settings), settings.model_dump_json()):
        assert SECRET not in text
        assert API_KEY not in text


# --- what each command needs ----------------------------------------------------------


def nuntiq_only() -> dict[str, Any]:
    return {
        "secrets": {"nuntiq_api_key": API_KEY},
        "config": {"nuntiq_base_url": "https://api.apreceiving.com/api"},
    }


def test_render_needs_only_nuntiq(tmp_path: Path) -> None:
    path = write(tmp_path, nuntiq_only())

    settings = load_settings(path, needs={Need.NUNTIQ})

    assert settings.config.sftp_host is None


def test_the_same_file_is_not_enough_for_sftp(tmp_path: Path) -> None:
    problems = problems_of(write(tmp_path, nuntiq_only()), {Need.NUNTIQ, Need.SFTP})

    assert [p.split(" ")[0] for p in problems] == [
        "config.sftp_host",
        "config.sftp_user",
        "config.remote_outbox",
        "config.sftp_known_hosts",
        "secrets.sftp_password",
    ]


def test_sftp_does_not_need_the_nuntiq_key(tmp_path: Path) -> None:
    data = complete(tmp_path)
    del data["secrets"]["nuntiq_api_key"]

    assert load_settings(write(tmp_path, data), needs={Need.SFTP}).secrets.nuntiq_api_key is None


def test_connector_name_is_needed_only_when_asked(tmp_path: Path) -> None:
    data = complete(tmp_path)
    del data["config"]["connector_name"]
    path = write(tmp_path, data)

    load_settings(path, needs={Need.NUNTIQ, Need.SFTP, Need.STATE})
    assert problems_of(path, {Need.CONNECTOR}) == [
        "config.connector_name (env ERP_PUSH_CONNECTOR_NAME): is required to record the run "
        "in Nuntiq"
    ]


def test_blank_secret_counts_as_missing(tmp_path: Path) -> None:
    data = nuntiq_only()
    data["secrets"]["nuntiq_api_key"] = "  "

    assert problems_of(write(tmp_path, data), {Need.NUNTIQ}) == [
        "secrets.nuntiq_api_key (env ERP_PUSH_NUNTIQ_API_KEY): is required to talk to Nuntiq"
    ]


def test_host_key_pin_instead_of_known_hosts(tmp_path: Path) -> None:
    data = complete(tmp_path)
    del data["config"]["sftp_known_hosts"]
    data["config"]["sftp_host_key_sha256"] = PIN + "="  # padded form is accepted

    settings = load_settings(write(tmp_path, data), needs={Need.SFTP})

    assert settings.config.sftp_host_key_sha256 == PIN  # OpenSSH's unpadded form


def test_both_host_key_methods_is_an_error(tmp_path: Path) -> None:
    data = complete(tmp_path)
    data["config"]["sftp_host_key_sha256"] = PIN

    assert problems_of(write(tmp_path, data), {Need.SFTP}) == [
        "config.sftp_host_key_sha256 (env ERP_PUSH_SFTP_HOST_KEY_SHA256): set either "
        "config.sftp_known_hosts or config.sftp_host_key_sha256, not both"
    ]


def test_known_hosts_file_must_exist(tmp_path: Path) -> None:
    data = complete(tmp_path)
    data["config"]["sftp_known_hosts"] = "missing_known_hosts"

    assert problems_of(write(tmp_path, data), {Need.SFTP}) == [
        "config.sftp_known_hosts (env ERP_PUSH_SFTP_KNOWN_HOSTS): file not found: "
        f"{tmp_path / 'missing_known_hosts'}"
    ]


@pytest.mark.parametrize(
    "pin",
    ["SHA256:", "sha1:" + PIN[7:], "SHA256:not base64!", "SHA256:" + PIN[7:20], "nonsense"],
)
def test_bad_pin_is_refused_even_when_sftp_is_not_needed(tmp_path: Path, pin: str) -> None:
    data = json.loads(json.dumps(SEED))
    data["config"]["sftp_host_key_sha256"] = pin

    problems = problems_of(write(tmp_path, data), set())

    assert len(problems) == 1
    assert problems[0].startswith("config.sftp_host_key_sha256 (env ERP_PUSH_SFTP_HOST_KEY_SHA256)")


def test_private_key_login_without_password(tmp_path: Path) -> None:
    data = complete(tmp_path)
    (tmp_path / "id_ed25519").write_text("key")
    data["secrets"] = {"sftp_private_key_passphrase": SECRET}
    data["config"]["sftp_private_key_path"] = "id_ed25519"

    settings = load_settings(write(tmp_path, data), needs={Need.SFTP})

    assert settings.config.sftp_private_key_path == tmp_path / "id_ed25519"


def test_private_key_file_must_exist(tmp_path: Path) -> None:
    data = complete(tmp_path)
    data["config"]["sftp_private_key_path"] = str(tmp_path / "no_key")

    assert problems_of(write(tmp_path, data), {Need.SFTP}) == [
        "config.sftp_private_key_path (env ERP_PUSH_SFTP_PRIVATE_KEY_PATH): file not found: "
        f"{tmp_path / 'no_key'}"
    ]


def test_state_dir_must_not_be_a_file(tmp_path: Path) -> None:
    (tmp_path / "state").write_text("")
    path = write(tmp_path, {"config": {"state_dir": "state"}})

    load_settings(path, needs=set())
    assert problems_of(path, {Need.STATE}) == [
        f"config.state_dir (env ERP_PUSH_STATE_DIR): {tmp_path / 'state'} exists but is not a "
        "folder"
    ]


# --- paths ----------------------------------------------------------------------------


def test_relative_state_dir_is_relative_to_the_settings_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "etc"
    folder.mkdir()
    monkeypatch.chdir(tmp_path)

    settings = load_settings(write(folder, {"config": {"state_dir": "state"}}), needs=set())

    assert settings.config.state_dir == folder / "state"


def test_default_state_dir_follows_xdg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))

    settings = load_settings(write(tmp_path, SEED), needs=set())

    assert settings.config.state_dir == tmp_path / "xdg" / "erp-push"


def test_default_state_dir_without_xdg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("XDG_STATE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))

    settings = load_settings(write(tmp_path, SEED), needs=set())

    assert settings.config.state_dir == tmp_path / "home" / ".local" / "state" / "erp-push"


# --- the https rule -------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "https://api.apreceiving.com/api",
        "https://test-api.apreceiving.com/api/",
        "http://127.0.0.1:8765/api",
        "http://127.9.9.9/api",
        "http://localhost:8000",
        "http://[::1]:8000/api",
    ],
)
def test_https_or_loopback_is_accepted(tmp_path: Path, url: str) -> None:
    settings = load_settings(write(tmp_path, {"config": {"nuntiq_base_url": url}}), needs=set())

    assert settings.config.nuntiq_base_url == url.rstrip("/")


@pytest.mark.parametrize(
    "url",
    [
        "http://api.apreceiving.com/api",
        "http://10.0.0.5/api",
        "http://128.0.0.1/api",
        "ftp://api.apreceiving.com",
        "api.apreceiving.com/api",
        "https://",
        "https://api.apreceiving.com/api?key=abc",
    ],
)
def test_anything_else_is_refused(tmp_path: Path, url: str) -> None:
    problems = problems_of(write(tmp_path, {"config": {"nuntiq_base_url": url}}), set())

    assert len(problems) == 1
    assert problems[0].startswith("config.nuntiq_base_url (env ERP_PUSH_NUNTIQ_BASE_URL): must ")


def test_plain_settings_class_reads_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Settings() alone is pydantic-settings with the same sources (env + ./settings.json).
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ERP_PUSH_SFTP_HOST", "sftp.example.com")

    assert Settings().config.sftp_host == "sftp.example.com"


def test_plain_settings_class_reads_settings_json_in_the_working_folder(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    write(tmp_path, {"customer_number": "from-cwd", "config": {"sftp_host": "file.example"}})
    monkeypatch.setenv("ERP_PUSH_SFTP_HOST", "env.example")

    settings = Settings()

    assert (settings.customer_number, settings.config.sftp_host) == ("from-cwd", "env.example")


def test_a_named_file_is_read_alone_not_beside_the_working_folders_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    write(tmp_path / "elsewhere", {"customer_number": "from-cwd", "config": {"batch_size": 3}})
    named = write(tmp_path, {"config": {"sftp_host": "named.example"}}, name="named.json")

    settings = load_settings(named, needs=set())

    assert settings.customer_number is None
    assert (settings.config.sftp_host, settings.config.batch_size) == ("named.example", 20)


# --- what the core is built from ------------------------------------------------------


def test_the_core_objects_carry_every_setting(tmp_path: Path) -> None:
    """Every value reaches the object that uses it: no field forgotten on the way, and
    none of them replaced by a default of the object's own."""
    from pydantic import SecretStr

    from erp_push.pipeline import PushPlan
    from erp_push.render import FieldKeys, RenderRules
    from erp_push.transport import SftpOptions

    (tmp_path / "id_ed25519").write_text("key")
    data = complete(tmp_path)
    data["secrets"]["sftp_private_key_passphrase"] = "phrase"
    data["config"].update(
        nuntiq_timeout_seconds=12.5,
        max_invoice_bytes=300_000,
        batch_size=7,
        lease_ttl_seconds=120,
        concurrency=3,
        processes=5,
        max_run_seconds=99,
        sftp_port=2222,
        sftp_private_key_path="id_ed25519",
        remote_sent=None,
        publish_mode="direct",
        output_mode="batch",
        sftp_connect_timeout_seconds=3,
        sftp_operation_timeout_seconds=4,
        sftp_keepalive_seconds=5.6,
        sftp_max_channels=2,
        field_invoice_number="docNo",
        field_invoice_date="docDate",
        field_currency="cur",
        field_total="sum",
        field_supplier_code="vendorNo",
        vendor_address_type="remit_to",
        formula_guard="off",
        file_name_charset="ascii",
    )
    settings = load_settings(write(tmp_path, data), needs=ALL_NEEDS)
    keys = FieldKeys(
        invoice_number="docNo",
        invoice_date="docDate",
        currency="cur",
        total="sum",
        supplier_code="vendorNo",
        vendor_address_type="remit_to",
    )

    assert settings.config.field_keys() == keys
    rules = RenderRules(formula_guard="off", file_name_charset="ascii")
    assert settings.config.render_rules() == rules
    assert settings.nuntiq_client_options() == {
        "base_url": "https://api.apreceiving.com/api",
        "api_key": SecretStr(API_KEY),
        "timeout": 12.5,
        "max_reply_bytes": 300_000,
        "max_connections": 3,
    }
    assert settings.sftp_options() == SftpOptions(
        host="sftp.acme-erp.com",
        port=2222,
        user="nuntiq_push",
        connect_timeout=3,
        operation_timeout=4,
        keepalive_interval=6,
        use_agent=False,
        password=SecretStr(SECRET),
        private_key_path=tmp_path / "id_ed25519",
        private_key_passphrase=SecretStr("phrase"),
        known_hosts=tmp_path / "known_hosts",
        host_key_sha256=None,
    )
    assert settings.remote_folders() == ("/inbound/invoices", None)
    assert settings.push_plan(drain=True, max_invoices=40) == PushPlan(
        connector_name="acme_erp_push",
        outbox="/inbound/invoices",
        sent=None,
        field_keys=keys,
        batch_size=7,
        lease_ttl_seconds=120,
        concurrency=3,
        choose_lanes=False,
        max_channels=2,
        drain=True,
        max_invoices=40,
        max_run_seconds=99,
        publish_mode="direct",
        render_rules=rules,
        output_mode="batch",
        processes=5,
    )


def test_the_core_objects_state_no_defaults_of_their_own() -> None:
    """The settings own every default; a second one in the object could drift from it."""
    from dataclasses import MISSING, fields

    from erp_push.pipeline import PushPlan
    from erp_push.render import FieldKeys, RenderRules
    from erp_push.transport import SftpOptions

    for cls in (SftpOptions, FieldKeys, PushPlan, RenderRules):
        for f in fields(cls):
            # None only for what may be absent: a login method or host-key check not used.
            assert f.default in (MISSING, None), f"{cls.__name__}.{f.name} = {f.default!r}"
            assert f.default_factory is MISSING, f"{cls.__name__}.{f.name}"


def test_the_default_template_keys_are_the_settings_defaults() -> None:
    keys = Config().field_keys()

    assert (keys.invoice_number, keys.total, keys.vendor_address_type) == (
        "invoiceNumber",
        "grossAmount",
        "vendor",
    )


@pytest.mark.parametrize(
    ("build", "line"),
    [
        (
            lambda s: s.sftp_options(),
            "config.sftp_host (env ERP_PUSH_SFTP_HOST): is required for SFTP",
        ),
        (
            lambda s: s.remote_folders(),
            "config.remote_outbox (env ERP_PUSH_REMOTE_OUTBOX): is required for SFTP",
        ),
        (
            lambda s: s.push_plan(drain=False, max_invoices=None),
            "config.remote_outbox (env ERP_PUSH_REMOTE_OUTBOX): is required for SFTP",
        ),
        (
            lambda s: s.nuntiq_client_options(),
            "secrets.nuntiq_api_key (env ERP_PUSH_NUNTIQ_API_KEY): is required to talk to Nuntiq",
        ),
    ],
)
def test_building_without_the_need_checked_names_the_missing_setting(
    tmp_path: Path, build: Any, line: str
) -> None:
    """A command that forgot a Need gets load_settings' own line (exit 3), not an
    AssertionError, and not a None that fails somewhere later under ``python -O``."""
    path = write(tmp_path, {"config": {"nuntiq_base_url": "https://api.apreceiving.com/api"}})
    settings = load_settings(path, needs=set())

    with pytest.raises(SettingsError) as caught:
        build(settings)

    assert caught.value.problems == [line]
    assert caught.value.exit_code == ExitCode.SETTINGS


def test_a_push_plan_needs_the_connector_name(tmp_path: Path) -> None:
    data = complete(tmp_path)
    del data["config"]["connector_name"]
    settings = load_settings(write(tmp_path, data), needs={Need.SFTP})

    with pytest.raises(SettingsError, match=r"config.connector_name .* is required"):
        settings.push_plan(drain=False, max_invoices=None)


def test_batch_mode_with_attachments_is_named_before_anything_happens(tmp_path: Path) -> None:
    """A batch file has no one invoice's stem for attachments to carry: the combination
    is a settings problem for every command, not a surprise in the middle of a push."""
    data = {"config": {"output_mode": "batch", "push_attachments": True}}
    (problem,) = problems_of(write(tmp_path, data), set())
    assert problem.startswith("config.push_attachments") and "output_mode batch" in problem
    alone = {"config": {"output_mode": "batch"}}
    assert load_settings(write(tmp_path, alone), needs=set()).config.output_mode == "batch"
