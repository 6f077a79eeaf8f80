"""Sphinx extension: read nbdev's `#|` cell directives the way a reader should see the notebook.

nbdev marks cells with comment lines such as `#| export` or `#| hide`. They mean something to
nbdev, nothing to a reader, so this strips them from the rendered code and maps the ones that
change what is shown to jupyter-book cell tags:

- `#| hide`, `#| default_exp …`  -> `remove-cell`   (runs, but is not shown)
- `#| echo: false`               -> `remove-input`  (only the output is shown)
- `#| output: false`             -> `remove-output`
- `#| eval: false`               -> `skip-execution` (the stored outputs, if any, are shown)
- `#| hide` on a cell that starts `# Solution` -> `hide-cell` (an exercise's solution: folded behind a
  "show" toggle in the HTML book, printed in full at the chapter's end in the PDF)

Each executed page says, under its title, how long its code took to run. It also drops sphinx-thebe's scripts from the HTML pages: the book is read offline, with no kernel.
In the LaTeX book, each part of `_toc.yml` opens with a `\\part` page and the unnumbered last part (the appendices)
is lettered A, B, C; each CJK character and each emoji/symbol that the Free fonts lack is made to switch
to `\cjkfont` / `\symbolfont` (declared in _config.yml), in prose and in code blocks alike.
"""
import json
import re

from docutils import nodes
from sphinx.transforms import SphinxTransform

_DIRECTIVE = re.compile(r"^\s*#\|\s*(?P<name>[\w-]+)\s*:?\s*(?P<value>.*?)\s*$")
_TAGS = {"hide": "remove-cell", "default_exp": "remove-cell", "echo": "remove-input",
         "output": "remove-output", "eval": "skip-execution"}


def directives(source):
    "Split a cell's source into its nbdev directives {name: value} and the remaining lines."
    found, rest = {}, []
    for line in source.splitlines(keepends=True):
        m = _DIRECTIVE.match(line)
        if m: found[m["name"]] = m["value"]
        else: rest.append(line)
    return found, "".join(rest)


def tags_for(found):
    "The jupyter-book tags implied by a cell's nbdev directives."
    tags = []
    for name, value in found.items():
        if name not in _TAGS: continue
        if name in ("echo", "output", "eval") and value.lower() not in ("false", "0", "no"): continue
        tags.append(_TAGS[name])
    return tags


def strip_notebook(text):
    "Rewrite one notebook's JSON: directives removed from code cells, tags added."
    nb = json.loads(text)
    for cell in nb.get("cells", []):
        if cell.get("cell_type") != "code": continue
        src = cell["source"] if isinstance(cell["source"], str) else "".join(cell["source"])
        found, rest = directives(src)
        if not found: continue
        tags = cell.setdefault("metadata", {}).setdefault("tags", [])
        if not rest.strip(): tags.append("remove-cell")
        solution = "hide" in found and rest.lstrip().startswith("# Solution")
        for t in (["hide-cell"] if solution else tags_for(found)):
            if t not in tags: tags.append(t)
        cell["source"] = rest.lstrip("\n")
    return json.dumps(nb)


def _source_read(app, docname, source):
    if app.env.doc2path(docname).endswith(".ipynb"): source[0] = strip_notebook(source[0])


class DropNestedTransitions(SphinxTransform):
    "nbdev's `show_doc` output opens with a `---` rule; inside a cell output docutils rejects it."
    default_priority = 800  # before docutils' Transitions check (830)

    def apply(self, **kwargs):
        for node in list(self.document.findall(nodes.transition)):
            if not isinstance(node.parent, (nodes.document, nodes.section)): node.parent.remove(node)


class DropShowDocSourceLinks(SphinxTransform):
    "`show_doc` adds a Quarto-style `[source](url){target=...}` link; plain Markdown shows it raw."
    default_priority = 800
    _attrs = re.compile(r"\{target=\W{0,2}_blank[^}]*\}")  # quotes may be typographic by now

    def apply(self, **kwargs):
        for ref in list(self.document.findall(nodes.reference)):
            if ref.astext() == "source" and ref.parent is not None: ref.parent.remove(ref)
        for text in list(self.document.findall(nodes.Text)):
            if not self._attrs.search(text): continue
            parent, rest = text.parent, self._attrs.sub("", text)
            if rest.strip(): parent.replace(text, nodes.Text(rest))
            else:
                parent.remove(text)
                if isinstance(parent, nodes.paragraph) and not parent.children: parent.parent.remove(parent)


