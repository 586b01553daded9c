"""Start-up hook: registers the LASER upstreams on ``s3prl.hub`` and fills library gaps, each on first import.

``s3prl_laser_startup.pth`` (installed into site-packages next to the package) runs
``install()`` at every interpreter start. s3prl has no plugin mechanism: its runner looks upstreams
up with ``getattr(s3prl.hub, name)``, so the names must be on that module before anyone looks. Its
runner also imports names that newer huggingface_hub/torchaudio releases removed, at the top of
``run_downstream.py`` (which may run as a script, before any ``s3prl`` import), so those gaps are filled
when each library is first imported (see :mod:`s3prl_laser.plugin.shims`).

This module must stay cheap, because every Python program in the environment imports it: it uses
only ``sys`` and imports nothing heavy. ``install()`` puts a meta-path finder first on
``sys.meta_path``; the finder answers for the modules in ``AFTER_IMPORT`` alone, wraps the loader the
normal finders return, and once such a module has run, calls our function on it (which may import
torch, as the library just did). The finder removes itself when every watched module has been seen.

``s3prl.hub`` itself is imported quietly (``quiet_import``): it imports every upstream s3prl has, and those
print notices about optional packages ("ESPnet is not installed, cannot use espnet_hubert upstream"; with
ESPnet installed, ESPnet's "Failed to import Flash Attention" and nltk's failed downloads) and torch's
FutureWarnings, in any program, before it has configured logging. While it runs, warnings are logged at
DEBUG, the ``s3prl`` loggers get a ``NullHandler`` (so such records reach the program's own handlers, if
it has any, instead of Python's last-resort printing to stderr), and what it prints is logged at DEBUG
(logger ``s3prl_laser._startup``); if the import fails, what it printed goes to stderr after all.

Example (what the ``.pth`` line does)::

    import s3prl_laser._startup; s3prl_laser._startup.install()
"""

import contextlib
import sys

# module -> (our module, function called with the freshly imported module)
AFTER_IMPORT = {
    # hubert_laser / wavlm_laser entries
    "s3prl.hub": ("s3prl_laser.plugin.registration", "register_into"),
    # HfFolder, Repository (huggingface_hub >= 1)
    "huggingface_hub": ("s3prl_laser.plugin.shims", "patch_huggingface_hub"),
    # load without torchcodec, set_audio_backend, sox_effects (torchaudio >= 2.9)
    "torchaudio": ("s3prl_laser.plugin.shims", "patch_torchaudio"),
}


QUIET_IMPORTS = ("s3prl.hub",)  # modules whose import-time chatter is logged (see the module docstring)


@contextlib.contextmanager
def quiet_import(name):
    """While ``name`` (one of ``QUIET_IMPORTS``) is executed: warnings at DEBUG, no last-resort printing."""
    if name not in QUIET_IMPORTS:
        yield
        return
    import io
    import logging

    from s3prl_laser.console import foreign_warnings_at_debug

    logger, handler = logging.getLogger(name.split(".")[0]), logging.NullHandler()
    logger.addHandler(handler)
    printed = io.StringIO()
    try:
        with (
            foreign_warnings_at_debug(),
            contextlib.redirect_stdout(printed),
            contextlib.redirect_stderr(printed),
        ):
            yield
    except BaseException:
        sys.stderr.write(printed.getvalue())  # it may explain the failure
        raise
    else:
        for line in printed.getvalue().splitlines():
            logging.getLogger(__name__).debug("import %s printed: %s", name, line)
    finally:
        logger.removeHandler(handler)


def after_import(module) -> None:
    """Run ``AFTER_IMPORT``'s function for ``module``. A failure is logged, never raised into the import."""
    our_module, function = AFTER_IMPORT[module.__name__]
    try:
        getattr(__import__(our_module, fromlist=[function]), function)(module)
    except Exception as error:  # the user's import of the library must not fail because of this plugin
        import logging

        logging.getLogger(__name__).warning(
            "s3prl_laser: %s.%s(%s) failed: %r", our_module, function, module.__name__, error
        )


class _AfterImportLoader:
    """Runs the real loader of a watched module, then ``after_import`` on the fresh module."""

    def __init__(self, loader, watcher):
        self._loader = loader
        self._watcher = watcher

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        with quiet_import(module.__name__):
            self._loader.exec_module(module)
        self._watcher.seen(module.__name__)
        module.__loader__ = module.__spec__.loader = self._loader  # leave no trace of the wrapper
        after_import(module)

    def __getattr__(self, name):
        # get_source, get_code, is_package, ... stay those of the real loader (inspect, pdb, linecache).
        return getattr(self._loader, name)


class ImportWatcher:
    """Meta-path finder that waits for the modules of ``AFTER_IMPORT``; see the module docstring."""

    def __init__(self, names):
        self.watched = set(names)
        self._searching = False

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in self.watched or self._searching:
            return None
        self._searching = True
        try:
            spec = self._find_with_other_finders(fullname, path, target)
        finally:
            self._searching = False
        if spec is None or spec.loader is None:
            return spec
        spec.loader = _AfterImportLoader(spec.loader, self)
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

    def seen(self, name):
        """Stop watching ``name``; leave ``sys.meta_path`` once nothing is left to watch."""
        self.watched.discard(name)
        if not self.watched and self in sys.meta_path:
            sys.meta_path.remove(self)


def installed_watcher():
    """The ``ImportWatcher`` on ``sys.meta_path``, or None (none yet, or it already did its job)."""
    return next((finder for finder in sys.meta_path if isinstance(finder, ImportWatcher)), None)


def install():
    """Arrange for ``AFTER_IMPORT``'s functions to run on each module's first import; idempotent and cheap.

    Modules already imported get their function at once; the others are watched by one ``ImportWatcher``.
    """
    pending = []
    for name in AFTER_IMPORT:
        module = sys.modules.get(name)
        if module is not None:
            after_import(module)
        else:
            pending.append(name)
    if pending and installed_watcher() is None:
        sys.meta_path.insert(0, ImportWatcher(pending))
