"""The README and docs/*.md: every link resolves, every generated table lives where its script writes it.

- every relative Markdown link and image (``[text](path)``, ``[text](path#anchor)``, ``![alt](path)``,
  reference-style ``[text][ref]`` with its ``[ref]: path`` line, ``<a href>`` / ``<img src>``) names a
  file of the repository, and every ``#anchor`` (same page or another ``.md`` page) is the slug of a
  heading of the target page, by GitHub's rules (lowercase, punctuation other than hyphens and
  underscores dropped, spaces to hyphens, duplicates suffixed -1, -2, ...);
- absolute http(s) links are not fetched (no network) but must be well-formed;
- README.md is a front door of at most 250 lines, and every docs/*.md page can be reached from it;
- every generated-table marker pair (``<!-- NAME:start -->`` / ``<!-- NAME:end -->``) appears exactly
  once across README + docs, and the bench script that writes it names that page (``DOC_PAGE``);
  commands in the docs that regenerate a table (``--doc PATH``, ``--readme PATH``, ``--marker NAME``)
  point at the page that holds it.

The checker is tested on planted mistakes (a broken link, a bad anchor, ...) so that it can fail.
"""
import re
import urllib.parse
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
README_MAX_LINES = 250

_FENCE = re.compile(r'^ {0,3}(`{3,}|~{3,}).*?^ {0,3}\1[^\n]*$', re.M | re.S)
_CODE_SPAN = re.compile(r'(`+)(?!`).+?(?<!`)\1', re.S)
_COMMENT = re.compile(r'<!--.*?-->', re.S)
_INLINE_LINK = re.compile(r'!?\[((?:[^\[\]]|\[[^\[\]]*\])*)\]\(\s*<?([^)\s>]*)>?(?:\s+"[^"]*")?\s*\)')
_REF_USE = re.compile(r'!?\[((?:[^\[\]]|\[[^\[\]]*\])+)\]\[([^\[\]]*)\]')
_REF_DEF = re.compile(r'^ {0,3}\[([^\[\]]+)\]:\s*<?(\S+?)>?(?:\s+["\'(].*)?$', re.M)
_HTML_LINK = re.compile(r'<(?:a|img)\b[^>]*?\b(?:href|src)\s*=\s*["\']([^"\']+)["\']', re.I)
_AUTOLINK = re.compile(r'<(https?://[^>\s]*)>')
_HEADING = re.compile(r'^ {0,3}(#{1,6})[ \t]+(.*?)[ \t]*#*[ \t]*$', re.M)
_MARKER = re.compile(r'<!--\s*([\w.-]+):(start|end)\s*-->')


def pages(root: Path = ROOT) -> List[Path]:
    """README.md and every docs/*.md."""
    return [root / 'README.md'] + sorted((root / 'docs').glob('*.md'))


def _blank(match: re.Match) -> str:
    return re.sub(r'[^\n]', ' ', match.group(0))


def strip_code(text: str, comments: bool = True) -> str:
    """The text with fenced code blocks, code spans and (``comments``) HTML comments blanked out: links
    and markers there are not links or markers. Newlines and offsets are kept, so positions still hold."""
    text = _FENCE.sub(_blank, text)
    text = _CODE_SPAN.sub(_blank, text)
    return _COMMENT.sub(_blank, text) if comments else text


def slug(heading: str) -> str:
    """GitHub's anchor for a heading's text (before de-duplication)."""
    text = re.sub(r'!?\[([^\]]*)\]\([^)]*\)', r'\1', heading)  # a link's text only
    text = re.sub(r'<[^>]+>', '', text)                          # HTML tags
    text = text.replace('`', '').lower()
    text = ''.join(c for c in text if c.isalnum() or c in '-_ ')
    return text.replace(' ', '-')


def anchors(text: str) -> set:
    """Every heading anchor of a Markdown page, duplicates numbered as GitHub numbers them."""
    seen: Dict[str, int] = {}
    result = set()
    for _, title in _HEADING.findall(_FENCE.sub('', text)):
        base = slug(title)
        n = seen.get(base, 0)
        seen[base] = n + 1
        result.add(base if n == 0 else f'{base}-{n}')
    return result


