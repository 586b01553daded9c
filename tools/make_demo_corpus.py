"""Synthesise the bundled demo speech corpus with espeak-ng, laid out exactly like LibriSpeech.

Run it from the repository root (needs ``espeak-ng`` 1.51 and ``sox`` 14.4 on PATH,
``apt-get install espeak-ng sox``)::

    python tools/make_demo_corpus.py                      # writes s3prl_laser/assets/demo_corpus/
    python tools/make_demo_corpus.py --out /tmp/corpus    # anywhere else

What it makes, under ``<out>/LibriSpeech/``:

- ``train-clean-100/`` (4 speakers x 10 utterances), ``dev-clean/`` and ``test-clean/`` (2 speakers x 5
  each); every speaker appears in one split only. Audio ``<spk>/<chap>/<spk>-<chap>-<utt>.flac`` is 16 kHz
  mono 16-bit FLAC, 1.5 to 5 s; ``<spk>/<chap>/<spk>-<chap>.trans.txt`` holds ``<utt-id> <TRANSCRIPT>``
  lines with LibriSpeech's rules (upper-case letters, apostrophes and single spaces).
- ``phonemes/<split>.txt``: ``<utt-id> <ph1> <ph2> ...``, espeak-ng's own phonemisation (``-x``) for the
  speaker's accent, mapped to the 39 ARPAbet phonemes (no stress) listed in ``phonemes/inventory.txt``.
- ``phonemes/lexicon.txt``: a phone lexicon of every word of the transcripts in s3prl's g2p format
  (``WORD<TAB>PH1 PH2 ...``, as ``librispeech-lexicon-200k-g2p.txt``): espeak-ng's American English
  (``en-us``) phonemisation of the word alone, mapped to the same ARPAbet set (``python -m
  s3prl_laser.probe --lexicon``).
- ``SPEAKERS.TXT`` (LibriSpeech's speaker table, with the espeak-ng voice, speed and pitch per speaker)
  and ``README.TXT``.

Each speaker is one espeak-ng voice/variant with its own speed (``-s``, words per minute) and pitch
(``-p``). The 60 sentences and the voice assignment are fixed, sox runs in repeatable mode without
dither, so the output is deterministic; the corpus is built in a temporary folder that then replaces
``<out>/LibriSpeech`` whole, so running the script again gives the same tree (idempotent).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

SAMPLE_RATE = 16000
MIN_SECONDS, MAX_SECONDS = 1.5, 5.0
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "s3prl_laser" / "assets" / "demo_corpus"

# Sixty short sentences of our own; each is used once.
SENTENCES = [
    "The old mill stood beside the quiet river.",
    "She carried a basket of apples up the hill.",
    "A cold wind blew across the empty field.",
    "The children laughed as the kite rose higher.",
    "He closed the heavy door behind him.",
    "Bright stars filled the clear night sky.",
    "The baker's bread was warm and soft.",
    "We walked along the shore until sunset.",
    "The little dog barked at the passing cart.",
    "Rain tapped gently on the window glass.",
    "The captain studied the map by candlelight.",
    "Fresh snow covered the sleeping village.",
    "My brother found a shiny coin in the sand.",
    "The teacher wrote a long word on the board.",
    "A gray owl watched from the tall pine.",
    "They shared a simple meal of soup and bread.",
    "The clock in the hall struck nine.",
    "Her voice was calm and very kind.",
    "The farmer mended the fence before winter.",
    "Smoke curled slowly from the chimney.",
    "The train arrived late in the evening.",
    "A young fox crept through the tall grass.",
    "He read the letter twice and smiled.",
    "The garden was full of yellow flowers.",
    "Waves crashed against the rocky coast.",
    "The queen's horse wore a silver bridle.",
    "We heard thunder far beyond the mountains.",
    "The lamp threw long shadows on the wall.",
    "A merchant sold cloth at the busy market.",
    "The boy climbed the ladder to the roof.",
    "Our neighbor plays the violin every morning.",
    "The bridge was built of stone and oak.",
    "She painted the boat a deep shade of blue.",
    "The path wound through a dark forest.",
    "A sudden storm delayed the ship for days.",
    "The soldier polished his boots with care.",
    "Bees hummed among the clover in the meadow.",
    "The king's garden had a marble fountain.",
    "He whistled a tune while he worked.",
    "The moon rose slowly over the lake.",
    "A thin layer of ice covered the pond.",
    "The girl tied a ribbon in her hair.",
    "The fisherman pulled his net from the water.",
    "Dust settled on the books in the attic.",
    "They rode their bicycles to the station.",
    "The cook stirred the pot with a wooden spoon.",
    "An eagle circled high above the valley.",
    "The doctor's bag was old and worn.",
    "We planted three trees near the gate.",
    "The river froze during the long winter.",
    "A traveler asked the way to the inn.",
    "The cat slept on a warm stone step.",
    "He sharpened the knife on a flat rock.",
    "The choir sang a joyful song at noon.",
    "Leaves turned red and gold in autumn.",
    "The shepherd counted his sheep at dusk.",
    "She opened the window to let in fresh air.",
    "The wagon wheel creaked on the dusty road.",
    "A small boat drifted toward the island.",
    "The judge listened carefully to both sides.",
]


@dataclass(frozen=True)
class Speaker:
    split: str
    speaker: int
    chapter: int
    sex: str
    voice: str  # espeak-ng voice (accent) + variant (timbre)
    speed: int  # words per minute (-s)
    pitch: int  # 0..99 (-p)
    n_utts: int

    @property
    def accent(self) -> str:
        """The voice without its variant: what espeak-ng phonemises with."""
        return self.voice.split("+")[0]


SPEAKERS = [
    Speaker("train-clean-100", 1001, 10010, "M", "en-us+m3", 150, 45, 10),
    Speaker("train-clean-100", 1002, 10020, "F", "en-us+f2", 165, 65, 10),
    Speaker("train-clean-100", 1003, 10030, "M", "en-gb+m1", 155, 40, 10),
    Speaker("train-clean-100", 1004, 10040, "F", "en-gb-x-rp+f3", 170, 70, 10),
    Speaker("dev-clean", 2001, 20010, "M", "en-us+m5", 160, 35, 5),
    Speaker("dev-clean", 2002, 20020, "F", "en-gb-scotland+f4", 150, 60, 5),
    Speaker("test-clean", 3001, 30010, "M", "en-029+m2", 155, 50, 5),
    Speaker("test-clean", 3002, 30020, "F", "en-us+f1", 175, 75, 5),
]

# espeak-ng's English phoneme mnemonics (stress marks removed) -> ARPAbet (39 phonemes, no stress).
ESPEAK_TO_ARPABET = {
    # consonants
    "p": ["P"], "b": ["B"], "t": ["T"], "d": ["D"], "k": ["K"], "g": ["G"],
    "f": ["F"], "v": ["V"], "T": ["TH"], "D": ["DH"], "s": ["S"], "z": ["Z"],
    "S": ["SH"], "Z": ["ZH"], "h": ["HH"], "tS": ["CH"], "dZ": ["JH"],
    "m": ["M"], "n": ["N"], "N": ["NG"], "l": ["L"], "r": ["R"], "w": ["W"], "j": ["Y"],
    "t#": ["T"], "d#": ["D"], "t[": ["T"], "?": ["T"], "x": ["K"], "r-": ["R"], "w#": ["W"],
    "n-": ["AH", "N"], "l-": ["AH", "L"], "m-": ["AH", "M"], "@L": ["AH", "L"],
    # vowels
    "@": ["AH"], "@2": ["AH"], "@5": ["AH"], "V": ["AH"], "a#": ["AH"], "VR": ["AH", "R"],
    "3": ["ER"], "3:": ["ER"], "@r": ["ER"],
    "a": ["AE"], "aa": ["AE"], "A:": ["AA"], "A": ["AA"], "0": ["AA"], "A@": ["AA", "R"],
    "O:": ["AO"], "O": ["AO"], "O2": ["AA"], "0:": ["AO"], "O@": ["AO", "R"], "o@": ["AO", "R"], "OI": ["OY"],
    "aI": ["AY"], "aI2": ["AY"], "aI@": ["AY", "ER"], "aI3": ["AY", "ER"], "aU": ["AW"], "aU@": ["AW", "ER"],
    "oU": ["OW"], "o:": ["OW"], "e": ["EY"], "eI": ["EY"], "e@": ["EH", "R"], "E": ["EH"],
    "I": ["IH"], "I#": ["IH"], "I2": ["IH"], "i": ["IY"], "i:": ["IY"], "i@": ["IY", "AH"],
    "i@3": ["IH", "R"], "IR": ["IH", "R"], "u:": ["UW"], "u": ["UW"], "U": ["UH"], "U@": ["UH", "R"],
}  # fmt: skip
ARPABET = sorted({ph for phones in ESPEAK_TO_ARPABET.values() for ph in phones})


def transcript(sentence: str) -> str:
    """LibriSpeech-style transcript: upper-case letters, apostrophes, single spaces."""
    return " ".join(re.sub(r"[^A-Z' ]", " ", sentence.upper()).split())


def run(cmd: list[str]) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def phonemes(sentence: str, accent: str) -> list[str]:
    """espeak-ng's phonemisation of ``sentence`` in ``accent``, mapped to ARPAbet."""
    out = run(["espeak-ng", "-q", "-x", "--sep= ", "-v", accent, sentence])
    phones: list[str] = []
    for token in out.split():
        token = token.lstrip("',%=")  # stress marks
        if not token or token.startswith("_") or token == ";":  # pauses and linking marks
            continue
        if token not in ESPEAK_TO_ARPABET:
            raise ValueError(f"espeak-ng phoneme {token!r} ({accent}: {sentence!r}) has no ARPAbet mapping")
        phones.extend(ESPEAK_TO_ARPABET[token])
    return phones


