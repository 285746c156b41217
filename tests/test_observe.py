"""Logs and metrics for cron and monitoring: --log-format json, --metrics-file, --quiet.

Against the Nuntiq sandbox and a real SFTP server on loopback, through the real command
line (what cron runs). Every stderr line of a JSON run is parsed with ``json.loads``; the
metrics file is parsed by prometheus_client's own text-format parser.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from erp_push.errors import ExitCode
from tests.helpers import MakeSettings, cli_fetching, run_cli
from tests.sandbox.fixtures import Sandbox
from tests.sftp_servers.fixtures import SftpServerInfo

API_KEY_SECRET = "sk_OBSERVE_api_key_7f3a"
SFTP_PASSWORD_SECRET = "pw-OBSERVE-sftp-2d8e"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def json_lines(stderr: str) -> list[dict[str, Any]]:
    """Every stderr line as a JSON object (json.loads fails the test on any other line)."""
    lines = stderr.splitlines()
    assert lines, "nothing on stderr"
    records = [json.loads(line) for line in lines]
    for record in records:
        assert isinstance(record, dict)
        assert {"time", "level", "event", "message"} <= record.keys(), record
        moment = datetime.fromisoformat(record["time"].replace("Z", "+00:00"))
        assert record["time"].endswith("Z") and moment.utcoffset() == UTC.utcoffset(None)
        assert record["level"] in {"debug", "info", "warning", "error", "critical"}
    return records


def events(records: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [r for r in records if r["event"] == name]


def read_metrics(path: Path) -> dict[str, float]:
    """The file as prometheus_client parses it: ``name`` or ``name{label=value}`` -> value;
    HELP and TYPE present for each family."""
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(path.read_text()):
        assert family.type == "gauge" and family.documentation, family.name
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


def assert_written_atomically(path: Path) -> None:
    assert os.listdir(path.parent) == [path.name]  # no tmp file left beside it
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # node_exporter runs as another user


# --- --log-format json ----------------------------------------------------------------


def test_json_logs_have_one_object_per_line_and_an_event_per_invoice(
    sandbox: Sandbox, asyncssh_sftp: SftpServerInfo, make_settings: MakeSettings, tmp_path: Path
) -> None:
    good = sandbox.control.seed(2)
    bad = sandbox.control.seed(1, awkward=True)  # a tab in a value: fails alone
    settings = make_settings(asyncssh_sftp)
    metrics = tmp_path / "metrics" / "erp_push.prom"
    metrics.parent.mkdir()

    result = run_cli(
        "push", "--settings", str(settings), "--log-format", "json", "--metrics-file", str(metrics)
    )

    assert result.returncode == ExitCode.SOME_FAILED
    assert result.stdout == ""
    records = json_lines(result.stderr)
    invoices = {r["invoice_token"]: r for r in events(records, "invoice")}
    assert set(invoices) == {*good, *bad}
    for token in good:
        record = invoices[token]
        assert record["level"] == "info" and record["result"] == "delivered"
        assert record["invoice_number"].startswith("INV-")
        assert asyncssh_sftp.exists(record["remote_path"])
    failed = invoices[bad[0]]
    assert failed["level"] == "error" and failed["result"] == "failed"
    assert failed["failure_code"] == "RENDER_UNSAFE_VALUE" and failed["detail"]
    assert failed["invoice_number"] == "INV/2024/000003"  # as Nuntiq holds it
    (started,) = events(records, "run_started")
    assert started["remote_outbox"] == asyncssh_sftp.outbox
    (finished,) = events(records, "run_finished")
    assert finished["level"] == "warning" and finished["exit_code"] == 1
    assert finished["claimed"] == 3
    assert finished["counts"] == {
        "delivered": 2,
        "already_delivered": 0,
        "failed": 1,
        "pending": 0,
    }
    assert records[-1] is finished  # the run's last word

    samples = read_metrics(metrics)
    assert samples["erp_push_exit_code"] == 1
    assert samples["erp_push_invoices{result=delivered}"] == 2
    assert samples["erp_push_invoices{result=failed}"] == 1
    assert samples["erp_push_invoices{result=pending}"] == 0
    assert samples["erp_push_invoices{result=already_delivered}"] == 0
    assert samples["erp_push_claimed"] == 3 and samples["erp_push_recovered"] == 0
    assert samples["erp_push_run_duration_seconds"] > 0
    # exit 1 is a run that went through: its failures are in erp_push_invoices
    assert (
        samples["erp_push_last_success_timestamp_seconds"]
        == samples["erp_push_last_run_timestamp_seconds"]
    )
    assert_written_atomically(metrics)

    # The same events in text, as lines, with --verbose; without it, the table as before.
    sandbox.control.seed(1)
    verbose = run_cli("push", "--settings", str(settings), "--verbose")
    assert verbose.returncode == 0, verbose.stderr
    assert " erp_push.events: INV-" in verbose.stderr and " delivered: /outbox/" in verbose.stderr
    assert not any(line.startswith("{") for line in verbose.stderr.splitlines())

    # Every command's stderr is JSON lines, ending on its report as an event.
    for command, name in (("dry-run", "dry_run_finished"), ("cleanup-tmp", "cleanup_finished")):
        other = run_cli(command, "--settings", str(settings), "--log-format", "json")
        assert other.returncode == 0, other.stderr
        assert json_lines(other.stderr)[-1]["event"] == name


def test_json_logs_of_refused_and_unreachable_servers_hold_no_secret(
    sandbox_server: Any, sftp_server_factory: Any, tmp_path: Path
) -> None:
    """Wrong API key (exit 4), wrong SFTP password (exit 5), SFTP unreachable (exit 5), all
    with --debug so the HTTP and SSH libraries' own records are JSON lines too."""
    from tests.sandbox.control import SandboxControl
    from tests.sandbox.server import SandboxServer

    server = sftp_server_factory()
    with SandboxServer(str(tmp_path / "observe.sqlite3"), api_key=API_KEY_SECRET) as nuntiq:
        with SandboxControl(nuntiq.base_url, API_KEY_SECRET) as control:
            control.seed(2)
        config = {
            "connector_name": "observe",
            "nuntiq_base_url": nuntiq.base_url,
            "nuntiq_timeout_seconds": 5,
            "sftp_host": server.host,
            "sftp_port": server.port,
            "sftp_user": server.user,
            "sftp_known_hosts": str(server.known_hosts_path),
            "remote_outbox": server.outbox,
            "state_dir": str(tmp_path / "state"),
            "sftp_connect_timeout_seconds": 5,
            "log_format": "json",  # the setting, without the option
        }

        def settings(name: str, api_key: str, password: str, **overrides: Any) -> str:
            path = tmp_path / name
            secrets = {"nuntiq_api_key": api_key, "sftp_password": password}
            path.write_text(json.dumps({"secrets": secrets, "config": {**config, **overrides}}))
            return str(path)

        wrong_key = settings("key.json", API_KEY_SECRET + "x", SFTP_PASSWORD_SECRET)
        wrong_pw = settings("pw.json", API_KEY_SECRET, SFTP_PASSWORD_SECRET)
        closed = settings("closed.json", API_KEY_SECRET, server.password, sftp_port=_closed_port())
        runs = {
            ExitCode.NUNTIQ: run_cli("push", "--settings", wrong_key, "--debug"),
            ExitCode.SFTP: run_cli("push", "--settings", wrong_pw, "--debug"),
            "unreachable": run_cli("--debug", "push", "--settings", closed),
        }

    for expected, result in runs.items():
        code = ExitCode.SFTP if expected == "unreachable" else expected
        assert result.returncode == code, result.stderr
        output = result.stdout + result.stderr
        assert API_KEY_SECRET not in output and SFTP_PASSWORD_SECRET not in output
        records = json_lines(result.stderr)
        assert any(r["logger"].startswith(("httpx", "httpcore")) for r in records)  # --debug
        (error,) = events(records, "error")
        assert error["exit_code"] == code and error["level"] == "error" and error["hint"]
        assert not any("Traceback" in r["message"] for r in records)
    unreachable = json_lines(runs["unreachable"].stderr)
    (pending,) = events(unreachable, "invoice")  # only the probe invoice was leased
    assert pending["result"] == "pending" and pending["level"] == "warning"


