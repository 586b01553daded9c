"""Layer 5, ``plugin``: how ``hubert_laser`` / ``wavlm_laser`` reach ``s3prl.hub`` and ESPnet.

The hub entries in s3prl's hubconf style (:mod:`.hubconf`, wrapping s3prl's own experts), their registration
on ``s3prl.hub`` (:mod:`.registration`, run by the start-up hook ``s3prl_laser._startup``), and the small
shims that let s3prl's unchanged code run on today's libraries (:mod:`.shims`).

The package's ``register()`` (``s3prl_laser/__init__.py``) and the start-up hook (``s3prl_laser._startup``)
share this layer.

May import: layers 0-4 (``models`` included) and s3prl's upstream experts (:mod:`.hubconf` only); never
``probe`` or ``training`` (layers 6 and 7, which load upstreams through this registration).
"""
