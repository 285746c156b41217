"""erp-push: move invoices from Nuntiq into an ERP's SFTP drop folder, exactly once."""

# The one place the version is written: hatch reads it from here when building (see
# pyproject.toml). Not importlib.metadata: that scans every installed distribution and
# costs an idle cron run more than its HTTP calls.
__version__ = "0.1.0"

# pydantic looks for plugins (observability hooks) through importlib.metadata's entry
# points the first time a model is built: a scan of every installed distribution, on
# every run, for plugins erp-push never uses. An operator who wants one can still set
# the variable to something else.
import os as _os

_os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")
