"""File names like the seed's (config.file_name_charset): letters and digits of any script,
NFC, bounded in bytes; ``ascii`` for servers that need it. The rule itself, then the
lookups that depend on it (taken names, identical files, case rules) on real servers:
OpenSSH sshd and the asyncssh server, through ``publish`` and through a whole push.
"""

from __future__ import annotations

import hashlib
import os
import time
import unicodedata
from collections.abc import Callable, Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pytest

from erp_push import commands
from erp_push.publish import Delivery, Drop, family_name, publish
from erp_push.render import MAX_FILE_NAME_BYTES, RenderedFile, file_name_for
from erp_push.report import Result
from erp_push.settings import Need, load_settings
from erp_push.transport import SftpSession
from tests.helpers import MakeSettings, push, set_invoice_fields
from tests.sandbox.fixtures import Sandbox
from tests.sftp_servers.fixtures import SftpServerInfo
from tests.test_render import ASCII, NORMAL, nuntiq_invoice, render

TODAY = date(2024, 3, 5)
SUFFIX = "-20240305.csv"
NFC = unicodedata.normalize("NFC", "Größe-7")
NFD = unicodedata.normalize("NFD", "Größe-7")


def name(number: str) -> str:
    return file_name_for(number, TODAY, charset="unicode")


def ascii_name(number: str) -> str:
    return file_name_for(number, TODAY, charset="ascii")


def names_before_the_setting(invoice_number: str, today: date) -> str:
    """erp-push's file_name_for as it was before file_name_charset, copied verbatim."""
    suffix = f"-{today:%Y%m%d}.csv"
    safe = "".join(c if c.isascii() and (c.isalnum() or c in "-_") else "_" for c in invoice_number)
    room = MAX_FILE_NAME_BYTES - len(suffix)
    if len(safe) > room:
        digest = hashlib.sha256(invoice_number.encode("utf-8", "surrogatepass")).hexdigest()
        safe = safe[: room - 1 - 8] + "_" + digest[:8]
    return safe + suffix


# --- the rule ---------------------------------------------------------------------------


def test_the_default_is_unicode() -> None:
    assert render(nuntiq_invoice({**NORMAL, "invoiceNumber": "Größe-7"})).file_name == (
        "Größe-7" + SUFFIX
    )


@pytest.mark.parametrize(
    ("number", "stem"),
    [
        ("Größe-7", "Größe-7"),
        ("RÉF-2024/ü7", "RÉF-2024_ü7"),
        ("Ørsted Å_1", "Ørsted_Å_1"),
        ("חשבונית-7", "חשבונית-7"),  # Hebrew
        ("فاتورة-٧", "فاتورة-٧"),  # Arabic, with an Arabic-Indic digit
        ("東京-請求書12", "東京-請求書12"),
        ("हिंदी-७", "हिंदी-७"),  # Devanagari: vowel signs are marks, kept with their letter
        ("Счёт №5", "Счёт__5"),
    ],
)
def test_letters_and_digits_of_any_script_are_kept(number: str, stem: str) -> None:
    assert name(number) == stem + SUFFIX


def test_nfc_and_nfd_input_give_the_same_name() -> None:
    assert NFC != NFD

    assert name(NFD) == name(NFC) == "Größe-7" + SUFFIX
    assert unicodedata.is_normalized("NFC", name(NFD))


@pytest.mark.parametrize(
    "char",
    [
        "/", "\\", ":", "*", "?", '"', "<", ">", "|", ".", " ", "\x00", "\x1b", "\x7f",
        "\x85", "\u2028", "\u202e", "\u200b", "\u200d", "\ufeff", "\u00a0",
        "\u2215",  # division slash, looks like /
        "\uff0f",  # fullwidth solidus
        "\u3164",  # hangul filler: a letter drawn as nothing
        "\ue000",  # private use
        "\U0001f600",  # an emoji
        "\ud800",  # a lone surrogate
    ],
    ids=lambda c: f"U+{ord(c):04X}",
)  # fmt: skip
def test_separators_controls_and_invisible_characters_become_underscores(char: str) -> None:
    assert name(f"A{char}B") == "A_B" + SUFFIX


@pytest.mark.parametrize(
    ("number", "stem"),
    [
        ("\u0301ABC", "_ABC"),  # a mark with nothing before it
        ("A/\u0301B", "A__B"),  # a mark on a replaced character
        ("A-\u0301", "A-_"),  # it would sit on the '-' of the name
        ("q\u0307-1", "q\u0307-1"),  # no precomposed form: the mark stays with its letter
    ],
)
def test_combining_marks_stay_only_with_a_kept_letter(number: str, stem: str) -> None:
    assert name(number) == stem + SUFFIX


