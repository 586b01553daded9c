"""Build script: metadata lives in setup.cfg; this file only adds the start-up hook (.pth)."""

from setuptools import setup

setup()
