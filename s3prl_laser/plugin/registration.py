"""Put the LASER upstream entries on ``s3prl.hub``, where s3prl's runner and ``S3PRLUpstream`` look.

s3prl resolves ``run_downstream.py -u NAME`` and ``S3PRLUpstream(NAME)`` with
``getattr(s3prl.hub, NAME)`` and lists ``hub.options()`` from that module's globals; it has no
plugin mechanism. Registration therefore sets module attributes. It happens automatically through
the start-up hook (``s3prl_laser._startup``, run by the installed ``.pth`` file) and explicitly
through ``register()`` for programs that embed s3prl in an environment without the hook.

Example::

    >>> from s3prl_laser.plugin.registration import register
    >>> register()
    ('hubert_laser', 'wavlm_laser', 'wav2vec2_laser', 'data2vec_laser')
"""

from types import ModuleType

from s3prl_laser.names import LASER_ENTRIES as ENTRY_NAMES


def register_into(hub: ModuleType) -> tuple[str, ...]:
    """Set ``hub.<name>`` for each of :data:`ENTRY_NAMES`; returns the names set. Idempotent."""
    from s3prl_laser.plugin import hubconf

    for name in ENTRY_NAMES:
        setattr(hub, name, getattr(hubconf, name))
    return ENTRY_NAMES


def register() -> tuple[str, ...]:
    """Import ``s3prl.hub`` (torch, s3prl: seconds) and register the LASER entries on it."""
    from s3prl_laser.stacks import missing_s3prl_message

    if (missing := missing_s3prl_message()) is not None:
        raise ModuleNotFoundError(missing, name="s3prl")
    import s3prl.hub

    return register_into(s3prl.hub)
