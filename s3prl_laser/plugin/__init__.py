"""Layer 5, ``plugin``: how ``hubert_laser`` / ``wavlm_laser`` reach ``s3prl.hub`` and ESPnet.

The hub entries in s3prl's hubconf style (:mod:`.hubconf`, wrapping s3prl's own experts), their registration
on ``s3prl.hub`` (:mod:`.registration`, run by the start-up hook ``s3prl_laser._startup``), and the small
shims that let s3prl's unchanged code run on today's libraries (:mod:`.shims`).

May import: layers 0-4 (``models`` included) and s3prl's upstream experts; not ``training`` or ``probe``
(same layer).
"""
