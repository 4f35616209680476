"""An in-memory stand-in for the Hugging Face Hub, served through ``huggingface_hub``'s own HTTP client.

Tests (ours, and anyone's who wants to push without a network) install it with
:func:`huggingface_hub.set_client_factory`: every request the real client makes then goes to
:meth:`FakeHub.handle` through an ``httpx2.MockTransport`` (``httpx`` under huggingface_hub 1)
instead of the network, so the client's
own code (repo creation, preupload, the ndjson commit, README metadata validation, downloads into
the cache) runs unchanged. It implements the few endpoints that push, ``hf_hub_download`` and
``snapshot_download`` use, with the Hub's status codes and ``X-Error-Code`` headers::

    hub = FakeHub()
    with hub.installed():                      # set_client_factory(...), restored on exit
        push_to_hub(model, 'me/my-model', token='hf_fake')
    hub.files('me/my-model')                   # {path: bytes} at main
    hub.save(folder); FakeHub.load(folder)     # the same repos in another process

Uploads are all "regular" (base64 inside the commit), which the Hub also accepts; LFS and Xet
transfers are not implemented. Private repos answer 401 ``RepoNotFound`` to requests without a
token, like the Hub. ``HF_HUB_OFFLINE=1`` still blocks every request (the client's own hook).
"""
import base64
import contextlib
import hashlib
import json
import pathlib
import re
import time
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Tuple
from urllib.parse import unquote, urlsplit

import yaml
from huggingface_hub import constants
from huggingface_hub.utils import _http as hf_http

from .checkpoint import hub_http_client

http_client = hub_http_client()  # httpx2 or httpx, whichever huggingface_hub runs on

__all__ = ['FakeHub', 'Commit']

# The files the Hub puts into a new repo (LFS rules for binary weights).
_GITATTRIBUTES = b'*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n'


@dataclass
class Commit:
    oid: str
    parent: Optional[str]
    message: str
    files: Dict[str, bytes]  # the whole tree after this commit
    added: List[str] = field(default_factory=list)  # what this commit wrote or deleted
    deleted: List[str] = field(default_factory=list)


@dataclass
class Repo:
    repo_id: str
    private: bool
    branches: Dict[str, str] = field(default_factory=dict)  # name -> commit oid
    commits: Dict[str, Commit] = field(default_factory=dict)


def _git_blob_sha(data: bytes) -> str:
    return hashlib.sha1(b'blob %d\0' % len(data) + data).hexdigest()


