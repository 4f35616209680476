"""bench/mutations.py's catalogue keeps up with the code: every planted bug still names text that occurs exactly
once in its file (a mutation whose code moved would be reported ``stale`` and silently stop checking anything).
Running the mutations themselves takes tens of minutes and is not part of this suite (see docs/testing.md)."""
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _catalogue():
    spec = importlib.util.spec_from_file_location('mutations', ROOT / 'bench' / 'mutations.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def stale(mutations):
    """The mutations whose text does not occur exactly once in their file, each with why."""
    out = []
    for m in mutations:
        path = ROOT / m.path
        count = path.read_text().count(m.old) if path.is_file() else None
        if count != 1:
            out.append(f'{m.id}: {m.path} ' + ('does not exist' if count is None else f'holds its text {count} times'))
    return out


def test_every_mutation_matches_exactly_once():
    module = _catalogue()
    assert len(module.MUTATIONS) >= 50  # the catalogue is there
    assert all(m.area in module.AREAS for m in module.MUTATIONS)
    found = stale(module.MUTATIONS)
    assert not found, 'stale mutations (update bench/mutations.py):\n' + '\n'.join(found)


def test_the_check_sees_stale_mutations():
    m = _catalogue().MUTATIONS[0]
    moved = m.__class__('moved', m.area, 'no/such/file.py', m.old, m.new, m.why)
    changed = m.__class__('changed', m.area, m.path, m.old + '\n# no longer there', m.new, m.why)
    twice = m.__class__('twice', m.area, m.path, '\n', m.new, m.why)
    assert stale([m, moved, changed, twice]) == [
        'moved: no/such/file.py does not exist', f'changed: {m.path} holds its text 0 times',
        f"twice: {m.path} holds its text {(ROOT / m.path).read_text().count(chr(10))} times"]
