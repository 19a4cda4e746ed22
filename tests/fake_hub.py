"""A minimal stand-in for the Hugging Face Hub's HTTP endpoint, on 127.0.0.1.

It answers the handful of routes that huggingface_hub's real client uses to create a repo,
commit files (inline, "regular" upload mode), describe a revision and serve files. The
client code under test is the real huggingface_hub; only the server is fake.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest


class FakeHub:
    def __init__(self) -> None:
        self.repos: dict[str, dict[str, bytes]] = {}
        self.commits: dict[str, str] = {}
        self.tokens: dict[str, str] = {}  # private repositories: the token each requires
        self.requests: list[str] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep test output quiet
                pass

            def do_HEAD(self) -> None:
                hub._serve(self, head=True)

            def do_GET(self) -> None:
                hub._serve(self, head=False)

            def do_POST(self) -> None:
                hub._post(self)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def add_repo(self, repo_id: str, files: dict[str, bytes], *, token: str | None = None) -> None:
        """Serve ``files`` as the repository ``repo_id``, at one commit, as if pushed before.
        With ``token``, the repository is private: a request for it without the header
        ``Authorization: Bearer <token>`` is answered 401 ``RepoNotFound``, as the Hub does."""
        self.repos[repo_id] = dict(files)
        self.commits[repo_id] = hashlib.sha1(repo_id.encode()).hexdigest()
        if token is not None:
            self.tokens[repo_id] = token

    def _refused(self, handler, repo: str, head: bool) -> bool:
        """Answer 401 (and return True) when ``repo`` is private and the request does not
        carry its token."""
        token = self.tokens.get(repo)
        if token is None or handler.headers.get("Authorization") == f"Bearer {token}":
            return False
        self._send(handler, 401, b"{}", {"X-Error-Code": "RepoNotFound"}, head)
        return True

    # -- responses ----------------------------------------------------------------------
    @staticmethod
    def _send(handler, status: int, body: bytes = b"", headers: dict | None = None, head=False):
        handler.send_response(status)
        for key, value in (headers or {}).items():
            handler.send_header(key, value)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        if not head:
            handler.wfile.write(body)

    def _json(self, handler, status: int, payload, head=False) -> None:
        self._send(
            handler,
            status,
            json.dumps(payload).encode(),
            {"Content-Type": "application/json"},
            head,
        )

    def _not_found(self, handler, head=False) -> None:
        self._send(handler, 404, b"{}", {"X-Error-Code": "EntryNotFound"}, head)

    def _serve(self, handler, head: bool) -> None:
        path = handler.path.split("?")[0]
        self.requests.append(f"{handler.command} {path}")
        info = re.fullmatch(r"/api/models/(.+?)/revision/([^/]+)", path)
        if info:
            repo = info.group(1)
            if self._refused(handler, repo, head):
                return None
            if repo not in self.repos:
                return self._send(handler, 404, b"{}", {"X-Error-Code": "RepoNotFound"}, head)
            siblings = [{"rfilename": name} for name in sorted(self.repos[repo])]
            return self._json(
                handler, 200, {"id": repo, "sha": self.commits[repo], "siblings": siblings}, head
            )
        tree = re.fullmatch(r"/api/models/(.+?)/tree/([^/]+)", path)
        if tree:
            if self._refused(handler, tree.group(1), head):
                return None
            files = self.repos.get(tree.group(1), {})
            entries = [
                {
                    "type": "file",
                    "path": name,
                    "size": len(data),
                    "oid": hashlib.sha1(data).hexdigest(),
                }
                for name, data in sorted(files.items())
            ]
            return self._json(handler, 200, entries, head)
        resolve = re.fullmatch(r"/(.+?)/resolve/([^/]+)/(.+)", path)
        if resolve:
            repo, _, filename = resolve.groups()
            if self._refused(handler, repo, head):
                return None
            files = self.repos.get(repo, {})
            if filename not in files:
                return self._not_found(handler, head)
            content = files[filename]
            headers = {
                "X-Repo-Commit": self.commits[repo],
                "ETag": f'"{hashlib.sha1(content).hexdigest()}"',
                "Content-Type": "application/octet-stream",
            }
            return self._send(handler, 200, content, headers, head)
        return self._not_found(handler, head)

    def _post(self, handler) -> None:
        path = handler.path.split("?")[0]
        self.requests.append(f"POST {path}")
        body = handler.rfile.read(int(handler.headers.get("Content-Length", 0)))
        if path == "/api/repos/create":
            repo = json.loads(body)
            repo_id = (
                f"{repo['organization']}/{repo['name']}"
                if repo.get("organization")
                else repo["name"]
            )
            self.repos.setdefault(repo_id, {})
            self.commits.setdefault(repo_id, "0" * 40)
            return self._json(handler, 200, {"url": f"{self.url}/{repo_id}", "name": repo_id})
        if path == "/api/validate-yaml":  # model card metadata check
            return self._json(handler, 200, {"errors": [], "warnings": []})
        preupload = re.fullmatch(r"/api/models/(.+?)/preupload/([^/]+)", path)
        if preupload:
            files = json.loads(body)["files"]
            modes = [
                {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files
            ]
            return self._json(handler, 200, {"files": modes})
        commit = re.fullmatch(r"/api/models/(.+?)/commit/([^/]+)", path)
        if commit:
            repo = commit.group(1)
            for line in body.decode().splitlines():
                item = json.loads(line)
                if item["key"] == "file":
                    value = item["value"]
                    self.repos[repo][value["path"]] = base64.b64decode(value["content"])
            self.commits[repo] = hashlib.sha1(
                json.dumps(sorted(self.repos[repo])).encode() + body
            ).hexdigest()
            return self._json(
                handler,
                200,
                {
                    "commitUrl": f"{self.url}/{repo}/commit/{self.commits[repo]}",
                    "commitOid": self.commits[repo],
                },
            )
        return self._not_found(handler)


@contextmanager
def huggingface_hub_at(url: str, cache) -> Iterator[pytest.MonkeyPatch]:
    """Within the block, the in-process huggingface_hub talks to the fake Hub at ``url``,
    as ``HF_ENDPOINT=<url> HF_HUB_OFFLINE=0`` would at import time (it reads them once, into
    ``huggingface_hub.constants``), with its cache in ``cache`` and a token. Yields the
    ``MonkeyPatch`` for more settings. Releases before 1.0 keep one HTTP session, made with
    the offline switch of its time: it is reset on entering and on leaving. An ``HfApi``
    fixes its endpoint when made: huggingface_hub's own (behind ``create_repo`` & co.) is
    pointed at ``url``, and transformers releases that share one get a fresh one."""
    import huggingface_hub.file_download
    import huggingface_hub.hf_api
    import huggingface_hub.utils
    import transformers.utils.hub
    from huggingface_hub import constants

    reset = getattr(huggingface_hub.utils, "reset_sessions", lambda: None)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("HF_ENDPOINT", url)
            patch.setenv("HF_HUB_OFFLINE", "0")
            patch.setenv("HF_TOKEN", "hf_fake")
            patch.setattr(constants, "ENDPOINT", url)
            template = url + "/{repo_id}/resolve/{revision}/{filename}"
            patch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)
            # Releases before 1.0 build download URLs from a copy made at import.
            if hasattr(huggingface_hub.file_download, "HUGGINGFACE_CO_URL_TEMPLATE"):
                patch.setattr(
                    huggingface_hub.file_download, "HUGGINGFACE_CO_URL_TEMPLATE", template
                )
            patch.setattr(constants, "HF_HUB_OFFLINE", False)
            patch.setattr(constants, "HF_HUB_CACHE", str(cache))
            shared_api = getattr(huggingface_hub.hf_api, "api", None)
            if shared_api is not None:
                patch.setattr(shared_api, "endpoint", url)
            if hasattr(transformers.utils.hub, "_is_offline_mode"):  # a copy, before 5.0
                patch.setattr(transformers.utils.hub, "_is_offline_mode", False)
            if hasattr(transformers.utils.hub, "_hf_api"):
                patch.setattr(transformers.utils.hub, "_hf_api", None)
            reset()
            yield patch
    finally:
        reset()


def run_against_hub(script: str, endpoint: str, home, *, offline: bool = False) -> str:
    """Run ``script`` in a fresh interpreter whose huggingface_hub talks to ``endpoint``
    (offline when ``offline``), with ``HF_HOME`` at ``home``; returns what it printed."""
    done = hub_process(script, endpoint, home, offline=offline)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def hub_process(
    script: str, endpoint: str, home, *, offline: bool = False
) -> subprocess.CompletedProcess:
    """``run_against_hub``'s process, finished, whatever its exit code."""
    env = dict(
        os.environ,
        HF_ENDPOINT=endpoint,
        HF_HOME=str(home),
        HF_HUB_OFFLINE="1" if offline else "0",
        HF_TOKEN="hf_fake",
        OMP_NUM_THREADS="1",
    )
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
