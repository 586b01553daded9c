"""s3prl-laser: LASER soft-DTW alignment fine-tuning of HuBERT/WavLM as an s3prl plugin.

Importing this package is cheap: no torch, no s3prl. Heavy modules are imported by the
sub-modules that need them (``s3prl_laser.softdtw``, ``s3prl_laser.finetune``, ...).
"""

__version__ = "0.1.0"


def register() -> tuple[str, ...]:
    """Put the LASER entries (``hubert_laser``, ``wav2vec2_laser``, ...) on ``s3prl.hub`` (imports torch).

    The installed start-up hook does this by itself when ``s3prl.hub`` is first imported; call this
    when embedding s3prl where the hook is not installed (e.g. the package is only on ``PYTHONPATH``).

    Example::

        >>> import s3prl_laser, s3prl.hub
        >>> s3prl_laser.register()
        ('hubert_laser', 'wavlm_laser', 'wav2vec2_laser', 'data2vec_laser')
        >>> "hubert_laser" in s3prl.hub.options()
        True
    """
    from s3prl_laser.plugin.registration import register as _register

    return _register()
