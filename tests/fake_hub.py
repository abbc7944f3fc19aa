"""A local HTTP server speaking the few Hub endpoints that `HfApi.create_repo` and `HfApi.upload_folder` call
(huggingface_hub's classic path: the README metadata check, preupload, the Git LFS batch API with basic
transfers, then an NDJSON commit), so
uploads are tested with the real client and only the HTTP boundary faked. Xet storage is not spoken: run the client
with `HF_HUB_DISABLE_XET=1`.

Everything it receives is recorded: `hub.repos` (create payloads), `hub.files` (path -> bytes of the last commit),
`hub.requests` (method, path, Authorization header)."""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import yaml

# What the real Hub stores with LFS by default (binary weights and exports); everything else is a regular git file.
LFS_SUFFIXES = (".safetensors", ".onnx", ".pte", ".bin", ".data")


class FakeHub:
    def __init__(self) -> None:
        self.repos: list[dict] = []
        self.files: dict[str, bytes] = {}
        self.lfs_objects: dict[str, bytes] = {}
        self.requests: list[tuple[str, str, str | None]] = []
        self.commits: list[dict] = []
        self.validated: list[str] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while size := int(self.rfile.readline().split(b";")[0], 16):
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                    self.rfile.readline()
                    return b"".join(chunks)
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else b""

            def _reply(self, status: int, value) -> None:
                data = json.dumps(value).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _record(self) -> None:
                hub.requests.append((self.command, self.path, self.headers.get("Authorization")))

            def do_POST(self):  # noqa: N802
                self._record()
                body = self._body()
                path = self.path.split("?")[0]
                if path == "/api/repos/create":
                    payload = json.loads(body)
                    hub.repos.append(payload)
                    return self._reply(200, {"url": f"{hub.url}/{payload['organization']}/{payload['name']}"})
                if path == "/api/validate-yaml":  # the Hub checks a README's metadata before the upload
                    content = json.loads(body)["content"]
                    hub.validated.append(content)
                    header = content.split("---\n")[1] if content.startswith("---\n") else ""
                    try:
                        valid = isinstance(yaml.safe_load(header), dict)
                    except yaml.YAMLError:
                        valid = False
                    errors = [] if valid else [{"message": "metadata is not a YAML mapping"}]
                    return self._reply(200 if valid else 400, {"errors": errors, "warnings": []})
                if "/preupload/" in path:
                    files = json.loads(body)["files"]
                    modes = [
                        {"path": f["path"], "uploadMode": "lfs" if f["path"].endswith(LFS_SUFFIXES) else "regular",
                         "shouldIgnore": False, "oid": None}
                        for f in files
                    ]  # fmt: skip
                    return self._reply(200, {"files": modes})
                if path.endswith(".git/info/lfs/objects/batch"):
                    objects = json.loads(body)["objects"]
                    actions = [
                        {"oid": o["oid"], "size": o["size"], "authenticated": True,
                         "actions": {"upload": {"href": f"{hub.url}/lfs-storage/{o['oid']}"},
                                     "verify": {"href": f"{hub.url}/lfs-verify"}}}
                        for o in objects
                    ]  # fmt: skip
                    return self._reply(200, {"transfer": "basic", "objects": actions})
                if path == "/lfs-verify":
                    payload = json.loads(body)
                    ok = payload["oid"] in hub.lfs_objects and len(hub.lfs_objects[payload["oid"]]) == payload["size"]
                    return self._reply(200 if ok else 404, {"ok": ok})
                if "/commit/" in path:
                    lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
                    files = {}
                    for line in lines:
                        if line["key"] == "file":
                            files[line["value"]["path"]] = base64.b64decode(line["value"]["content"])
                        elif line["key"] == "lfsFile":
                            files[line["value"]["path"]] = hub.lfs_objects[line["value"]["oid"]]
                    hub.commits.append({"header": lines[0]["value"], "paths": sorted(files)})
                    hub.files.update(files)
                    repo = path.split("/api/models/")[1].split("/commit/")[0]
                    oid = hashlib.sha1(body).hexdigest()
                    return self._reply(200, {"commitUrl": f"{hub.url}/{repo}/commit/{oid}", "commitOid": oid})
                return self._reply(404, {"error": f"fake hub: no POST {path}"})

            def do_PUT(self):  # noqa: N802
                self._record()
                body = self._body()
                oid = self.path.rsplit("/", 1)[-1]
                if hashlib.sha256(body).hexdigest() != oid:
                    return self._reply(400, {"error": "sha256 mismatch"})
                hub.lfs_objects[oid] = body
                return self._reply(200, {})

            def do_GET(self):  # noqa: N802
                self._record()
                return self._reply(404, {"error": f"fake hub: no GET {self.path}"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
