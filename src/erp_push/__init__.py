"""erp-push: move invoices from Nuntiq into an ERP's SFTP drop folder, exactly once."""

# The one place the version is written: hatch reads it from here when building (see
# pyproject.toml). Not importlib.metadata: that scans every installed distribution and
# costs an idle cron run more than its HTTP calls.
__version__ = "0.1.0"
