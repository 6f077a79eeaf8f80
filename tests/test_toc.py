"""One chapter numbering everywhere: the book's table of contents, the README and the links in the prose."""
import json
import re
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def toc_parts():
    "[(numbered, [notebook names])] in book order."
    toc = yaml.safe_load((REPO / "_book" / "_toc.yml").read_text())
    return [(p.get("numbered", False), [Path(c["file"]).name for c in p["chapters"]]) for p in toc["parts"]]


def book_labels():
    "Each chapter's label as the book shows it: 1, 2, ... across the numbered parts, A, B, ... for the appendices."
    labels, n, letter = {}, 0, ord("A")
    for numbered, names in toc_parts():
        for name in names:
            if numbered: n += 1; labels[name] = str(n)
            else: labels[name] = chr(letter); letter += 1
    return labels


def markdown_cells(nb_path):
    return ["".join(c["source"]) for c in json.loads(nb_path.read_text())["cells"] if c["cell_type"] == "markdown"]


def test_every_notebook_is_in_the_book_once():
    names = [n for _, names in toc_parts() for n in names]
    assert len(names) == len(set(names))
    on_disk = {p.stem for p in (REPO / "nbs").glob("*.ipynb")} - {"index"}
    assert set(names) == on_disk, f"not in _book/_toc.yml: {on_disk - set(names)}; missing: {set(names) - on_disk}"


def test_readme_numbers_the_chapters_as_the_book_does():
    rows = re.findall(r"^\| (\w+) \| [^|]*\(`nbs/(\w+)\.ipynb`\)", (REPO / "README.md").read_text(), re.M)
    assert dict((name, label) for label, name in rows) == book_labels()


def test_links_between_chapters_point_at_chapters_and_numbers_are_not_typed_by_hand():
    names = {n for _, ns in toc_parts() for n in ns} | {"index"}
    for nb in sorted((REPO / "nbs").glob("*.ipynb")):
        for text in markdown_cells(nb):
            for target in re.findall(r"\]\(([\w.-]+)\.ipynb\)", text):
                assert target in names, f"{nb.name} links to {target}.ipynb, which is not a chapter"
            # "Raschka's chapters 6 and 7" cite another book; our own chapters are named, not numbered
            cites = re.compile(r"book's|Raschka|From Scratch\)")
            typed = [m for m in re.finditer(r"\b[Cc]hapters? \d+", text) if not cites.search(text[max(0, m.start() - 60):m.start()])]
            assert not typed, f"{nb.name}: {typed[0].group(0)!r}: refer to a chapter by its title, linked"
