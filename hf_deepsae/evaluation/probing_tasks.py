"""Text classification tasks for sparse probing: any `datasets` dataset, or offline corpora.

`load_classification_task` reads a Hub dataset id or local files (csv, json, parquet, ...) with a
text column and a label column chosen by name. `default_probing_tasks` builds tasks from texts
that ship with Python or Debian, so the benchmark runs offline:

- `source`: which corpus a passage comes from: Python's documentation (`pydoc_data.topics`),
  standard-library docstrings (read with `ast`), the King James Bible (Debian's `bible-kjv`,
  read through its `bible` command);
- `code_vs_prose`: standard-library function bodies (docstrings removed) against prose passages of
  the other corpora.

A corpus that is missing (no `bible` command) is left out and said so in the task's `notes`, so
the default set still runs.
"""

from __future__ import annotations

import ast
import functools
import random
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..activations import load_text_dataset

STDLIB_MODULES = ("argparse", "asyncio/tasks", "collections/__init__", "concurrent/futures/_base",
                  "configparser", "csv", "dataclasses", "datetime", "email/message", "enum",
                  "functools", "http/client", "inspect", "json/decoder", "logging/__init__",
                  "os", "pathlib", "pickle", "shutil", "subprocess", "tarfile", "textwrap",
                  "threading", "typing", "unittest/case", "urllib/parse", "zipfile/__init__")
"""Standard-library modules (paths under the stdlib folder) whose docstrings and code are read."""
MIN_PASSAGE_WORDS = 25
BIBLE_INSTALL_HINT = ("the Bible is missing from the 'source' task: the `bible` command of "
                      "Debian's bible-kjv package is not installed (apt-get install bible-kjv)")


@dataclass
class TextClassificationTask:
    """Texts with one class each; `notes` says what was left out while building it."""

    name: str
    texts: list[str]
    labels: list[str]
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if len(self.texts) != len(self.labels):
            raise ValueError(f"task {self.name!r} has {len(self.texts)} texts but "
                             f"{len(self.labels)} labels")

    @property
    def classes(self) -> list[str]:
        return sorted(set(self.labels))


def load_classification_task(name_or_path: str, *, text_column: str = "text",
                             label_column: str = "label", config_name: str | None = None,
                             split: str = "train") -> TextClassificationTask:
    """A task from a Hub dataset id or local file/folder; class labels keep their names."""
    dataset = load_text_dataset(name_or_path, config_name=config_name, split=split,
                                text_column=text_column)
    if label_column not in dataset.column_names:
        raise ValueError(f"dataset {name_or_path!r} has no column {label_column!r}; its columns "
                         f"are {dataset.column_names} (choose one with --label_column)")
    feature = dataset.features[label_column]
    labels = [feature.int2str(label) if hasattr(feature, "int2str") else str(label)
              for label in dataset[label_column]]
    return TextClassificationTask(Path(name_or_path).name or name_or_path,
                                  list(dataset[text_column]), labels)


def _words(text: str) -> int:
    return len(text.split())


def python_docs_passages() -> list[str]:
    """Paragraphs of Python's documentation topics (prose, some code examples)."""
    from pydoc_data.topics import topics

    paragraphs = (paragraph.strip() for text in topics.values()
                  for paragraph in re.split(r"\n\s*\n", text))
    return [p for p in paragraphs if _words(p) >= MIN_PASSAGE_WORDS and not p.startswith(">>>")]


@functools.cache
def _stdlib_trees() -> list[tuple[list[str], ast.Module]]:
    """`(lines, syntax tree)` of each module in `STDLIB_MODULES` this Python has."""
    folder = Path(shutil.__file__).parent
    trees = []
    for module in STDLIB_MODULES:
        path = folder / f"{module}.py"
        if path.is_file():
            source = path.read_text(encoding="utf-8")
            trees.append((source.splitlines(), ast.parse(source)))
    return trees


def _definitions(tree: ast.Module) -> list[ast.FunctionDef | ast.ClassDef | ast.Module]:
    return [tree, *(node for node in ast.walk(tree)
                    if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef))]


def stdlib_docstrings() -> list[str]:
    """Docstrings of standard-library modules, classes and functions (long ones only)."""
    docstrings = (ast.get_docstring(node) for _, tree in _stdlib_trees()
                  for node in _definitions(tree))
    return [d for d in docstrings if d and _words(d) >= MIN_PASSAGE_WORDS]


def stdlib_code() -> list[str]:
    """Bodies of standard-library functions with their docstrings removed."""
    passages = []
    for lines, tree in _stdlib_trees():
        for node in ast.walk(tree):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            body = node.body[1:] if ast.get_docstring(node) else node.body
            if not body:
                continue
            code = "\n".join(lines[body[0].lineno - 1:body[-1].end_lineno])
            if _words(code) >= MIN_PASSAGE_WORDS:
                passages.append(code)
    return passages


def bible_passages(min_words: int = 60) -> list[str] | None:
    """Runs of consecutive King James verses of at least `min_words` words, or None if Debian's
    `bible` command (package bible-kjv) is not installed."""
    if shutil.which("bible") is None:
        return None
    text = subprocess.run(["bible", "gen1:1-rev22:21"], capture_output=True, text=True,
                          check=True).stdout
    verses = [" ".join(re.split(r"\n\n\S", verse)[0].split())
              for verse in re.split(r"\n\s+\d+ ", text)[1:]]
    passages, current = [], []
    for verse in verses:
        current.append(verse)
        if _words(" ".join(current)) >= min_words:
            passages.append(" ".join(current))
            current = []
    return passages


def default_probing_tasks(max_per_class: int = 2000, seed: int = 0
                          ) -> list[TextClassificationTask]:
    """The offline tasks `source` and `code_vs_prose` (see the module docstring), at most
    `max_per_class` passages per class drawn at random (seeded)."""
    rng = random.Random(seed)

    def draw(passages: list[str]) -> list[str]:
        return rng.sample(passages, min(max_per_class, len(passages)))

    corpora = {"python_docs": draw(python_docs_passages()),
               "stdlib_docstrings": draw(stdlib_docstrings())}
    notes = []
    bible = bible_passages()
    if bible is None:
        notes.append(BIBLE_INSTALL_HINT)
        print(f"sparse probing: {BIBLE_INSTALL_HINT}", file=sys.stderr)
    else:
        corpora["bible_kjv"] = draw(bible)
    source = TextClassificationTask(
        "source", [text for texts in corpora.values() for text in texts],
        [name for name, texts in corpora.items() for _ in texts], notes)
    prose = draw([text for texts in corpora.values() for text in texts])
    code = draw(stdlib_code())
    code_vs_prose = TextClassificationTask("code_vs_prose", prose + code,
                                           ["prose"] * len(prose) + ["code"] * len(code))
    return [source, code_vs_prose]