LONG_NUMBERS = {
    "CJK, 3 bytes each": "東" * 300,
    "2 bytes each": "ü" * 300,
    "4 bytes each": "\U00020000" * 100,  # a CJK extension B ideograph
    "letter + mark, no precomposed form": "q\u0307" * 200,
    "Devanagari with vowel signs": "हिंदी" * 80,
    "mixed": ("INV-" + "Größe" * 3 + "/") * 30,
}


@pytest.mark.parametrize("number", list(LONG_NUMBERS.values()), ids=list(LONG_NUMBERS))
def test_a_long_multibyte_number_stays_within_the_byte_bound(number: str) -> None:
    result = name(number)

    assert len(result.encode("utf-8")) <= MAX_FILE_NAME_BYTES
    # Room is used: at most one piece (4 bytes, or a letter with its marks) is left over.
    assert len(result.encode("utf-8")) > MAX_FILE_NAME_BYTES - 12
    stem = result.removesuffix(SUFFIX)
    assert stem[-9] == "_" and all(c in "0123456789abcdef" for c in stem[-8:])
    cut = stem[:-9]
    assert number.startswith(cut.replace("_", "/")) or number.startswith(cut)
    # Never cut between a letter and its marks: the kept text ends a whole piece.
    assert not unicodedata.category(number[len(cut)]).startswith("M")
    # With the collision and tmp suffixes erp-push may add, it fits 255 bytes.
    longest = family_name(result, 99) + ".0123abcd.erp-push.tmp"
    assert len(longest.encode()) <= 255


def test_long_nfc_and_nfd_numbers_give_the_same_name() -> None:
    number = "Größe" * 100

    assert name(unicodedata.normalize("NFD", number)) == name(number)


def test_long_numbers_sharing_a_prefix_get_different_names() -> None:
    prefix = "東" * 300

    assert name(prefix + "A") != name(prefix + "B")


NUMBERS = [
    "INV-2024-0042",
    "Größe-7",
    NFD,
    "RÉF-2024/ü7",
    "../etc/passwd",
    "東京-請求書12",
    "\u00a0INV-7",
    "X" * 300,
    "Ü" * 300,
    "q\u0307" * 200,
    "A\ud800B",
]


@pytest.mark.parametrize("number", NUMBERS)
def test_ascii_gives_the_names_of_before_the_setting(number: str) -> None:
    assert ascii_name(number) == names_before_the_setting(number, TODAY)
    assert ascii_name(number).isascii()


def test_ascii_mode_renders_the_old_name() -> None:
    rendered = render(nuntiq_invoice({**NORMAL, "invoiceNumber": "Größe-7"}), ASCII)

    assert rendered.file_name == "Gr__e-7" + SUFFIX


# --- on real servers: publish -----------------------------------------------------------

OPENSSH = pytest.param("openssh", marks=pytest.mark.sshd)


@pytest.fixture(params=["asyncssh", OPENSSH])
def server(request: pytest.FixtureRequest) -> Iterator[SftpServerInfo]:
    info: SftpServerInfo = request.getfixturevalue(f"{request.param}_sftp")
    info.clear()
    yield info
    info.clear()


def rendered(number: str) -> RenderedFile:
    return render(nuntiq_invoice({**NORMAL, "invoiceNumber": number}))


def publish_to(info: SftpServerInfo, file: RenderedFile) -> Delivery:
    with SftpSession.connect(info.options()) as session:
        return publish(session, Drop(outbox=info.outbox, sent=info.sent), file)


def test_a_non_ascii_name_is_published_once_and_found_again(server: SftpServerInfo) -> None:
    file = rendered("Größe-7")
    path = f"{server.outbox}/Größe-7{SUFFIX}"

    first = publish_to(server, file)
    again = publish_to(server, file)

    assert first == Delivery(remote_path=path, already_delivered=False)
    assert again == Delivery(remote_path=path, already_delivered=True)
    assert server.files() == {path: file.body}
    # On the server's disk the name is NFC, in UTF-8.
    assert server.root is not None
    on_disk = os.listdir(os.fsencode(server.root / server.outbox.lstrip("/")))
    assert "Größe-7-20240305.csv".encode() in on_disk


