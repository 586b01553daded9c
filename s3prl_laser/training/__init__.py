"""Layer 7, ``training``: a LASER fine-tuning run, from its config to its last checkpoint.

The config and its resume rules (:mod:`.config`), run paths (:mod:`.paths`), ranks and stop signals
(:mod:`.ranks`), the trainable parts and the schedule (:mod:`.parts`), the loop and one step (:mod:`.loop`),
checkpoints (:mod:`.checkpoints`), validation while training (:mod:`.validation`) and the held-out metrics it
measures (:mod:`.heldout`), the length index (:mod:`.length_index`), the ``--demo`` report
(:mod:`.demo_report`).

May import: layers 0-6 (``models``; ``plugin``'s registration, to load upstreams through ``s3prl.hub``;
``probe``, whose table the ``--demo`` report shows); never s3prl's upstream internals or transformers' model
classes.
"""