def links(text: str) -> List[Tuple[str, int]]:
    """(target, line number) of every link and image of a page: inline, reference-style, HTML, autolinks."""
    code_free = strip_code(text)
    found = []

    def line_of(m: re.Match) -> int:
        return code_free.count('\n', 0, m.start()) + 1

    for m in _INLINE_LINK.finditer(code_free):
        found.append((m.group(2), line_of(m)))
    definitions = {m.group(1).lower(): m.group(2) for m in _REF_DEF.finditer(code_free)}
    for m in _REF_USE.finditer(code_free):  # the targets themselves are checked at their definitions
        label = (m.group(2) or m.group(1)).lower()
        if label not in definitions:
            found.append((f'<undefined reference [{label}]>', line_of(m)))
    for m in _REF_DEF.finditer(code_free):
        found.append((m.group(2), line_of(m)))
    for m in _HTML_LINK.finditer(code_free):
        found.append((m.group(1), line_of(m)))
    for m in _AUTOLINK.finditer(code_free):
        found.append((m.group(1), line_of(m)))
    return found


def check_url(url: str) -> Optional[str]:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ('http', 'https') or '.' not in parts.netloc or re.search(r'\s', url):
        return f'malformed URL {url!r}'
    return None


def check_link(page: Path, target: str, root: Path = ROOT) -> Optional[str]:
    """None if ``target`` (as written on ``page``) resolves, else what is wrong with it."""
    if target.startswith('<undefined reference'):
        return target
    if re.match(r'[a-z][a-z0-9+.-]*:', target, re.I):
        if target.lower().startswith('mailto:'):
            return None
        return check_url(target)
    if not target:
        return 'empty link target'
    path_part, _, anchor = target.partition('#')
    path_part = urllib.parse.unquote(path_part)
    if path_part.startswith('/'):
        return f'{target!r}: absolute paths break on GitHub and in a clone; use a relative path'
    dest = (page.parent / path_part).resolve() if path_part else page.resolve()
    try:
        dest.relative_to(root.resolve())
    except ValueError:
        return f'{target!r} points outside the repository'
    if not dest.exists():
        return f'{target!r}: {dest.relative_to(root.resolve())} does not exist'
    if anchor:
        if dest.suffix != '.md' or not dest.is_file():
            return f'{target!r}: an anchor into a file that is not a Markdown page'
        if anchor not in anchors(dest.read_text(encoding='utf-8')):
            return f'{target!r}: no heading of {dest.relative_to(root.resolve())} has the anchor #{anchor}'
    return None


def link_errors(root: Path = ROOT) -> List[str]:
    errors = []
    for page in pages(root):
        for target, line in links(page.read_text(encoding='utf-8')):
            problem = check_link(page, target, root)
            if problem:
                errors.append(f'{page.relative_to(root)}:{line}: {problem}')
    return errors


def unreachable_pages(root: Path = ROOT) -> List[str]:
    """docs/*.md pages no chain of links from README.md reaches."""
    start = (root / 'README.md').resolve()
    seen, todo = {start}, [start]
    while todo:
        page = todo.pop()
        for target, _ in links(page.read_text(encoding='utf-8')):
            path_part = urllib.parse.unquote(target.partition('#')[0])
            if not path_part or re.match(r'[a-z][a-z0-9+.-]*:', path_part, re.I):
                continue
            dest = (page.parent / path_part).resolve()
            if dest.suffix == '.md' and dest.is_file() and dest not in seen:
                seen.add(dest)
                todo.append(dest)
    return [str(p.relative_to(root)) for p in pages(root) if p.resolve() not in seen]


# ------------------------------------------------------------------------------ generated tables