def test_nfd_input_looks_up_the_name_nfc_input_wrote(server: SftpServerInfo) -> None:
    # The NFD number is written into the file as sent, so the bytes differ: the same
    # name is found taken and the next one is used. Different names would mean the
    # lookup missed the earlier file.
    nfc, nfd = rendered(NFC), rendered(NFD)
    assert nfc.file_name == nfd.file_name and nfc.body != nfd.body

    publish_to(server, nfc)
    second = publish_to(server, nfd)

    assert second.remote_path == f"{server.outbox}/Größe-7-20240305-2.csv"
    assert sorted(server.files()) == [
        f"{server.outbox}/Größe-7-20240305-2.csv",
        f"{server.outbox}/Größe-7{SUFFIX}",
    ]


def test_a_non_ascii_name_taken_in_sent_gets_a_suffix_and_its_copy_counts(
    server: SftpServerInfo,
) -> None:
    file = rendered("東京-請求書12")
    server.write(f"{server.sent}/東京-請求書12{SUFFIX}", b"someone else's file")
    server.write(f"{server.sent}/東京-請求書12-20240305-2.csv", file.body)

    delivery = publish_to(server, file)

    assert delivery == Delivery(
        remote_path=f"{server.sent}/東京-請求書12-20240305-2.csv", already_delivered=True
    )


def test_a_long_multibyte_name_is_published(server: SftpServerInfo) -> None:
    file = rendered("東" * 300)

    delivery = publish_to(server, file)

    assert delivery.remote_path == f"{server.outbox}/{file.file_name}"
    assert server.read(delivery.remote_path) == file.body


def test_the_other_charset_name_is_carried_only_where_it_differs() -> None:
    assert rendered("INV-2024-0042").other_name is None
    assert rendered("Größe-7").other_name == "Gr__e-7" + SUFFIX
    in_ascii = render(nuntiq_invoice({**NORMAL, "invoiceNumber": "Größe-7"}), ASCII)
    assert in_ascii.other_name == "Größe-7" + SUFFIX


@pytest.mark.parametrize("where", ["outbox", "sent"])
def test_a_file_published_under_the_ascii_name_counts_as_delivered(
    server: SftpServerInfo, where: str
) -> None:
    # A run before the upgrade (or with file_name_charset ascii) published it yesterday,
    # then lost its journal: the Unicode name must not deliver it a second time.
    file = rendered("Größe-7")
    folder = server.outbox if where == "outbox" else server.sent
    earlier = f"{folder}/Gr__e-7-20240304.csv"
    server.write(earlier, file.body)

    delivery = publish_to(server, file)

    assert delivery == Delivery(remote_path=earlier, already_delivered=True)
    assert list(server.files()) == [earlier]


def test_a_file_published_under_the_unicode_name_counts_in_ascii_mode(
    server: SftpServerInfo,
) -> None:
    file = render(nuntiq_invoice({**NORMAL, "invoiceNumber": "Größe-7"}), ASCII)
    server.write(f"{server.outbox}/Größe-7{SUFFIX}", file.body)

    assert publish_to(server, file).already_delivered


def test_another_file_under_the_ascii_name_does_not_take_the_unicode_name(
    server: SftpServerInfo,
) -> None:
    server.write(f"{server.outbox}/Gr__e-7{SUFFIX}", b"another invoice, Gr!!e-7")

    delivery = publish_to(server, rendered("Größe-7"))

    assert delivery == Delivery(
        remote_path=f"{server.outbox}/Größe-7{SUFFIX}", already_delivered=False
    )


def test_cleanup_tmp_removes_a_stale_tmp_with_a_non_ascii_name(
    server: SftpServerInfo, make_settings: MakeSettings
) -> None:
    stale = f"{server.outbox}/Größe-7{SUFFIX}.0123abcd.erp-push.tmp"
    server.write(stale, b"half a file")
    an_hour_ago = time.time() - 3600
    os.utime(server.local(stale), (an_hour_ago, an_hour_ago))
    settings = load_settings(make_settings(server), needs={Need.SFTP})

    report = commands.cleanup_tmp(settings, older_than=timedelta(minutes=10))

    assert [f.path for f in report.removed] == [stale]
    assert server.files() == {}


Factory = Callable[..., SftpServerInfo]