LEXICON_ACCENT = "en-us"


def lexicon_lines(sentences: list[str]) -> list[str]:
    """``WORD<TAB>PH1 PH2 ...`` for every word of the transcripts of ``sentences``, sorted by word."""
    words = sorted({word for sentence in sentences for word in transcript(sentence).split()})
    return [f"{word}\t{' '.join(phonemes(word.lower(), LEXICON_ACCENT))}\n" for word in words]


def synthesise(sentence: str, spk: Speaker, flac: Path) -> float:
    """Speak ``sentence`` with the speaker's voice into a 16 kHz mono 16-bit FLAC; return its seconds."""
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "espeak.wav"
        run(
            [
                "espeak-ng",
                "-v",
                spk.voice,
                "-s",
                str(spk.speed),
                "-p",
                str(spk.pitch),
                "-w",
                str(raw),
                sentence,
            ]
        )
        # -R: repeatable, -D: no dither (deterministic). Trim espeak's trailing silence to 0.1 s.
        run(["sox", "-R", "-D", str(raw), "-r", str(SAMPLE_RATE), "-c", "1", "-b", "16", str(flac),
             "reverse", "silence", "1", "0.02", "0.5%", "reverse", "pad", "0", "0.1"])  # fmt: skip
    seconds = float(run(["soxi", "-D", str(flac)]))
    if not MIN_SECONDS <= seconds <= MAX_SECONDS:
        raise ValueError(f"{flac.name}: {seconds:.2f} s is outside [{MIN_SECONDS}, {MAX_SECONDS}] s")
    return seconds


