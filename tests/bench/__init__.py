"""`make bench` (``python -m tests.bench``): erp-push measured end to end against local
servers, beside a bare paramiko loop on the same OpenSSH server. A measurement, not a test.

| module | role |
|---|---|
| `__main__.py` | the command line |
| `scenarios.py` | what is measured, the references and the targets |
| `rig.py` | the servers (sandbox, sshd, delay proxies) and verified child runs |
| `proxy.py` | the delay proxy (`python -m tests.bench.proxy`) |
| `reference.py` | the bare paramiko loop (`python -m tests.bench.reference`) |
| `report.py` | the table, the JSON, machine info |
"""
