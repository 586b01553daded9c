"""s3prl-laser: LASER soft-DTW alignment fine-tuning of HuBERT/WavLM as an s3prl plugin.

Importing this package is cheap: no torch, no s3prl. Heavy modules are imported by the
sub-modules that need them (``s3prl_laser.softdtw``, ``s3prl_laser.finetune``, ...).
"""

__version__ = "0.1.0"
