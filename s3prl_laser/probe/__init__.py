"""A content check in minutes: a SUPERB-style CTC probe on the frozen features of several upstreams.

``python -m s3prl_laser.probe --data /data/LibriSpeech --upstream hubert_laser:run/hubert_laser.pt
--upstream hubert_local:base.pt --out probe/`` trains, for each upstream, SUPERB's learnable softmax
weights over all hidden layers and a linear CTC head on the same seeded clips, with the same seed and
step budget, and reports the character error rate (and the phone error rate with ``--lexicon``) on
dev-clean, side by side. Modules, one job each: :mod:`.clips` (which clips), :mod:`.targets`
(characters, lexicon phones), :mod:`.features` (every layer, extracted once, cached on disk),
:mod:`.head` (head and its training), :mod:`.decode` (greedy CTC, error rates), :mod:`.report`
(table, PNG, JSON), :mod:`.runner` (the whole probe), :mod:`.cli` (the command line).

Layer 6, ``probe``: may import layers 0-5 (``data``, ``plugin``'s registration, ...); :mod:`.cli` and
``__main__`` are the command (layer 8).
"""