class FakeHub:
    """In-memory Hub: repos, branches and commits, reachable only through :meth:`client`."""

    def __init__(self, endpoint: Optional[str] = None):
        self.endpoint = (endpoint or constants.ENDPOINT).rstrip('/')
        self.repos: Dict[str, Repo] = {}
        self.requests: List[Tuple[str, str]] = []  # (method, path) of every request, in order

    # ----------------------------------------------------------------- inspection
    def commits(self, repo_id: str, branch: str = 'main') -> List[Commit]:
        """The commits of a branch, oldest first."""
        repo = self.repos[repo_id]
        out, oid = [], repo.branches[branch]
        while oid is not None:
            out.append(repo.commits[oid])
            oid = repo.commits[oid].parent
        return out[::-1]

    def files(self, repo_id: str, revision: str = 'main') -> Dict[str, bytes]:
        repo = self.repos[repo_id]
        return dict(repo.commits[self._resolve(repo, revision)].files)

    # ----------------------------------------------------------------- client side
    def client(self) -> http_client.Client:
        """A client like ``huggingface_hub``'s default one, whose transport is this fake."""
        return http_client.Client(
            transport=http_client.MockTransport(self.handle),
            event_hooks={'request': [hf_http.hf_request_event_hook]},  # offline check, request ids
            follow_redirects=True,
            timeout=None,
        )

    @contextlib.contextmanager
    def installed(self) -> Iterator['FakeHub']:
        """Route every ``huggingface_hub`` request to this fake while the block runs."""
        hf_http.set_client_factory(self.client)
        try:
            yield self
        finally:
            hf_http.set_client_factory(hf_http.default_client_factory)

    # ----------------------------------------------------------------- persistence
    def save(self, folder) -> pathlib.Path:
        """Write all repos to ``folder`` (JSON + blobs) for :meth:`load` in another process."""
        folder = pathlib.Path(folder)
        (folder / 'blobs').mkdir(parents=True, exist_ok=True)
        state = {'endpoint': self.endpoint, 'repos': {}}
        for repo_id, repo in self.repos.items():
            commits = {}
            for oid, c in repo.commits.items():
                tree = {}
                for path, data in c.files.items():
                    sha = hashlib.sha256(data).hexdigest()
                    (folder / 'blobs' / sha).write_bytes(data)
                    tree[path] = sha
                commits[oid] = dict(parent=c.parent, message=c.message, files=tree, added=c.added, deleted=c.deleted)
            state['repos'][repo_id] = dict(private=repo.private, branches=repo.branches, commits=commits)
        (folder / 'state.json').write_text(json.dumps(state, indent=1))
        return folder

    @classmethod
    def load(cls, folder) -> 'FakeHub':
        folder = pathlib.Path(folder)
        state = json.loads((folder / 'state.json').read_text())
        hub = cls(state['endpoint'])
        for repo_id, r in state['repos'].items():
            repo = Repo(repo_id, r['private'], dict(r['branches']))
            for oid, c in r['commits'].items():
                files = {p: (folder / 'blobs' / sha).read_bytes() for p, sha in c['files'].items()}
                repo.commits[oid] = Commit(oid, c['parent'], c['message'], files, c['added'], c['deleted'])
            hub.repos[repo_id] = repo
        return hub

    # ----------------------------------------------------------------- server side
    def handle(self, request: http_client.Request) -> http_client.Response:
        url = urlsplit(str(request.url))
        path = unquote(url.path)
        self.requests.append((request.method, path))
        if f'{url.scheme}://{url.netloc}' != self.endpoint:
            return self._error(404, f'the fake Hub serves {self.endpoint}, not {url.scheme}://{url.netloc}')
        authorized = request.headers.get('authorization', '').startswith('Bearer ')
        routes = [
            ('POST', r'/api/repos/create', self._create_repo),
            ('POST', r'/api/validate-yaml', self._validate_yaml),
            ('POST', r'/api/models/(?P<repo>[^/]+/[^/]+)/preupload/(?P<rev>.+)', self._preupload),
            ('POST', r'/api/models/(?P<repo>[^/]+/[^/]+)/commit/(?P<rev>.+)', self._commit),
            ('POST', r'/api/models/(?P<repo>[^/]+/[^/]+)/branch/(?P<branch>.+)', self._create_branch),
            ('GET', r'/api/models/(?P<repo>[^/]+/[^/]+)/tree/(?P<rev>[^/]+)(?:/(?P<sub>.*))?', self._tree),
            ('GET', r'/api/models/(?P<repo>[^/]+/[^/]+)/revision/(?P<rev>.+)', self._revision),
            ('GET', r'/api/models/(?P<repo>[^/]+/[^/]+)', self._revision),
            ('HEAD', r'/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)', self._resolve_file),
            ('GET', r'/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)', self._resolve_file),
        ]
        for method, pattern, fn in routes:
            m = re.fullmatch(pattern, path)
            if m and request.method == method:
                return fn(request, authorized, **{k: v for k, v in m.groupdict().items() if v is not None})
        return self._error(404, f'the fake Hub does not implement {request.method} {path}')

    @staticmethod
    def _error(status: int, message: str, code: Optional[str] = None) -> http_client.Response:
        headers = {'X-Error-Message': message}
        if code:
            headers['X-Error-Code'] = code
        return http_client.Response(status, json={'error': message}, headers=headers)

    def _repo(self, repo_id: str, authorized: bool):
        """The repo, or the Hub's answer when it is missing or private to an anonymous caller."""
        repo = self.repos.get(repo_id)
        if repo is None or (repo.private and not authorized):
            return None, self._error(401 if not authorized else 404, 'Repository not found', 'RepoNotFound')
        return repo, None

    @staticmethod
    def _resolve(repo: Repo, revision: str) -> Optional[str]:
        revision = unquote(revision)
        if revision in repo.branches:
            return repo.branches[revision]
        return revision if revision in repo.commits else None

    def _new_commit(self, repo: Repo, branch: str, message: str, files: Dict[str, bytes],
                    added: List[str], deleted: List[str]) -> Commit:
        parent = repo.branches.get(branch)
        oid = hashlib.sha1(f'{repo.repo_id}{parent}{message}{time.time_ns()}{sorted(files)}'.encode()).hexdigest()
        commit = Commit(oid, parent, message, files, added, deleted)
        repo.commits[oid] = commit
        repo.branches[branch] = oid
        return commit

    def _create_repo(self, request, authorized):
        if not authorized:
            return self._error(401, 'Invalid username or password.')
        body = json.loads(request.content)
        if body.get('type', 'model') != 'model':
            return self._error(400, 'the fake Hub only has model repos')
        repo_id = f"{body['organization']}/{body['name']}" if body.get('organization') else f"user/{body['name']}"
        url = f'{self.endpoint}/{repo_id}'
        if repo_id in self.repos:
            return http_client.Response(409, json={'error': 'You already created this model repo', 'url': url})
        repo = Repo(repo_id, private=body.get('visibility') == 'private')
        self.repos[repo_id] = repo
        self._new_commit(repo, 'main', 'initial commit', {'.gitattributes': _GITATTRIBUTES}, ['.gitattributes'], [])
        return http_client.Response(200, json={'url': url, 'name': repo_id})

    def _validate_yaml(self, request, authorized):
        content = json.loads(request.content)['content']
        m = re.match(r'^---\n(.*?)\n---\n', content, re.S)
        if m is None:
            return http_client.Response(200, json={'warnings': [{'message': 'empty or missing yaml metadata'}]})
        try:
            meta = yaml.safe_load(m.group(1))
        except yaml.YAMLError as e:
            return http_client.Response(400, json={'errors': [{'message': f'invalid YAML: {e}'}]})
        if not isinstance(meta, dict):
            return http_client.Response(400, json={'errors': [{'message': 'metadata must be a YAML mapping'}]})
        return http_client.Response(200, json={'warnings': []})

    def _preupload(self, request, authorized, repo, rev):
        repo_obj, err = self._repo(repo, authorized)
        if err:
            return err
        oid = self._resolve(repo_obj, rev)
        if oid is None:
            return self._error(404, f'Invalid rev id: {rev}', 'RevisionNotFound')
        tree = repo_obj.commits[oid].files
        files = [dict(path=f['path'], uploadMode='regular', shouldIgnore=False,
                      oid=_git_blob_sha(tree[f['path']]) if f['path'] in tree else None)
                 for f in json.loads(request.content)['files']]
        return http_client.Response(200, json={'files': files, 'commitOid': oid})

    def _commit(self, request, authorized, repo, rev):
        if not authorized:
            return self._error(401, 'Invalid username or password.')
        repo_obj, err = self._repo(repo, authorized)
        if err:
            return err
        branch = unquote(rev)
        if branch not in repo_obj.branches:
            return self._error(404, f'Invalid rev id: {branch}', 'RevisionNotFound')
        lines = [json.loads(line) for line in request.content.splitlines() if line.strip()]
        header = next(item['value'] for item in lines if item['key'] == 'header')
        files = dict(repo_obj.commits[repo_obj.branches[branch]].files)
        added, deleted = [], []
        for item in lines:
            value = item['value']
            if item['key'] == 'file':
                if value.get('encoding') != 'base64':
                    return self._error(400, f"unsupported encoding {value.get('encoding')!r}")
                files[value['path']] = base64.b64decode(value['content'])
                added.append(value['path'])
            elif item['key'] == 'deletedFile':
                if value['path'] not in files:
                    return self._error(404, "A file with this name doesn't exist", 'EntryNotFound')
                del files[value['path']]
                deleted.append(value['path'])
            elif item['key'] != 'header':
                return self._error(400, f"the fake Hub does not implement commit operation {item['key']!r}")
        commit = self._new_commit(repo_obj, branch, header['summary'], files, added, deleted)
        return http_client.Response(200, json={'commitUrl': f'{self.endpoint}/{repo}/commit/{commit.oid}',
                                          'commitOid': commit.oid, 'success': True})

    def _create_branch(self, request, authorized, repo, branch):
        if not authorized:
            return self._error(401, 'Invalid username or password.')
        repo_obj, err = self._repo(repo, authorized)
        if err:
            return err
        branch = unquote(branch)
        if branch in repo_obj.branches:
            return self._error(409, f'Reference refs/heads/{branch} already exists')
        body = json.loads(request.content or b'{}')
        start = self._resolve(repo_obj, body.get('startingPoint') or 'main')
        repo_obj.branches[branch] = start
        return http_client.Response(200, json={})

    def _tree(self, request, authorized, repo, rev, sub=''):
        repo_obj, err = self._repo(repo, authorized)
        if err:
            return err
        oid = self._resolve(repo_obj, rev)
        if oid is None:
            return self._error(404, f'Invalid rev id: {rev}', 'RevisionNotFound')
        prefix = sub.strip('/') + '/' if sub.strip('/') else ''
        entries = [dict(type='file', path=p, size=len(d), oid=_git_blob_sha(d))
                   for p, d in sorted(repo_obj.commits[oid].files.items()) if p.startswith(prefix)]
        return http_client.Response(200, json=entries)

    def _revision(self, request, authorized, repo, rev='main'):
        repo_obj, err = self._repo(repo, authorized)
        if err:
            return err
        oid = self._resolve(repo_obj, rev)
        if oid is None:
            return self._error(404, f'Invalid rev id: {rev}', 'RevisionNotFound')
        files = repo_obj.commits[oid].files
        return http_client.Response(200, json=dict(
            id=repo, sha=oid, private=repo_obj.private,
            siblings=[dict(rfilename=p, size=len(d)) for p, d in sorted(files.items())]))

    def _resolve_file(self, request, authorized, repo, rev, file):
        repo_obj, err = self._repo(repo, authorized)
        if err:
            return err
        oid = self._resolve(repo_obj, rev)
        if oid is None:
            return self._error(404, f'Invalid rev id: {rev}', 'RevisionNotFound')
        data = repo_obj.commits[oid].files.get(file)
        if data is None:
            response = self._error(404, 'Entry not found', 'EntryNotFound')
            response.headers['X-Repo-Commit'] = oid
            return response
        headers = {'X-Repo-Commit': oid, 'ETag': f'"{hashlib.sha256(data).hexdigest()}"',
                   'Content-Length': str(len(data))}
        return http_client.Response(200, headers=headers, content=b'' if request.method == 'HEAD' else data)
