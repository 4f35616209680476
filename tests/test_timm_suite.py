"""timm's own model tests on every spformer* model.

tests/timm_suite/test_models.py is timm's tests/test_models.py, vendored from the timm sdist with
'spformer*' added to its filters (tests/timm_suite/README.md). It runs here the way timm runs it on its
ViT family, in its own pytest process: collecting it parametrizes over every timm model (~18k tests,
``-k spformer`` keeps ours), and its module name would clash with tests/test_models.py's.
"""
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import timm

import spformer  # noqa: F401  (registers the models)

ROOT = Path(__file__).resolve().parents[1]
SUITE = Path('tests') / 'timm_suite' / 'test_models.py'  # relative to ROOT, as in the README's command
MIN_PASSED = 40
# Every registered model must be collected by at least this many of timm's tests, and pass this many
# unless timm skips it for its size: it skips fixed-size models over its limits ("Fixed input size
# model > limit.", 256 to 384 px by test), which leaves spformer_small_sp32_448 with no passed test
# (tests/test_models.py runs our own checks on it at 448 px).
MIN_COLLECTED_PER_MODEL = 8
MIN_PASSED_PER_MODEL = 4
SIZE_SKIP = 'Fixed input size model > limit.'


def vendored_timm_version() -> str:
    """The timm release the vendored file comes from, as its header names it."""
    header = (ROOT / SUITE).read_text().splitlines()[0]
    match = re.match(r'# Vendored from timm (\S+) ', header)
    assert match, f'{SUITE}: first line should name the timm release it was vendored from, got {header!r}'
    return match.group(1)


def check_vendored_version():
    vendored = vendored_timm_version()
    assert timm.__version__ == vendored, (
        f'timm {timm.__version__} is installed but {SUITE} is the test file of timm {vendored}: the suite '
        f'would test against the other release\'s expectations. Update the vendored copy to timm '
        f'{timm.__version__} (tests/timm_suite/README.md, "Updating"), or install timm=={vendored}.')


def test_vendored_suite_matches_installed_timm():
    check_vendored_version()


def test_timm_model_suite_passes(tmp_path):
    """timm's tests/test_models.py, filtered to our models (-k spformer), exits 0 with every model tested."""
    check_vendored_version()
    report = tmp_path / 'timm_suite.xml'
    cmd = [sys.executable, '-m', 'pytest', str(SUITE), '-k', 'spformer', '-q', '-p', 'no:cacheprovider',
           # timm registers its CI markers (base, cfg, features, ...) in its own pyproject.toml
           '-W', 'ignore::pytest.PytestUnknownMarkWarning', f'--junitxml={report}']
    # rootdir = the repository: tests/conftest.py applies (Hub offline, thread count) as to every test
    proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ), capture_output=True, text=True, timeout=1800)
    out = proc.stdout + proc.stderr
    summary = out.strip().splitlines()[-1] if out.strip() else ''
    counts = {kind: int(n) for n, kind in re.findall(
        r'(\d+) (passed|failed|errors?|skipped|deselected|xfailed|xpassed)', summary)}
    assert proc.returncode == 0 and not counts.get('failed') and not counts.get('error', counts.get('errors')), (
        f'timm suite exited {proc.returncode} ({summary}):\n{out[-8000:]}')
    assert counts.get('passed', 0) >= MIN_PASSED, f'only {counts.get("passed", 0)} passed: {summary}'

    # Per model, from the JUnit report: every registered model ran (a registration or filter change
    # would otherwise drop models silently), and the only skips are timm's size limit.
    collected, passed, other_skips = {}, {}, []
    for case in ET.parse(report).getroot().iter('testcase'):
        skipped = case.find('skipped')
        for model in set(re.findall(r'spformer\w*', case.get('name', ''))):
            collected[model] = collected.get(model, 0) + 1
            if skipped is None:
                passed[model] = passed.get(model, 0) + 1  # failures and errors were ruled out above
            elif SIZE_SKIP not in (skipped.get('message', '') + (skipped.text or '')):
                other_skips.append(f"{case.get('name')}: {skipped.get('message')}")
    assert not other_skips, f'timm tests skipped for another reason than its size limit: {other_skips}'
    models = timm.list_models('spformer*')
    few = {m: collected.get(m, 0) for m in models if collected.get(m, 0) < MIN_COLLECTED_PER_MODEL}
    assert not few, f'models collected by fewer than {MIN_COLLECTED_PER_MODEL} timm tests: {few}'
    fixed_over_limit = {m for m in models if max(timm.get_pretrained_cfg_value(m, 'input_size')) > 320}
    few = {m: passed.get(m, 0) for m in models
           if passed.get(m, 0) < MIN_PASSED_PER_MODEL and m not in fixed_over_limit}
    assert not few, f'models with fewer than {MIN_PASSED_PER_MODEL} passed timm tests: {few} ({summary})'
