"""The aws CLI against the server: mb, cp (50 MiB, multipart), ls, sync, rm --recursive, presign."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import requests

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MiB = 1024 * 1024
AWS = shutil.which("aws", path=str(Path(sys.executable).parent)) or shutil.which("aws")


@pytest.fixture(scope="module")
def aws(s3_server, tmp_path_factory):
    if AWS is None:
        pytest.fail("the aws CLI is not installed in the venv (pip install awscli)")
    creds = s3_server.credentials()
    home = tmp_path_factory.mktemp("aws-home")
    env = {
        **os.environ,
        "AWS_ACCESS_KEY_ID": creds.access_key, "AWS_SECRET_ACCESS_KEY": creds.secret_key,
        "AWS_DEFAULT_REGION": "us-east-1", "AWS_CONFIG_FILE": "/dev/null",
        "AWS_SHARED_CREDENTIALS_FILE": "/dev/null", "HOME": str(home), "AWS_PAGER": "",
    }

    def run(*args: str) -> str:
        result = subprocess.run([AWS, "--endpoint-url", s3_server.endpoint, *args], env=env,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, f"aws {' '.join(args)}:\n{result.stdout}\n{result.stderr}"
        return result.stdout

    return run


def file_md5(path: Path) -> str:
    md5 = hashlib.md5()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(MiB), b""):
            md5.update(block)
    return md5.hexdigest()


def test_aws_cli_workflow(aws, s3, tmp_path) -> None:
    assert "make_bucket: cli-bucket" in aws("s3", "mb", "s3://cli-bucket")

    big = tmp_path / "big.bin"
    with big.open("wb") as handle:
        for _ in range(50):
            handle.write(os.urandom(MiB))
    aws("s3", "cp", str(big), "s3://cli-bucket/data/big.bin")
    head = s3.head_object(Bucket="cli-bucket", Key="data/big.bin")
    assert head["ContentLength"] == 50 * MiB
    assert head["ETag"].endswith('-7"')  # 8 MiB parts: the CLI used a multipart upload

    assert "cli-bucket" in aws("s3", "ls")
    listing = aws("s3", "ls", "s3://cli-bucket/data/")
    assert "big.bin" in listing and str(50 * MiB) in listing

    downloaded = tmp_path / "back.bin"
    aws("s3", "cp", "s3://cli-bucket/data/big.bin", str(downloaded))
    assert file_md5(downloaded) == file_md5(big)

    tree = tmp_path / "tree"
    files = {"a.txt": b"alpha", "sub/b.txt": b"beta" * 1000, "sub/deeper/c.bin": os.urandom(300_000),
             "with space/ü.txt": b"unicode"}
    for name, data in files.items():
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        (tree / name).write_bytes(data)
    out = aws("s3", "sync", str(tree), "s3://cli-bucket/tree")
    assert out.count("upload:") == len(files)
    assert aws("s3", "sync", str(tree), "s3://cli-bucket/tree").strip() == ""  # nothing changed
    recursive = aws("s3", "ls", "--recursive", "s3://cli-bucket/tree/")
    assert all(f"tree/{name}" in recursive for name in files)
    mirror = tmp_path / "mirror"
    aws("s3", "sync", "s3://cli-bucket/tree", str(mirror))
    assert {name: (mirror / name).read_bytes() for name in files} == files

    (tree / "a.txt").unlink()
    out = aws("s3", "sync", "--delete", str(tree), "s3://cli-bucket/tree")
    assert "delete: s3://cli-bucket/tree/a.txt" in out

    url = aws("s3", "presign", "s3://cli-bucket/tree/sub/b.txt", "--expires-in", "300").strip()
    response = requests.get(url, timeout=30)
    assert response.status_code == 200 and response.content == files["sub/b.txt"]

    aws("s3", "rm", "--recursive", "s3://cli-bucket/")
    assert s3.list_objects_v2(Bucket="cli-bucket")["KeyCount"] == 0
    assert "remove_bucket: cli-bucket" in aws("s3", "rb", "s3://cli-bucket")
