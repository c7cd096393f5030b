"""A local stand-in for the Hugging Face Hub's HTTP API, for `--push-to-hub` and `load_generator("USER/REPO")`
tests: the Hub cannot run here. It answers the calls huggingface_hub makes to create a repository, commit files
(every file as a regular, base64 upload: the server decides the mode) and download them, keeps each repository's
files in memory, and records every request (method, path, the Authorization header) for the tests to read."""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse

import yaml


class LocalHub:
    def __init__(self):
        self.repos: dict[str, dict[str, bytes]] = {}
        self.requests: list[tuple[str, str, str | None]] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _reply(self, status: int, body=b"", content_type="application/json", headers=None):
                payload = json.dumps(body).encode() if not isinstance(body, bytes) else body
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(payload)))
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)

            def _body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length", 0)))

            def do_POST(self):
                path = unquote(urlparse(self.path).path)
                hub.requests.append(("POST", path, self.headers.get("Authorization")))
                body = self._body()
                if path == "/api/validate-yaml":  # the card's metadata, as the Hub checks it before a commit
                    content = json.loads(body)["content"]
                    try:
                        yaml.safe_load(content.split("---")[1])
                    except (IndexError, yaml.YAMLError) as error:
                        return self._reply(400, {"errors": [{"message": str(error)}]})
                    return self._reply(200, {"errors": [], "warnings": []})
                if path == "/api/repos/create":
                    request = json.loads(body)
                    repo_id = f"{request['organization']}/{request['name']}" if request.get("organization") \
                        else request["name"]
                    hub.repos.setdefault(repo_id, {})
                    return self._reply(200, {"url": f"{hub.url}/{repo_id}", "name": repo_id})
                parts = path.split("/")  # /api/models/USER/REPO/{preupload,commit}/REVISION
                if len(parts) == 7 and parts[:3] == ["", "api", "models"] and parts[5] in ("preupload", "commit"):
                    repo_id = f"{parts[3]}/{parts[4]}"
                    if repo_id not in hub.repos:
                        return self._reply(404, {"error": "Repository not found"})
                    if parts[5] == "preupload":
                        files = json.loads(body)["files"]
                        return self._reply(200, {"files": [{"path": f["path"], "uploadMode": "regular",
                                                            "shouldIgnore": False} for f in files]})
                    for line in body.decode().splitlines():
                        item = json.loads(line)
                        if item["key"] == "file":
                            hub.repos[repo_id][item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                    return self._reply(200, {"commitUrl": f"{hub.url}/{repo_id}/commit/{self._sha(repo_id)}",
                                             "commitOid": self._sha(repo_id), "pullRequestUrl": None})
                return self._reply(404, {"error": f"not served here: POST {path}"})

            def _sha(self, repo_id: str) -> str:
                files = hub.repos[repo_id]
                return hashlib.sha1(b"".join(name.encode() + files[name] for name in sorted(files))).hexdigest()

            def do_GET(self):
                path = unquote(urlparse(self.path).path)
                hub.requests.append((self.command, path, self.headers.get("Authorization")))
                parts = path.split("/")
                if len(parts) >= 5 and parts[:3] == ["", "api", "models"]:  # /api/models/USER/REPO[/revision/REV]
                    repo_id = f"{parts[3]}/{parts[4]}"
                    if repo_id not in hub.repos:
                        return self._reply(404, {"error": "Repository not found"},
                                           headers={"X-Error-Code": "RepoNotFound"})
                    if len(parts) >= 7 and parts[5] == "tree":  # the file list of a revision
                        return self._reply(200, [{"type": "file", "path": name, "size": len(content),
                                                  "oid": hashlib.sha1(content).hexdigest()}
                                                 for name, content in sorted(hub.repos[repo_id].items())])
                    return self._reply(200, {"id": repo_id, "sha": self._sha(repo_id),
                                             "siblings": [{"rfilename": name} for name in sorted(hub.repos[repo_id])]})
                if len(parts) >= 6 and parts[3] == "resolve":  # /USER/REPO/resolve/REVISION/FILE
                    repo_id, name = f"{parts[1]}/{parts[2]}", "/".join(parts[5:])
                    content = hub.repos.get(repo_id, {}).get(name)
                    if content is None:
                        return self._reply(404, {"error": "Entry not found"}, headers={"X-Error-Code": "EntryNotFound"})
                    etag = f'"{hashlib.sha1(content).hexdigest()}"'
                    return self._reply(200, content, "application/octet-stream",
                                       {"X-Repo-Commit": self._sha(repo_id), "ETag": etag})
                return self._reply(404, {"error": f"not served here: GET {path}"})

            do_HEAD = do_GET

        return Handler