def test_bad_settings_are_one_json_error_when_the_file_asks_for_json(tmp_path: Path) -> None:
    metrics = tmp_path / "erp_push.prom"
    settings = tmp_path / "settings.json"
    config = {"log_format": "json", "metrics_file": metrics.name, "sftp_port": "not a port"}
    settings.write_text(json.dumps({"config": config}))

    result = run_cli("push", "--settings", str(settings))

    assert result.returncode == ExitCode.SETTINGS
    (error,) = json_lines(result.stderr)
    assert error["event"] == "error" and error["exit_code"] == ExitCode.SETTINGS
    assert any("config.sftp_port" in problem for problem in error["problems"])
    # the metrics file the (bad) settings name is written too, relative to their folder
    samples = read_metrics(metrics)
    assert samples["erp_push_exit_code"] == ExitCode.SETTINGS
    assert samples["erp_push_last_success_timestamp_seconds"] == 0  # none yet
    assert samples["erp_push_claimed"] == 0


# --- --metrics-file -------------------------------------------------------------------


def test_a_failed_run_keeps_the_last_success_and_writes_its_exit_code(
    sandbox: Sandbox, asyncssh_sftp: SftpServerInfo, make_settings: MakeSettings, tmp_path: Path
) -> None:
    metrics = tmp_path / "textfile" / "erp_push.prom"
    metrics.parent.mkdir()
    sandbox.control.seed(1)
    ok = run_cli(
        "push", "--metrics-file", str(metrics), "--settings", str(make_settings(asyncssh_sftp))
    )
    assert ok.returncode == 0, ok.stderr
    first = read_metrics(metrics)
    assert first["erp_push_exit_code"] == 0
    assert first["erp_push_invoices{result=delivered}"] == 1
    assert (
        first["erp_push_last_success_timestamp_seconds"]
        == first["erp_push_last_run_timestamp_seconds"]
    )

    sandbox.control.seed(2)
    unreachable = make_settings(
        asyncssh_sftp, config={"sftp_port": _closed_port()}, name="unreachable.json"
    )
    failed = run_cli("push", "--settings", str(unreachable), "--metrics-file", str(metrics))

    assert failed.returncode == ExitCode.SFTP
    second = read_metrics(metrics)
    assert second["erp_push_exit_code"] == ExitCode.SFTP
    assert second["erp_push_invoices{result=pending}"] == 1  # the probe invoice
    assert second["erp_push_invoices{result=delivered}"] == 0
    assert second["erp_push_claimed"] == 1
    assert (
        second["erp_push_last_run_timestamp_seconds"] > first["erp_push_last_run_timestamp_seconds"]
    )
    assert (
        second["erp_push_last_success_timestamp_seconds"]
        == first["erp_push_last_success_timestamp_seconds"]
    )
    assert_written_atomically(metrics)