def build(root: Path) -> dict[str, float]:
    """Write the whole corpus under ``root`` (the ``LibriSpeech`` folder); return seconds per split."""
    if sum(spk.n_utts for spk in SPEAKERS) != len(SENTENCES):
        raise ValueError("SPEAKERS must use every sentence exactly once")
    seconds: dict[str, float] = {}
    speaker_seconds: dict[int, float] = {}
    phone_lines: dict[str, list[str]] = {}
    sentences = iter(SENTENCES)
    for spk in SPEAKERS:
        chapter_dir = root / spk.split / str(spk.speaker) / str(spk.chapter)
        chapter_dir.mkdir(parents=True)
        trans = []
        for utt in range(spk.n_utts):
            sentence = next(sentences)
            utt_id = f"{spk.speaker}-{spk.chapter}-{utt:04d}"
            duration = synthesise(sentence, spk, chapter_dir / f"{utt_id}.flac")
            seconds[spk.split] = seconds.get(spk.split, 0.0) + duration
            speaker_seconds[spk.speaker] = speaker_seconds.get(spk.speaker, 0.0) + duration
            trans.append(f"{utt_id} {transcript(sentence)}\n")
            phone_lines.setdefault(spk.split, []).append(
                f"{utt_id} {' '.join(phonemes(sentence, spk.accent))}\n"
            )
        (chapter_dir / f"{spk.speaker}-{spk.chapter}.trans.txt").write_text("".join(trans))
    (root / "phonemes").mkdir()
    for split, lines in phone_lines.items():
        (root / "phonemes" / f"{split}.txt").write_text("".join(lines))
    (root / "phonemes" / "inventory.txt").write_text("".join(f"{ph}\n" for ph in ARPABET))
    (root / "phonemes" / "lexicon.txt").write_text("".join(lexicon_lines(SENTENCES)))
    table = [";ID  |SEX| SUBSET           |MINUTES| NAME (espeak-ng voice, speed -s, pitch -p)\n"]
    for spk in SPEAKERS:
        minutes = speaker_seconds[spk.speaker] / 60
        name = f"{spk.voice} -s {spk.speed} -p {spk.pitch}"
        table.append(f"{spk.speaker:<5}| {spk.sex} | {spk.split:<17}| {minutes:5.2f} | {name}\n")
    (root / "SPEAKERS.TXT").write_text("".join(table))
    (root / "README.TXT").write_text(
        "Synthetic demo corpus in the LibriSpeech layout, spoken by espeak-ng "
        f"{run(['espeak-ng', '--version']).split()[3]} (see SPEAKERS.TXT).\n"
        "Made by tools/make_demo_corpus.py of s3prl-laser; the sentences are the project's own.\n"
        "For tests and demos only: synthetic speech says nothing about accuracy on real speech.\n"
    )
    return seconds


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder that receives LibriSpeech/")
    return parser


def main(argv: list[str] | None = None) -> int:
    out = get_args_parser().parse_args(argv).out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        seconds = build(Path(tmp) / "LibriSpeech")
        shutil.rmtree(out / "LibriSpeech", ignore_errors=True)
        (Path(tmp) / "LibriSpeech").rename(out / "LibriSpeech")
    size = sum(f.stat().st_size for f in (out / "LibriSpeech").rglob("*") if f.is_file())
    for split, total in seconds.items():
        print(f"{split}: {total:.1f} s of audio")
    print(f"wrote {out / 'LibriSpeech'} ({size / 2**20:.2f} MiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
