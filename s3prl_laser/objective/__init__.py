"""Layer 2, ``objective``: what LASER optimises, knowing nothing of s3prl.

The projection head, the temporal regulariser and the LASER loss (:mod:`.loss`, on the soft-DTW engine), and
the perturbed second view (:mod:`.perturb`: speed, then pitch).

May import: layers 0-1 (``errors``, ``console``, ``stacks``, ``names``; ``softdtw``).
"""