def marker_blocks(root: Path = ROOT) -> Tuple[Dict[str, List[Tuple[Path, str]]], List[str]]:
    """name -> [(page, text between the markers)], and the marker problems (counts, order)."""
    counts: Dict[Tuple[str, str], List[Path]] = {}
    blocks: Dict[str, List[Tuple[Path, str]]] = {}
    errors = []
    for page in pages(root):
        text = page.read_text(encoding='utf-8')
        live = strip_code(text, comments=False)  # a marker quoted in code is not a marker
        for name, kind in _MARKER.findall(live):
            counts.setdefault((name, kind), []).append(page)
        for name in {n for n, _ in _MARKER.findall(live)}:
            start, end = f'<!-- {name}:start -->', f'<!-- {name}:end -->'
            if start in live and end in live:
                i, j = live.index(start), live.index(end)
                if j < i:
                    errors.append(f'{page.relative_to(root)}: {end} comes before {start}')
                else:
                    blocks.setdefault(name, []).append((page, text[i + len(start):j]))
    for name in sorted({n for n, _ in counts}):
        for kind in ('start', 'end'):
            where = counts.get((name, kind), [])
            if len(where) != 1:
                errors.append(f'<!-- {name}:{kind} -->: expected exactly once in README.md + docs/*.md, found '
                              f'{len(where)} ({", ".join(str(p.relative_to(root)) for p in where) or "nowhere"})')
    return blocks, errors


def table_scripts(root: Path = ROOT) -> Dict[str, dict]:
    """bench scripts that write a marker table: name -> {'page': DOC_PAGE, 'markers': the marker names in
    its source (literal, or the default of its --marker option), 'default': the marker it writes by default}."""
    scripts = {}
    for script in sorted((root / 'bench').glob('*.py')):
        source = script.read_text(encoding='utf-8')
        if not re.search(r'\bwrite_between_markers\(', source):
            continue  # does not write a page
        page = re.search(r"^DOC_PAGE\s*=\s*['\"]([^'\"]+)['\"]", source, re.M)
        literal = {n for n, _ in _MARKER.findall(source)}
        option = re.search(r"'--marker'[^)]*default\s*=\s*'([\w.-]+)'", source, re.S)
        markers = literal | ({option.group(1)} if option else set())
        default = option.group(1) if option else (next(iter(literal)) if len(literal) == 1 else None)
        scripts[script.name] = dict(page=page.group(1) if page else None, markers=markers, default=default)
    return scripts


_COMMAND = re.compile(r'python3? bench/([\w.-]+\.py)((?:(?:[ \t]+|[ \t]*\\\n[ \t]*)[^\s`|#\\]+)*)')


def commands(text: str) -> List[Tuple[str, Dict[str, Optional[str]]]]:
    """(script, {'--doc'/'--readme'/'--marker': value}) of every ``python bench/X.py ...`` in a page."""
    found = []
    for m in _COMMAND.finditer(text):
        args = m.group(2).replace('\\\n', ' ').split()
        opts: Dict[str, Optional[str]] = {}
        for i, a in enumerate(args):
            if a in ('--doc', '--readme', '--marker'):
                value = args[i + 1] if i + 1 < len(args) and not args[i + 1].startswith('-') else None
                opts['--doc' if a == '--readme' else a] = value
        found.append((m.group(1), opts))
    return found