def test_the_metrics_setting_is_used_and_a_folder_that_cannot_take_it_is_one_line(
    sandbox: Sandbox, asyncssh_sftp: SftpServerInfo, make_settings: MakeSettings, tmp_path: Path
) -> None:
    sandbox.control.seed(1)
    settings = make_settings(asyncssh_sftp, config={"metrics_file": "metrics/erp_push.prom"})
    (tmp_path / "metrics").mkdir()
    assert run_cli("push", "--settings", str(settings)).returncode == 0
    assert read_metrics(tmp_path / "metrics" / "erp_push.prom")["erp_push_exit_code"] == 0

    missing = tmp_path / "no-such-folder" / "erp_push.prom"
    result = run_cli("push", "--settings", str(settings), "--metrics-file", str(missing))
    assert result.returncode == 0  # the run's own outcome; the metrics problem is said
    assert f"could not write the metrics file {missing}" in result.stderr
    assert "Traceback" not in result.stderr


# --- --quiet --------------------------------------------------------------------------


def test_quiet_is_silent_on_success_and_speaks_on_failure(
    sandbox: Sandbox, asyncssh_sftp: SftpServerInfo, make_settings: MakeSettings
) -> None:
    settings = str(make_settings(asyncssh_sftp))
    sandbox.control.seed(2)
    silent = run_cli("push", "--settings", settings, "--quiet")
    assert silent.returncode == 0 and silent.stderr == "" and silent.stdout == ""
    idle = run_cli("-q", "push", "--settings", settings)
    assert idle.returncode == 0 and idle.stderr == ""
    sandbox.control.seed(1)
    data = run_cli("push", "--settings", settings, "--quiet", "--json")
    assert data.returncode == 0 and data.stderr == ""
    assert json.loads(data.stdout)["counts"]["delivered"] == 1  # data is still data
    sandbox.control.seed(1)
    json_silent = run_cli("push", "--settings", settings, "-q", "--log-format", "json")
    assert json_silent.returncode == 0 and json_silent.stderr == ""

    bad = sandbox.control.seed(1, awkward=True)
    failed = run_cli("push", "--settings", settings, "--quiet")
    assert failed.returncode == ExitCode.SOME_FAILED
    assert "1 failed" in failed.stderr and "RENDER_UNSAFE_VALUE" in failed.stderr
    sandbox.control.set_status(bad[0], 90)  # back in the queue, to fail again in JSON
    failed_json = run_cli("push", "--settings", settings, "--quiet", "--log-format", "json")
    assert failed_json.returncode == ExitCode.SOME_FAILED
    records = json_lines(failed_json.stderr)
    assert [r["event"] for r in records] == ["invoice", "run_finished"]

    refused = run_cli(
        "push", "--settings", settings, "--quiet", "--settings", str(Path(settings).parent / "x")
    )
    assert refused.returncode == ExitCode.SETTINGS and "error:" in refused.stderr