def _drop_thebe(app, pagename, templatename, context, doctree):
    "The book runs offline: drop sphinx-thebe (a live-kernel button from a CDN, declared twice)."
    for key in ("script_files", "css_files"):
        files = context.get(key)
        if files is None: continue
        keep = [f for f in files if "thebe" not in str(f).lower()
                and "thebe" not in str(getattr(f, "attributes", {}).get("body", "")).lower()]
        files[:] = keep


def _machine():
    "A short description of the machine the book was built on."
    import os
    import platform
    from importlib.metadata import PackageNotFoundError, version
    try: torch = f", PyTorch {version('torch')}"
    except PackageNotFoundError: torch = ""
    return f"{os.cpu_count()} CPU cores, {platform.machine()}{torch}"


def _add_run_time(app, doctree):
    "Say under each executed notebook page's title how long its code took to run."
    try: from myst_nb.sphinx_ import NbMetadataCollector
    except ImportError: return
    data = NbMetadataCollector.get_exec_data(app.env, app.env.docname)
    if not data or data.get("runtime") is None: return
    sections = list(doctree.findall(nodes.section))
    if not sections: return
    top = sections[0]
    para = nodes.paragraph(classes=["exec-time"])
    para += nodes.emphasis(text=f"All the code on this page ran in {data['runtime']:.1f} s when the "
                                f"book was built ({_machine()}).")
    # after the title and the one-line summary that opens every chapter
    at = 1 + sum(1 for c in top.children[1:2] if isinstance(c, nodes.block_quote))
    top.insert(at, para)


# CJK blocks (kana, ideographs, Hangul, full-width forms) and symbols outside the Free fonts (emoji, ⇥)
_CJK = re.compile("[\u3000-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uff00-\uffef]")
_SYMBOLS = re.compile("[\u21e5\u2600-\u27bf\U0001f300-\U0001faff]")


def font_fallbacks(tex: str) -> str:
    "LaTeX source that sets each CJK or symbol character it uses in a font that has it."
    chars = sorted(set(_CJK.findall(tex)) | set(_SYMBOLS.findall(tex)))
    if not chars or "\\begin{document}" not in tex: return tex
    # one active character each (newunicodechar): a single token, which is what Sphinx's forced
    # wrapping of long code lines can handle; a macro with an argument would be split apart
    defs = "".join(f"\\newunicodechar{{{c}}}{{{{\\{'cjkfont' if _CJK.match(c) else 'symbolfont'} {c}}}}}\n"
                   for c in chars)
    return tex.replace("\\begin{document}", defs + "\\begin{document}", 1)


def toc_parts(toc_path):
    "[(caption, title of its first chapter, numbered)] of the book's parts, from `_toc.yml` and the notebooks' titles."
    from pathlib import Path
    import yaml
    toc_path = Path(toc_path).resolve()
    toc = yaml.safe_load(toc_path.read_text())
    out = []
    for part in toc.get("parts", []):
        first = toc_path.parents[1] / f"{part['chapters'][0]['file']}.ipynb"
        title = "".join(json.loads(first.read_text())["cells"][0]["source"]).splitlines()[0].lstrip("# ").strip()
        out.append((part["caption"], title, part.get("numbered", False)))
    return out


def latex_parts(tex: str, parts) -> str:
    "LaTeX source with a `\\part` page before each part's first chapter; an unnumbered last part becomes the appendix."
    for i, (caption, title, numbered) in enumerate(parts):
        at = tex.find(f"\\chapter{{{title}}}".replace("-", "\\sphinxhyphen{}").replace("'", "\u2019"))  # as Sphinx
        # writes a hyphen and an apostrophe (a typographic one)
        if at < 0: continue  # a title LaTeX spells differently: leave the book flat there rather than guess
        appendix = not numbered and i == len(parts) - 1
        tex = tex[:at] + f"\\part{{{caption}}}\n" + ("\\appendix\n" if appendix else "") + tex[at:]
    return tex


def _latex_fallbacks(app, exc):
    if exc or app.builder.name != "latex": return
    from pathlib import Path
    toc = Path(__file__).resolve().parents[1] / "_toc.yml"
    parts = toc_parts(toc) if toc.is_file() else []
    for tex in Path(app.outdir).glob("*.tex"):
        text = tex.read_text(encoding="utf-8")
        new = latex_parts(font_fallbacks(text), parts)
        if new != text: tex.write_text(new, encoding="utf-8")


def setup(app):
    app.connect("build-finished", _latex_fallbacks)
    app.connect("doctree-read", _add_run_time)
    app.connect("source-read", _source_read)
    app.connect("html-page-context", _drop_thebe)
    app.add_transform(DropNestedTransitions)
    app.add_transform(DropShowDocSourceLinks)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
