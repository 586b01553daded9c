"""Probe targets: characters of the transcripts, and phones from a g2p lexicon as SUPERB PR makes them.

Characters: the 26 letters, the apostrophe and ``|`` for the space between words (SUPERB ASR's character
set). Phones: each word of the transcript replaced by its pronunciation in a lexicon in s3prl's g2p format
(``WORD<TAB>PH1 PH2 ...``, as ``librispeech-lexicon-200k-g2p.txt``; whitespace also separates the word;
the first entry of a word wins, and of several files the first that has it), without word boundaries,
phones kept as the lexicon writes them. Index 0 of every vocabulary is the CTC blank.

Example::

    >>> vocab = Vocabulary.characters()
    >>> vocab.encode(list(char_units("IT IS")))
    [10, 21, 1, 10, 20]
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from s3prl_laser.errors import MissingFileError, UserInputError

BLANK = "<blank>"
CHARACTERS = ("|", "'", *"ABCDEFGHIJKLMNOPQRSTUVWXYZ")


@dataclass(frozen=True)
class Vocabulary:
    """Symbols of a target kind; index 0 is the CTC blank."""

    symbols: tuple[str, ...]

    @classmethod
    def characters(cls) -> Vocabulary:
        return cls((BLANK, *CHARACTERS))

    @classmethod
    def of(cls, sequences: list[list[str]]) -> Vocabulary:
        """The sorted symbols used by ``sequences``, after the blank."""
        return cls((BLANK, *sorted({s for seq in sequences for s in seq})))

    def __len__(self) -> int:
        return len(self.symbols)

    def decode(self, ids: list[int]) -> str:
        """Symbols joined: characters as text (``|`` back to a space), other symbols space-separated."""
        if self.symbols[1:] == CHARACTERS:
            return "".join(self.symbols[i] for i in ids).replace("|", " ")
        return " ".join(self.symbols[i] for i in ids)

    def encode(self, units: list[str]) -> list[int]:
        index = {s: i for i, s in enumerate(self.symbols)}
        return [index[u] for u in units if u in index]


def char_units(text: str) -> list[str]:
    """``"IT IS"`` -> ``['I', 'T', '|', 'I', 'S']``: letters and apostrophes, ``|`` between words."""
    return list("|".join(text.split()))


def read_lexicons(paths: list[str | Path]) -> dict[str, list[str]]:
    """``{WORD: [phones]}`` from g2p lexicon files; the first entry of a word wins."""
    lexicon: dict[str, list[str]] = {}
    for path in paths:
        path = Path(path).expanduser()
        if not path.is_file():
            raise MissingFileError(f"--lexicon {path}: no such file")
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as error:
            raise UserInputError(f"--lexicon {path}: unreadable ({error.__class__.__name__})") from error
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            word, *phones = line.split()
            if not phones:
                raise UserInputError(
                    f"--lexicon {path}:{number}: {word!r} has no phones (expected WORD<TAB>PH1 PH2 ...)"
                )
            lexicon.setdefault(word.upper(), phones)
    return lexicon


def phone_units(texts: list[str], lexicon: dict[str, list[str]], where: str) -> list[list[str]]:
    """The phones of each transcript; a word missing from the lexicon is a ``UserInputError`` naming it."""
    missing = sorted({w for text in texts for w in text.split() if w not in lexicon})
    if missing:
        shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise UserInputError(
            f"--lexicon {where}: {len(missing)} word(s) of the transcripts have no entry ({shown}); "
            "use a lexicon that covers the corpus (for LibriSpeech, SUPERB's "
            "librispeech-lexicon-200k-g2p.txt and librispeech-lexicon-allothers-g2p.txt: --lexicon twice)"
        )
    return [[ph for w in text.split() for ph in lexicon[w]] for text in texts]
