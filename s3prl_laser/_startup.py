"""Start-up hook that puts ``hubert_laser`` and ``wavlm_laser`` on ``s3prl.hub`` when s3prl loads it.

``s3prl_laser_startup.pth`` (installed into site-packages next to the package) runs
``install()`` at every interpreter start. s3prl has no plugin mechanism: its runner looks upstreams
up with ``getattr(s3prl.hub, name)``, so the names must be on that module before anyone looks.

This module must stay cheap, because every Python program in the environment imports it: it uses
only ``sys`` and imports nothing heavy. ``install()`` puts a meta-path finder first on
``sys.meta_path``; the finder answers for ``s3prl.hub`` alone, wraps the loader the normal finders
return, and once s3prl's hub module has run, removes itself and calls
``s3prl_laser.registration.register_into(hub)`` (which imports torch and s3prl, as s3prl already did).

Example (what the ``.pth`` line does)::

    import s3prl_laser._startup; s3prl_laser._startup.install()
"""

import sys

HUB_MODULE = "s3prl.hub"


class _RegisteringLoader:
    """Runs the real loader of ``s3prl.hub``, then registers our entries on the fresh module."""

    def __init__(self, loader, watcher):
        self._loader = loader
        self._watcher = watcher

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        self._watcher.remove()
        module.__loader__ = module.__spec__.loader = self._loader  # leave no trace of the wrapper
        from s3prl_laser.registration import register_into

        register_into(module)

    def __getattr__(self, name):
        # get_source, get_code, is_package, ... stay those of the real loader (inspect, pdb, linecache).
        return getattr(self._loader, name)


class HubWatcher:
    """Meta-path finder that waits for ``s3prl.hub`` to be imported; see the module docstring."""

    def __init__(self):
        self._searching = False

    def find_spec(self, fullname, path=None, target=None):
        if fullname != HUB_MODULE or self._searching:
            return None
        self._searching = True
        try:
            spec = self._find_with_other_finders(fullname, path, target)
        finally:
            self._searching = False
        if spec is None or spec.loader is None:
            return spec
        spec.loader = _RegisteringLoader(spec.loader, self)
        return spec

    def _find_with_other_finders(self, fullname, path, target):
        for finder in list(sys.meta_path):
            find_spec = getattr(finder, "find_spec", None)
            if finder is self or find_spec is None:
                continue
            spec = find_spec(fullname, path, target)
            if spec is not None:
                return spec
        return None

    def remove(self):
        if self in sys.meta_path:
            sys.meta_path.remove(self)


def installed_watcher():
    """The ``HubWatcher`` on ``sys.meta_path``, or None (none yet, or it already did its job)."""
    return next((finder for finder in sys.meta_path if isinstance(finder, HubWatcher)), None)


def install():
    """Arrange for ``hubert_laser``/``wavlm_laser`` to appear on ``s3prl.hub``; idempotent and cheap.

    If ``s3prl.hub`` is already imported, registers at once; otherwise installs one ``HubWatcher``.
    """
    hub = sys.modules.get(HUB_MODULE)
    if hub is not None:
        from s3prl_laser.registration import register_into

        register_into(hub)
    elif installed_watcher() is None:
        sys.meta_path.insert(0, HubWatcher())
