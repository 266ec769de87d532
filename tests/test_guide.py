"""Runs every code block of docs/guide.md, in order, in a fresh directory, so the guide cannot rot.

```python blocks run in one shared namespace; ```python file=NAME blocks are written to NAME; ```bash blocks
run with bash -e.  S3 examples talk to moto's server and HTTP examples to nginx, both on 127.0.0.1 (the
guide's `127.0.0.1:8080` is rewritten to nginx's port).
"""

import os
import re
import subprocess
import sys

import pytest

from conftest_servers import MotoServer, NginxServer, TEST_CREDENTIALS

GUIDE = os.path.join(os.path.dirname(__file__), "..", "docs", "guide.md")
BLOCK = re.compile(r"^```(\w+)([^\n]*)\n(.*?)^```", re.S | re.M)


def blocks():
    with open(GUIDE, encoding="utf-8") as f:
        text = f.read()
    return [(m.group(1), m.group(2).strip(), m.group(3)) for m in BLOCK.finditer(text)]


def test_guide_has_runnable_blocks():
    kinds = [b[0] for b in blocks()]
    assert kinds.count("python") >= 6 and kinds.count("bash") >= 4


def test_guide_runs(tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    moto = MotoServer(str(tmp_path / "moto.log"))
    nginx = NginxServer(str(tmp_path / "nginx"), root=str(work))
    try:
        moto.client().create_bucket(Bucket="my-bucket")
        env = {"AWS_ENDPOINT_URL": moto.endpoint, "AWS_ACCESS_KEY_ID": TEST_CREDENTIALS["aws_access_key_id"],
               "AWS_SECRET_ACCESS_KEY": TEST_CREDENTIALS["aws_secret_access_key"], "AWS_DEFAULT_REGION": "us-east-1",
               "PACKFMT_CACHE_DIR": str(tmp_path / "cache")}
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        monkeypatch.chdir(work)
        bindir = os.path.dirname(sys.executable)
        monkeypatch.setenv("PATH", bindir + os.pathsep + os.environ.get("PATH", ""))
        host = nginx.url.split("//", 1)[1]
        namespace = {"__name__": "__guide__"}
        for i, (lang, info, code) in enumerate(blocks()):
            code = code.replace("127.0.0.1:8080", host)
            where = f"docs/guide.md block {i} ({lang} {info})"
            if lang == "python" and info.startswith("file="):
                (work / info[len("file="):]).write_text(code)
            elif lang == "python":
                exec(compile(code, where, "exec"), namespace)
            elif lang == "bash":
                r = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", code], capture_output=True, timeout=300)
                assert r.returncode == 0, f"{where} failed:\n{code}\n--- stdout\n{r.stdout.decode()}\n--- stderr\n{r.stderr.decode()}"
            elif lang != "text":
                pytest.fail(f"{where}: unknown block language {lang!r}")
    finally:
        nginx.stop()
        moto.stop()