def table_errors(root: Path = ROOT) -> List[str]:
    blocks, errors = marker_blocks(root)
    scripts = table_scripts(root)
    written = set()
    for name, info in scripts.items():
        if info['page'] is None:
            errors.append(f'bench/{name} writes a marker table but names no DOC_PAGE (the page the table lives in)')
            continue
        page = root / info['page']
        if not page.is_file():
            errors.append(f'bench/{name}: DOC_PAGE {info["page"]!r} does not exist')
            continue
        text = page.read_text(encoding='utf-8')
        for marker in info['markers']:
            written.add(marker)
            if f'<!-- {marker}:start -->' not in text:
                errors.append(f'bench/{name} writes <!-- {marker}:start --> into {info["page"]}, which lacks it'
                              + (f' (it is in {blocks[marker][0][0].relative_to(root)})' if marker in blocks else ''))
    # Every command in the pages that writes a table names the script's page and a marker there.
    for page in pages(root):
        for script, opts in commands(page.read_text(encoding='utf-8')):
            info = scripts.get(script)
            if info is None or info['page'] is None or not ({'--doc', '--marker'} & set(opts)):
                continue
            target = opts.get('--doc')
            if target is not None and (root / target).resolve() != (root / info['page']).resolve():
                errors.append(f'{page.relative_to(root)}: `python bench/{script} ... {target}` writes {target}, '
                              f'but its table lives in {info["page"]} (DOC_PAGE)')
            marker = opts.get('--marker')
            if marker:
                written.add(marker)
                if f'<!-- {marker}:start -->' not in (root / info['page']).read_text(encoding='utf-8'):
                    errors.append(f'{page.relative_to(root)}: `python bench/{script} ... --marker {marker}`: '
                                  f'{info["page"]} has no <!-- {marker}:start -->')
    # Every generated block names the command that made it, and sits where that script writes.
    for name, where in blocks.items():
        for page, block in where:
            for script, opts in commands(block):
                info = scripts.get(script)
                if info is None or info['page'] is None:
                    continue
                if (root / info['page']).resolve() != page.resolve():
                    errors.append(f'<!-- {name} --> in {page.relative_to(root)} was made by bench/{script}, '
                                  f'which writes {info["page"]}')
                expected = opts.get('--marker') or info['default']
                if expected and expected != name:
                    errors.append(f'<!-- {name} --> in {page.relative_to(root)}: its command writes <!-- {expected} -->')
        if name not in written:
            errors.append(f'<!-- {name}:start --> in {where[0][0].relative_to(root)}: no bench script writes it')
    return errors


# ------------------------------------------------------------------------------ the checks

def test_every_link_and_anchor_resolves():
    errors = link_errors()
    assert not errors, 'broken links:\n' + '\n'.join(errors)


def test_readme_is_a_front_door():
    lines = (ROOT / 'README.md').read_text(encoding='utf-8').splitlines()
    assert len(lines) <= README_MAX_LINES, f'README.md has {len(lines)} lines; move depth into docs/*.md'


def test_every_docs_page_is_reachable_from_the_readme():
    missing = unreachable_pages()
    assert not missing, f'not linked from README.md (directly or through a page it links to): {missing}'


def test_generated_tables_live_where_their_scripts_write_them():
    scripts = table_scripts()
    assert {'model_table.py', 'bench_spformer.py', 'denoise_sna.py'} <= set(scripts), scripts
    errors = table_errors()
    assert not errors, '\n'.join(errors)


def test_install_and_test_commands_are_the_ones_ci_runs():
    """The README's "Install and run" keeps the commands .ci/run runs (CI follows the README)."""
    readme = (ROOT / 'README.md').read_text(encoding='utf-8')
    ci = (ROOT / '.ci' / 'run').read_text(encoding='utf-8')
    assert '## Install and run' in readme
    section = readme.split('## Install and run', 1)[1].split('\n## ', 1)[0]
    block = re.search(r'```bash\n(.*?)```', section, re.S).group(1)
    for command in ("pip install -c constraints.txt -e '.[dev]'", 'python -m pytest -q'):
        assert command in block, f'README "Install and run" lost {command!r}'
        assert command in ci, f'.ci/run does not run {command!r}'


# ------------------------------------------------------------------------------ the checker can fail

@pytest.mark.parametrize('heading, expected', [
    ('1.5 The projection-free SCA', '15-the-projection-free-sca'),
    ('The local attention op (`spformer.kernels`)', 'the-local-attention-op-spformerkernels'),
    ('Hierarchical models (pixel → superpixel → group)', 'hierarchical-models-pixel--superpixel--group'),
    ('Loading your weights: one reference for every tool', 'loading-your-weights-one-reference-for-every-tool'),
    ('CUDA graphs and `torch.compile`', 'cuda-graphs-and-torchcompile'),
    ('4. Soft superpixel neighborhood attention (SNA)', '4-soft-superpixel-neighborhood-attention-sna'),
    ('`spformer_hier_*` models', 'spformer_hier_-models'),
])
def test_slug_follows_github(heading, expected):
    assert slug(heading) == expected


def _planted_repo(tmp_path: Path, readme: str, docs: Dict[str, str]) -> Path:
    (tmp_path / 'docs').mkdir(parents=True)
    (tmp_path / 'README.md').write_text(readme, encoding='utf-8')
    for name, text in docs.items():
        (tmp_path / 'docs' / name).write_text(text, encoding='utf-8')
    (tmp_path / 'docs' / 'picture.png').write_bytes(b'\x89PNG')
    return tmp_path


