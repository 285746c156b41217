"""A tiny client for the sandbox's ``/_sandbox`` test controls (never used by erp-push).

with SandboxControl("http://127.0.0.1:8765/api", "sandbox-key") as ctl:
    tokens = ctl.seed(10, awkward=True)
    ctl.set_faults([{"endpoint": "claim", "kind": "status", "status": 503, "count": 2}])
"""

from __future__ import annotations

from typing import Any

import httpx


class SandboxControl:
    def __init__(self, base_url: str, api_key: str, *, timeout: float = 30.0) -> None:
        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(
            base_url=self.base_url + "/_sandbox",
            headers={"X-API-Key": api_key},
            timeout=timeout,
            # Plain-HTTP loopback: skip building a CA-loaded SSL context (~50 ms per client).
            verify=not self.base_url.startswith("http://"),
        )

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        response = self._http.request(method, path, json=body)
        if response.status_code != 200:
            raise RuntimeError(
                f"sandbox control {method} {path} failed: {response.status_code} {response.text}"
            )
        return response.json()

    def seed(
        self,
        count: int,
        seed: int = 0,
        awkward: bool = False,
        *,
        attachments_per_invoice: int = 0,
        attachment_bytes: int = 2048,
    ) -> list[str]:
        """Create ``count`` invoices at status 90; returns their tokens, oldest first."""
        body: dict[str, Any] = {"count": count, "seed": seed, "awkward": awkward}
        if attachments_per_invoice:
            body["attachments_per_invoice"] = attachments_per_invoice
            body["attachment_bytes"] = attachment_bytes
        tokens: list[str] = self._call("POST", "/seed", body)["invoice_tokens"]
        return tokens

    def invoices(self) -> list[dict[str, Any]]:
        """Every invoice with its status, lease and reported result, oldest first."""
        rows: list[dict[str, Any]] = self._call("GET", "/invoices")["invoices"]
        return rows

    def invoice(self, invoice_token: str) -> dict[str, Any]:
        """The ``invoices()`` row of one invoice."""
        for row in self.invoices():
            if row["invoice_token"] == invoice_token:
                return row
        raise KeyError(invoice_token)

    def statuses(self) -> dict[str, int]:
        """invoice_token -> numeric status."""
        return {row["invoice_token"]: row["status"] for row in self.invoices()}

    def set_status(self, invoice_token: str, status: int) -> None:
        """Force a status (e.g. undocumented 95/96/98); clears any lease. Sandbox extra."""
        self._call("POST", f"/invoices/{invoice_token}/status", {"status": status})

    def now(self) -> str:
        """The sandbox clock (sandbox extra)."""
        now: str = self._call("GET", "/clock")["now"]
        return now

    def advance_clock(self, seconds: float) -> str:
        """Move the sandbox clock forward; returns the new sandbox ``now``."""
        now: str = self._call("POST", "/clock", {"advance_seconds": seconds})["now"]
        return now

    def set_faults(self, rules: list[dict[str, Any]]) -> None:
        """Replace the fault rule set (see the contract's ``/_sandbox/faults``)."""
        self._call("POST", "/faults", {"rules": rules})

    def clear_faults(self) -> None:
        self.set_faults([])

    def delete_attachment(self, attachment_token: str) -> None:
        """Make an attachment vanish: Nuntiq answers 404 for it from then on. Sandbox extra."""
        self._call("DELETE", f"/attachments/{attachment_token}")

    def reset(self) -> None:
        """Empty the database, clear faults and request counts, reset the clock."""
        self._call("POST", "/reset", {})

    def request_counts(self) -> dict[str, int]:
        """Requests received per endpoint (claim, get, acknowledge, integration_result,
        attachment, delta) since the last reset, faulted ones included. Sandbox extra."""
        counts: dict[str, int] = self._call("GET", "/requests")["counts"]
        return counts

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> SandboxControl:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
