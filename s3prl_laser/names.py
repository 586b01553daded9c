"""Layer 0, ``names``: the package's fixed vocabularies, one definition each, importing nothing.

Every command's parser (``--upstream``, ``--loss-type``), ``training.config``'s checks and the model code
take these from here, so ``--help`` needs no torch and a new family is added in one place.

Example:
    >>> from s3prl_laser.names import UPSTREAMS, laser_entry
    >>> [laser_entry(upstream) for upstream in UPSTREAMS]
    ['hubert_laser', 'wavlm_laser', 'wav2vec2_laser', 'data2vec_laser']
"""

UPSTREAMS = ("hubert", "wavlm", "wav2vec2", "data2vec")  # the base model families, as s3prl names its experts
LOSS_TYPES = ("softdtw_lav", "softdtw")  # LASER's loss (with the temporal regulariser), plain soft-DTW


def laser_entry(upstream: str) -> str:
    """The ``s3prl.hub`` entry (and file stem) of a tuned model of family ``upstream``: ``hubert_laser``."""
    return f"{upstream}_laser"


LASER_ENTRIES = tuple(laser_entry(upstream) for upstream in UPSTREAMS)
