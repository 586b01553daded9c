"""``python -m s3prl_laser.probe``: see :mod:`s3prl_laser.probe.cli`."""

from s3prl_laser.probe.cli import get_args_parser, main

__all__ = ["get_args_parser", "main"]

if __name__ == "__main__":
    raise SystemExit(main())