def test_a_terminated_run_still_writes_its_metrics_and_a_json_line(
    sandbox: Sandbox, asyncssh_sftp: SftpServerInfo, make_settings: MakeSettings, tmp_path: Path
) -> None:
    """systemctl stop mid-run: exit 143, said as a JSON event, and the metrics file holds
    what the run had claimed by then (counted as it went: there is no report)."""
    sandbox.control.seed(2)
    metrics = tmp_path / "textfile" / "erp_push.prom"
    metrics.parent.mkdir()
    # GET answers after 2 s: the run is surely mid-invoice when the signal comes.
    sandbox.control.set_faults([{"endpoint": "get", "kind": "latency", "latency_ms": 2000}])
    args = ["push", "--settings", str(make_settings(asyncssh_sftp)), "--log-format", "json"]
    with cli_fetching(sandbox.control, *args, "--metrics-file", str(metrics)) as child:
        child.send_signal(signal.SIGTERM)
        _stdout, stderr = child.communicate(timeout=60)

    assert child.returncode == 143, stderr
    records = json_lines(stderr)
    assert records[-1]["event"] == "terminated" and records[-1]["exit_code"] == 143
    samples = read_metrics(metrics)
    assert samples["erp_push_exit_code"] == 143
    assert samples["erp_push_claimed"] == 1  # the probe
    assert samples["erp_push_last_success_timestamp_seconds"] == 0
    assert_written_atomically(metrics)
