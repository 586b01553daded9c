"""Build script: metadata lives in setup.cfg; this file only adds the start-up hook (.pth).

``s3prl_laser_startup.pth`` must land in site-packages itself (not inside the package) so that the
interpreter runs it at start-up; see ``s3prl_laser/_startup.py`` for what it does.

- Regular installs (``pip install .``, wheels): ``build_py`` also copies the file into ``build_lib``,
  whose contents form the wheel's root, i.e. site-packages.
- Editable installs (``pip install -e .``, PEP 660): setuptools builds a separate "editable wheel"
  and ignores ``build_lib``'s extra files, so the strategy object that writes that wheel is wrapped
  to also write the ``.pth`` into it. This uses setuptools' private ``_select_strategy``; the
  backend's version range is pinned in pyproject.toml.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

STARTUP_PTH = Path(__file__).resolve().parent / "s3prl_laser_startup.pth"


class BuildPyWithStartupPth(build_py):
    """``build_py`` that also puts the start-up ``.pth`` at the root of ``build_lib``."""

    def run(self):
        super().run()
        self.copy_file(str(STARTUP_PTH), str(Path(self.build_lib) / STARTUP_PTH.name), preserve_mode=False)

    def get_outputs(self, include_bytecode=True):
        return [*super().get_outputs(include_bytecode), str(Path(self.build_lib) / STARTUP_PTH.name)]


class _StrategyWithStartupPth:
    """Wraps an editable-install strategy: writes what it writes, plus the start-up ``.pth``."""

    def __init__(self, strategy):
        self._strategy = strategy

    def __call__(self, wheel, files, mapping):
        result = self._strategy(wheel, files, mapping)
        wheel.writestr(STARTUP_PTH.name, STARTUP_PTH.read_bytes())
        return result

    def __enter__(self):
        self._strategy.__enter__()
        return self

    def __exit__(self, *exc_info):
        return self._strategy.__exit__(*exc_info)


class EditableWheelWithStartupPth(editable_wheel):
    """``editable_wheel`` whose wheel also carries the start-up ``.pth``."""

    def _select_strategy(self, *args, **kwargs):
        return _StrategyWithStartupPth(super()._select_strategy(*args, **kwargs))


setup(cmdclass={"build_py": BuildPyWithStartupPth, "editable_wheel": EditableWheelWithStartupPth})