GOOD_README = '''# Title

See [the guide](docs/guide.md), [its setup](docs/guide.md#set-up-twice-1), [below](#usage),
![a picture](docs/picture.png), [a reference][guide] and <https://example.org/x>.

## Usage

[guide]: docs/guide.md#usage
```python
x = [not a link](nowhere.md)
```
'''
GOOD_GUIDE = '''# Guide

## Usage

## Set up twice

## Set up twice

Back to the [README](../README.md#title) and [here](#guide).
'''


def test_checker_passes_a_clean_planted_repo(tmp_path):
    root = _planted_repo(tmp_path, GOOD_README, {'guide.md': GOOD_GUIDE})
    assert link_errors(root) == []
    assert unreachable_pages(root) == []


@pytest.mark.parametrize('old, new, expected', [
    ('docs/guide.md)', 'docs/gide.md)', 'does not exist'),                         # broken link
    ('#set-up-twice-1', '#set-up-thrice', 'no heading'),                            # bad anchor, other page
    ('[below](#usage)', '[below](#usages)', 'no heading'),                          # bad anchor, same page
    ('docs/picture.png', 'docs/picture.jpg', 'does not exist'),                      # broken image
    ('[guide]: docs/guide.md#usage', '[guide]: docs/guide.md#use', 'no heading'),   # reference-style
    ('[a reference][guide]', '[a reference][guid]', 'undefined reference'),
    ('<https://example.org/x>', '<https://example/x>', 'malformed URL'),
    ('[the guide](docs/guide.md)', '[the guide](/docs/guide.md)', 'absolute paths'),
    ('[the guide](docs/guide.md)', '[the guide](../outside.md)', 'outside the repository'),
])
def test_checker_catches_planted_mistakes(tmp_path, old, new, expected):
    assert old in GOOD_README
    root = _planted_repo(tmp_path, GOOD_README.replace(old, new), {'guide.md': GOOD_GUIDE})
    errors = link_errors(root)
    assert len(errors) == 1 and expected in errors[0], errors


def test_checker_catches_an_unlinked_page(tmp_path):
    root = _planted_repo(tmp_path, GOOD_README, {'guide.md': GOOD_GUIDE, 'orphan.md': '# Orphan\n'})
    assert unreachable_pages(root) == ['docs/orphan.md']


def test_checker_catches_misplaced_tables(tmp_path):
    (tmp_path / 'bench').mkdir()
    (tmp_path / 'bench' / 'table.py').write_text(
        "DOC_PAGE = 'docs/guide.md'\nSTART = '<!-- tab:start -->'\n"
        "def main():\n    text = ''\n    write_between_markers('page.md', 'x')\n", encoding='utf-8')
    block = '<!-- tab:start -->\n- Command: `python bench/table.py --doc`\n<!-- tab:end -->\n'
    # Where the script writes: clean.
    root = _planted_repo(tmp_path, GOOD_README, {'guide.md': GOOD_GUIDE + block})
    assert table_errors(root) == []
    # The table left in the README: the script's page lacks it, and the README's block is not where it writes.
    root = _planted_repo(tmp_path / 'a', GOOD_README + block, {'guide.md': GOOD_GUIDE})
    (root / 'bench').mkdir()
    (root / 'bench' / 'table.py').write_text((tmp_path / 'bench' / 'table.py').read_text())
    errors = table_errors(root)
    assert any('lacks it' in e for e in errors) and any('which writes docs/guide.md' in e for e in errors), errors
    # Twice, and a regeneration command pointing at the wrong page.
    root = _planted_repo(tmp_path / 'b', GOOD_README + block + 'Rerun `python bench/table.py --doc README.md`.\n',
                         {'guide.md': GOOD_GUIDE + block})
    (root / 'bench').mkdir()
    (root / 'bench' / 'table.py').write_text((tmp_path / 'bench' / 'table.py').read_text())
    errors = table_errors(root)
    assert any('exactly once' in e for e in errors) and any('writes README.md' in e for e in errors), errors
