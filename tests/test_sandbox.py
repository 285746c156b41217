"""The Nuntiq sandbox itself, over real HTTP."""

from __future__ import annotations

import httpx


def test_smoke(sandbox):
    tokens = sandbox.control.seed(3)
    with httpx.Client(base_url=sandbox.base_url, headers={"X-API-Key": sandbox.api_key}) as c:
        r = c.post("/v1/invoices/claim", json={"state": "PendingIntegration", "limit": 2})
        assert r.status_code == 200
        assert [x["invoice_token"] for x in r.json()["leases"]] == tokens[:2]
