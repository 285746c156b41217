"""erp-push: move invoices from Nuntiq into an ERP's SFTP drop folder, exactly once."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("erp-push")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"
