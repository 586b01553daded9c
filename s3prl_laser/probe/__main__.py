"""``python -m s3prl_laser.probe``: see :mod:`s3prl_laser.probe.cli`."""

from s3prl_laser.probe.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
