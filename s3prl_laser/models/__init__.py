"""Layer 4, ``models``: everything that knows a speech model's insides.

Loading a base from every source ``--ckpt`` may name (:mod:`.sources`: s3prl-format and fairseq files,
Hugging Face folders and hub ids, s3prl names), the model wrapper that freezes by name and writes s3prl's
format back (:mod:`.upstream`), s3prl-format read/write (:mod:`.s3prl_format`), the fairseq reader
(:mod:`.fairseq_import`), Hugging Face import and export (:mod:`.hf_import`, :mod:`.hf_export`), the tiny
random-init test models (:mod:`.tiny`). Every source comes back as one s3prl-format dict
(:func:`.sources.read_source`).

May import: layers 0-3 (``errors``, ``console``, ``stacks``, ``names``; ``softdtw``; ``objective``; ``data``),
s3prl's upstream internals and transformers' model classes. Outside this folder, only ``plugin/``'s hub
entries (which wrap s3prl's own experts) import s3prl's upstream internals, and nothing imports transformers'
model classes (docs/development.md, "Layout: the package in layers"; tests/test_layers.py holds it).
"""
