"""erp-push: move invoices from Nuntiq into an ERP's SFTP drop folder, exactly once."""

# The one place the version is written: hatch reads it from here when building (see
# pyproject.toml). Not importlib.metadata: that scans every installed distribution and
# costs an idle cron run more than its HTTP calls.
__version__ = "0.1.0"

import os as _os
import sys as _sys
import types as _types

# pydantic looks for plugins (observability hooks) through importlib.metadata's entry
# points the first time a model is built: a scan of every installed distribution, on
# every run, for plugins erp-push never uses. An operator who wants one can still set
# the variable to something else.
_os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")

# Values with which pydantic's get_plugins() returns no plugins without looking.
_PLUGINS_OFF = ("__all__", "1", "true")


def _skip_the_plugin_loader() -> None:
    """With plugins off, stand in for pydantic's plugin loader module.

    pydantic imports ``pydantic.plugin._loader`` to build the first model, and that module
    imports importlib.metadata (with email, zipfile and csv: ~20 ms of a ~250 ms idle run)
    only to leave it unused when plugins are off. The stand-in gives the same answer, no
    plugins, without that import. With plugins on (the variable set to anything else),
    or pydantic's loader already imported, nothing changes. tests/test_startup.py holds
    both: an idle run loads no importlib.metadata, and a plugin still loads when enabled.
    """
    name = "pydantic.plugin._loader"
    if _os.environ.get("PYDANTIC_DISABLE_PLUGINS") not in _PLUGINS_OFF or name in _sys.modules:
        return
    loader = _types.ModuleType(name, "pydantic's plugin loader, plugins off (see erp_push)")
    loader.get_plugins = lambda: ()  # type: ignore[attr-defined]
    loader.PYDANTIC_ENTRY_POINT_GROUP = "pydantic"  # type: ignore[attr-defined]
    _sys.modules[name] = loader


_skip_the_plugin_loader()
