"""The reference: a bare paramiko upload loop, no Nuntiq, no erp-push.

    python -m tests.bench.reference --port P --user U --known-hosts F --folder /x --count N
    (the password comes in the environment, BENCH_SFTP_PASSWORD, never on a command line)

One SSH connection, one SFTP channel, strictly sequential: for each file open a tmp name,
write ~120 bytes (a rendered sandbox invoice is 107-117), close, rename to the final name.
That is the
least any safe publisher must do per file (4 round trips), so it is what one connection
can do at best without pipelining. The host key is verified like erp-push verifies it.
Prints one JSON line: ``{"files": N, "loop_s": ...}``, the time from the first open to
the last rename (the bench also times the whole child, start-up and login included).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import paramiko

# The size and shape of a rendered invoice file (BOM, header, one row): 123 bytes.
BODY = (
    "\ufeffinvoice_number\tdate\tcurrency\ttotal\tsupplier_code\tline_count\n"
    "INV-{i:06d}\t2026-05-09\tEUR\t1234.56\tACME-SUPPLIES-GMBH-0001\t7\n"
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.reference")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--user", required=True)
    parser.add_argument("--known-hosts", required=True)
    parser.add_argument("--folder", required=True)
    parser.add_argument("--count", type=int, required=True)
    args = parser.parse_args(argv)

    client = paramiko.SSHClient()
    client.load_host_keys(args.known_hosts)
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    client.connect(
        "127.0.0.1",
        port=args.port,
        username=args.user,
        password=os.environ["BENCH_SFTP_PASSWORD"],
        allow_agent=False,
        look_for_keys=False,
    )
    sftp = client.open_sftp()
    started = time.perf_counter()
    for i in range(args.count):
        final = f"{args.folder}/REF-{i:06d}-20260509.csv"
        tmp = f"{final}.tmp"
        with sftp.open(tmp, "wb") as f:
            f.write(BODY.format(i=i).encode())
        sftp.rename(tmp, final)
    loop_s = time.perf_counter() - started
    sftp.close()
    client.close()
    print(json.dumps({"files": args.count, "loop_s": loop_s}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