def test_non_ascii_case_is_folded_where_the_server_folds_it(
    sftp_server_factory: Factory,
) -> None:
    # A Windows-like server: ÄBC and äbc are one name. Asked for our name, it answers
    # about the other spelling: taken (other bytes), or ours (same bytes).
    info = sftp_server_factory("case_insensitive")
    ours = rendered("äbc-7")
    info.write(f"{info.outbox}/ÄBC-7{SUFFIX.upper()}", b"someone else's file")

    delivery = publish_to(info, ours)

    assert delivery.remote_path == f"{info.outbox}/äbc-7-20240305-2.csv"
    assert info.read(f"{info.outbox}/ÄBC-7{SUFFIX.upper()}") == b"someone else's file"
    copy = rendered("äbc-8")
    info.write(f"{info.sent}/ÄBC-8{SUFFIX.upper()}", copy.body)
    assert publish_to(info, copy) == Delivery(
        remote_path=f"{info.sent}/äbc-8{SUFFIX}", already_delivered=True
    )


# --- on real servers: a whole push, dry-run --------------------------------------------


def today_suffix() -> str:
    return f"-{datetime.now(UTC):%Y%m%d}.csv"


@pytest.mark.parametrize(
    "server_fixture", ["asyncssh_sftp", pytest.param("openssh_sftp", marks=pytest.mark.sshd)]
)
def test_push_delivers_a_non_ascii_invoice_and_a_second_machine_finds_it(
    server_fixture: str,
    request: pytest.FixtureRequest,
    sandbox: Sandbox,
    make_settings: MakeSettings,
    tmp_path: Path,
) -> None:
    info: SftpServerInfo = request.getfixturevalue(server_fixture)
    info.clear()
    (token,) = sandbox.control.seed(1)
    set_invoice_fields(sandbox.server.db_path, token, invoiceNumber=NFD)
    path = f"{info.outbox}/Größe-7{today_suffix()}"

    first = push(make_settings(info))
    assert [o.result for o in first.outcomes] == [Result.DELIVERED]
    assert sandbox.control.invoice(token)["external_id_1"] == path
    before = info.files()

    # The invoice comes back (an operator re-queued it) to a run without the journal.
    sandbox.control.set_status(token, 90)
    second = push(make_settings(info, config={"state_dir": str(tmp_path / "other-state")}))

    assert [o.result for o in second.outcomes] == [Result.ALREADY_DELIVERED]
    assert sandbox.control.invoice(token)["external_id_1"] == path
    assert info.files() == before
    info.clear()


def test_an_upgrade_from_ascii_names_never_delivers_twice(
    sandbox: Sandbox, asyncssh_sftp: SftpServerInfo, make_settings: MakeSettings, tmp_path: Path
) -> None:
    (token,) = sandbox.control.seed(1)
    set_invoice_fields(sandbox.server.db_path, token, invoiceNumber="Größe-7")
    push(make_settings(asyncssh_sftp, config={"file_name_charset": "ascii"}))
    path = f"{asyncssh_sftp.outbox}/Gr__e-7{today_suffix()}"
    assert list(asyncssh_sftp.files()) == [path]

    # Re-queued, and pushed by a run with the new default and without that journal.
    sandbox.control.set_status(token, 90)
    report = push(make_settings(asyncssh_sftp, config={"state_dir": str(tmp_path / "new")}))

    assert [o.result for o in report.outcomes] == [Result.ALREADY_DELIVERED]
    assert sandbox.control.invoice(token)["external_id_1"] == path
    assert list(asyncssh_sftp.files()) == [path]


def test_push_in_ascii_mode_gives_the_old_name(
    sandbox: Sandbox, asyncssh_sftp: SftpServerInfo, make_settings: MakeSettings
) -> None:
    (token,) = sandbox.control.seed(1)
    set_invoice_fields(sandbox.server.db_path, token, invoiceNumber="Größe-7")

    push(make_settings(asyncssh_sftp, config={"file_name_charset": "ascii"}))

    path = f"{asyncssh_sftp.outbox}/Gr__e-7{today_suffix()}"
    assert sandbox.control.invoice(token)["external_id_1"] == path
    assert list(asyncssh_sftp.files()) == [path]


@pytest.mark.parametrize(("charset", "stem"), [("unicode", "Größe-7"), ("ascii", "Gr__e-7")])
def test_dry_run_shows_the_name_push_would_give(
    charset: str,
    stem: str,
    sandbox: Sandbox,
    asyncssh_sftp: SftpServerInfo,
    make_settings: MakeSettings,
) -> None:
    (token,) = sandbox.control.seed(1)
    set_invoice_fields(sandbox.server.db_path, token, invoiceNumber="Größe-7")
    settings = load_settings(
        make_settings(asyncssh_sftp, config={"file_name_charset": charset}),
        needs={Need.NUNTIQ, Need.SFTP},
    )

    report = commands.dry_run(settings)

    assert [f.file_name for f in report.files] == [stem + today_suffix()]
