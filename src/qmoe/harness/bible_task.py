"""``qmoe_bible_next``: an offline lm-evaluation-harness task built from the project's Bible corpus.

The hubs that hold HellaSwag, ARC or MMLU are not reachable from every machine (ours included), so qmoe ships
one task in the harness's own format that needs nothing but the installed corpus packages: a multiple-choice
"which verse comes next" question over held-out books (``qmoe.calib`` splits by book, so no verse of the
``test`` split was seen in training or calibration). Each document is

    {"context": verse i of a chapter, "choices": [4 verses], "label": index of verse i+1 among them}

with three distractors drawn from other chapters of the same split, the documents in random order (the
harness's ``--limit N`` takes the first N). ``write_task`` writes the data
(``qmoe_bible_next.jsonl``) and a task YAML (``qmoe_bible_next.yaml``: ``dataset_path: json`` with
``data_files``) into a directory that ``lm_eval.tasks.TaskManager(include_path=...)`` (and ``lm_eval
--include_path``) reads like any other task folder. Chance accuracy is 0.25.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from qmoe.errors import DataError

TASK_NAME = "qmoe_bible_next"
DEFAULT_DOCS = 1000
DEFAULT_SPLIT = "test"
DEFAULT_SEED = 0
CHOICES = 4


def task_documents(split: str = DEFAULT_SPLIT, docs: int = DEFAULT_DOCS,
                   seed: int = DEFAULT_SEED) -> list[dict]:
    """``docs`` documents (context, choices, label) from ``split``, the same for the same arguments."""
    from qmoe.calib.corpus import bible_chapter_verses

    if docs < 1:
        raise DataError(f"the task needs at least 1 document, got {docs}")
    chapters = bible_chapter_verses(split)
    pairs = [(c, i) for c, verses in enumerate(chapters) for i in range(len(verses) - 1)]
    if docs > len(pairs):
        raise DataError(f"the {split} split has {len(pairs)} consecutive verse pairs, fewer than the {docs} "
                        "documents asked for; ask for fewer")
    rng = random.Random(seed)
    out = []
    for c, i in rng.sample(pairs, docs):  # in random order, so that --limit N takes a random subset
        answer = chapters[c][i + 1]
        distractors: list[str] = []
        while len(distractors) < CHOICES - 1:
            d = rng.randrange(len(chapters))
            verse = chapters[d][rng.randrange(len(chapters[d]))]
            # from another chapter, and no duplicate text (both translations share some verses word for word)
            if d != c and verse != answer and verse not in distractors:
                distractors.append(verse)
        label = rng.randrange(CHOICES)
        choices = distractors[:label] + [answer] + distractors[label:]
        out.append({"context": chapters[c][i], "choices": choices, "label": label})
    return out


def task_yaml(data_file: Path) -> str:
    """The task definition in lm-eval's YAML format, reading ``data_file`` (an absolute path)."""
    # json.dumps quotes the path as a YAML double-quoted scalar (JSON strings are valid YAML).
    return f"""\
task: {TASK_NAME}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {json.dumps(str(data_file))}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: choices
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def write_task(directory: str | Path, split: str = DEFAULT_SPLIT, docs: int = DEFAULT_DOCS,
               seed: int = DEFAULT_SEED) -> Path:
    """Write ``qmoe_bible_next.{jsonl,yaml}`` into ``directory`` (created); returns the YAML's path."""
    directory = Path(directory).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    data = directory / f"{TASK_NAME}.jsonl"
    rows = task_documents(split, docs, seed)
    for path, text in ((data, "".join(json.dumps(r) + "\n" for r in rows)),
                       (directory / f"{TASK_NAME}.yaml", task_yaml(data))):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    return directory / f"{TASK_NAME}.yaml"
