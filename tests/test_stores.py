"""The stores, each behaviour checked on a local folder and on a real S3 server (SeaweedFS)."""

from __future__ import annotations

import hashlib
import os
import random
import time
from pathlib import Path

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError

from controller.stores import (
    LocalStore,
    S3Store,
    StoreKeyMissing,
    download_url,
    open_store,
    read_url_bytes,
    upload_url,
    write_url_bytes,
)
from controller.stores.keys import clean_key, clean_prefix
from controller.stores.local import TEMP_PREFIX
from controller.stores.s3 import choose_addressing_style, make_s3_client, translate_s3_error
from nexlify.errors import InputError, PermanentError, TemporaryError
from tests.s3server import SeaweedS3, free_ports

MIB = 1024 * 1024


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> LocalStore | S3Store:
    """The same tests against a folder and against a fresh prefix in the SeaweedFS bucket."""
    if request.param == "local":
        return LocalStore(str(tmp_path / "store"))
    prefix = request.getfixturevalue("s3_env")
    seaweed: SeaweedS3 = request.getfixturevalue("seaweed")
    return S3Store(seaweed.bucket, prefix)


# ---- behaviour shared by both stores ----------------------------------------------------------


def test_round_trip_of_bytes_and_overwrite(store) -> None:
    payload = bytes(range(256)) * 3
    store.write_bytes("runs/run_1/result.json", payload)
    assert store.read_bytes("runs/run_1/result.json") == payload
    store.write_bytes("runs/run_1/result.json", b"second")
    assert store.read_bytes("runs/run_1/result.json") == b"second"
    store.write_bytes("empty.bin", b"")
    assert store.read_bytes("empty.bin") == b""


def test_list_is_sorted_relative_and_filtered_by_prefix(store) -> None:
    for key in ["b/2.txt", "a/sub/3.txt", "ab.txt", "a/10.txt", "a/1.txt"]:
        store.write_bytes(key, key.encode())
    assert store.list() == ["a/1.txt", "a/10.txt", "a/sub/3.txt", "ab.txt", "b/2.txt"]
    assert store.list("a/") == ["a/1.txt", "a/10.txt", "a/sub/3.txt"]
    assert store.list("a") == ["a/1.txt", "a/10.txt", "a/sub/3.txt", "ab.txt"]
    assert store.list("a/1") == ["a/1.txt", "a/10.txt"]
    assert store.list("a/sub/") == ["a/sub/3.txt"]
    assert store.list("zzz") == []


def test_exists_and_delete(store) -> None:
    assert not store.exists("x/y.bin")
    store.write_bytes("x/y.bin", b"1")
    assert store.exists("x/y.bin")
    store.delete("x/y.bin")
    assert not store.exists("x/y.bin")
    store.delete("x/y.bin")  # absent: no error
    assert store.list() == []


def test_move_renames_one_object_and_names_a_missing_one(store) -> None:
    store.write_bytes("a/model.pt", b"weights")
    store.move("a/model.pt", ".replaced-20260101T000000Z/a/model.pt")
    assert store.list() == [".replaced-20260101T000000Z/a/model.pt"]
    assert store.read_bytes(".replaced-20260101T000000Z/a/model.pt") == b"weights"
    with pytest.raises(StoreKeyMissing):
        store.move("a/model.pt", "b/model.pt")


def test_missing_key_raises_store_key_missing(store, tmp_path: Path) -> None:
    with pytest.raises(StoreKeyMissing):
        store.read_bytes("nothing/here.json")
    with pytest.raises(StoreKeyMissing):
        store.download_file("nothing/here.json", str(tmp_path / "dl" / "here.json"))
    assert not (tmp_path / "dl" / "here.json").exists()


def test_upload_and_download_of_a_large_file(store, tmp_path: Path) -> None:
    source = tmp_path / "big.bin"
    source.write_bytes(random.Random(7).randbytes(20 * MIB))
    expected = hashlib.sha256(source.read_bytes()).hexdigest()

    store.upload_file("models/big.bin", str(source))
    target = tmp_path / "back" / "big.bin"
    store.download_file("models/big.bin", str(target))

    assert hashlib.sha256(target.read_bytes()).hexdigest() == expected
    assert store.list("models/") == ["models/big.bin"]
    if isinstance(store, S3Store):
        head = store.client.head_object(Bucket=store.bucket, Key=f"{store.prefix}/models/big.bin")
        assert head["ContentLength"] == 20 * MIB
        assert head["ETag"].strip('"').endswith("-3")  # 20 MiB in 8 MiB parts: 8 + 8 + 4
    else:
        assert hashlib.sha256(Path(store.url("models/big.bin")).read_bytes()).hexdigest() == expected


def test_check_writable_leaves_nothing_behind(store) -> None:
    store.check_writable()
    assert store.list() == []


def test_keys_that_escape_the_root_are_refused(store) -> None:
    for bad in ["../x", "a/../../x", "/etc/passwd", "", "a\\b"]:
        with pytest.raises(PermanentError):
            store.write_bytes(bad, b"no")
    with pytest.raises(PermanentError):
        store.list("../")


def test_url_helpers_round_trip(store, tmp_path: Path) -> None:
    write_url_bytes(store.url("cfg/train.json"), b'{"seed": 1}')
    assert read_url_bytes(store.url("cfg/train.json")) == b'{"seed": 1}'
    assert store.read_bytes("cfg/train.json") == b'{"seed": 1}'

    source = tmp_path / "model.pt"
    source.write_bytes(b"weights" * 1000)
    upload_url(store.url("out/model.pt"), str(source))
    download_url(store.url("out/model.pt"), str(tmp_path / "copy.pt"))
    assert (tmp_path / "copy.pt").read_bytes() == b"weights" * 1000
    with pytest.raises(StoreKeyMissing):
        read_url_bytes(store.url("cfg/missing.json"))


# ---- local folder -----------------------------------------------------------------------------


def test_local_url_is_absolute_path_and_rejects_escape(tmp_path: Path) -> None:
    store = LocalStore(str(tmp_path / "out"))
    assert store.url("a/b.json") == str(tmp_path / "out" / "a" / "b.json")
    with pytest.raises(PermanentError, match=r"\.\."):
        store.read_bytes("../x")
    assert not (tmp_path / "x").exists()


def test_local_failed_write_keeps_old_content_and_no_temp_file(tmp_path: Path, monkeypatch) -> None:
    store = LocalStore(str(tmp_path))
    store.write_bytes("state.json", b"old")

    def failing_replace(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(PermanentError, match="No space left"):
        store.write_bytes("state.json", b"new")
    monkeypatch.undo()
    assert store.read_bytes("state.json") == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_local_list_skips_temporary_files(tmp_path: Path) -> None:
    store = LocalStore(str(tmp_path))
    store.write_bytes("a/done.json", b"1")
    (tmp_path / "a" / f"{TEMP_PREFIX}abc").write_bytes(b"half")
    assert store.list() == ["a/done.json"]


def test_local_check_writable_on_a_file_is_permanent(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_bytes(b"")
    with pytest.raises(PermanentError, match="not-a-folder"):
        LocalStore(str(blocker)).check_writable()


# ---- S3 specifics -----------------------------------------------------------------------------


def test_s3_prefixes_do_not_see_each_other(seaweed: SeaweedS3, s3_env: str) -> None:
    first = S3Store(seaweed.bucket, s3_env)
    second = S3Store(seaweed.bucket, s3_env + "-other")
    first.write_bytes("k.txt", b"1")
    second.write_bytes("k.txt", b"2")
    assert first.list() == ["k.txt"]
    assert second.list() == ["k.txt"]
    assert first.read_bytes("k.txt") == b"1"
    assert first.url("k.txt") == f"s3://{seaweed.bucket}/{s3_env}/k.txt"
    assert first.root_url == f"s3://{seaweed.bucket}/{s3_env}"


def test_s3_uses_path_style_for_a_custom_endpoint(seaweed: SeaweedS3, s3_env: str) -> None:
    client = make_s3_client()
    assert client.meta.endpoint_url == seaweed.endpoint_url
    assert client.meta.config.s3["addressing_style"] == "path"
    assert client.meta.config.retries["mode"] == "standard"
    # botocore's Config max_attempts counts retries: 5 retries = 6 attempts in all
    assert client.meta.config.retries["total_max_attempts"] == 6


@pytest.mark.parametrize("access_key_kind", ["wrong_secret", "unknown_access_key"])
def test_s3_wrong_credentials_are_permanent_without_the_secret(
    seaweed: SeaweedS3, s3_env: str, monkeypatch, access_key_kind: str
) -> None:
    bad_secret = "bad-secret-0123456789abcdef"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", bad_secret)
    if access_key_kind == "unknown_access_key":
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "nobody-knows-me")
    store = S3Store(seaweed.bucket, s3_env)
    for attempt in (lambda: store.write_bytes("a.txt", b"x"), lambda: store.read_bytes("a.txt"), store.list):
        with pytest.raises(PermanentError) as caught:
            attempt()
        message = str(caught.value)
        assert seaweed.bucket in message
        assert "AWS_SECRET_ACCESS_KEY" in message  # tells what to check
        assert bad_secret not in message and seaweed.secret_key not in message
        assert "SignatureDoesNotMatch" in message or "InvalidAccessKeyId" in message


def test_s3_missing_bucket_is_permanent_and_named(s3_env: str) -> None:
    store = S3Store("no-such-bucket-nexlify", s3_env)
    with pytest.raises(PermanentError, match="no-such-bucket-nexlify") as caught:
        store.check_writable()
    assert "NoSuchBucket" in str(caught.value)


def test_s3_unreachable_endpoint_is_temporary_and_bounded(s3_env: str, monkeypatch) -> None:
    (closed_port,) = free_ports(1)  # bound a moment ago, now closed: connections are refused
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{closed_port}")
    store = S3Store("any-bucket", s3_env, client=make_s3_client(max_attempts=2, connect_timeout=2))
    started = time.monotonic()
    with pytest.raises(TemporaryError, match=f"127.0.0.1:{closed_port}"):
        store.read_bytes("a.txt")
    assert time.monotonic() - started < 15


# ---- pure rules -------------------------------------------------------------------------------


def _client_error(code: str, status: int) -> ClientError:
    return ClientError(
        {"Error": {"Code": code, "Message": "msg"}, "ResponseMetadata": {"HTTPStatusCode": status, "RetryAttempts": 4}},
        "GetObject",
    )


@pytest.mark.parametrize(
    ("code", "status", "expected"),
    [
        ("NoSuchKey", 404, StoreKeyMissing),
        ("404", 404, StoreKeyMissing),
        ("AccessDenied", 403, PermanentError),
        ("InvalidAccessKeyId", 403, PermanentError),
        ("SignatureDoesNotMatch", 403, PermanentError),
        ("NoSuchBucket", 404, PermanentError),
        ("SlowDown", 503, TemporaryError),
        ("InternalError", 500, TemporaryError),
        ("SomethingNew", 502, TemporaryError),
        ("Throttling", 400, TemporaryError),
        ("InvalidArgument", 400, PermanentError),
    ],
)
def test_translate_s3_error_table(code: str, status: int, expected: type) -> None:
    error = translate_s3_error(
        _client_error(code, status), bucket="bkt", location="s3://bkt/p/k", action="reading", endpoint="http://h:1"
    )
    assert type(error) is expected
    assert "s3://bkt/p/k" in str(error)


def test_translate_temporary_error_counts_attempts_and_connection_errors() -> None:
    throttled = translate_s3_error(
        _client_error("SlowDown", 503), bucket="b", location="s3://b/k", action="writing", endpoint=None
    )
    assert "after 5 attempt(s)" in str(throttled)  # RetryAttempts=4 retries + the first try
    refused = translate_s3_error(
        EndpointConnectionError(endpoint_url="http://127.0.0.1:9"), bucket="b", location="s3://b/k",
        action="reading", endpoint="http://127.0.0.1:9",
    )
    assert isinstance(refused, TemporaryError)


@pytest.mark.parametrize(
    ("env_value", "endpoint", "config_file_style", "expected"),
    [
        (None, None, None, None),
        (None, "https://s3.eu-west-1.amazonaws.com", None, None),
        (None, "http://seaweedfs.storage.svc:8333", None, "path"),
        (None, "http://127.0.0.1:8333", "virtual", None),
        ("virtual", "http://127.0.0.1:8333", None, "virtual"),
        ("PATH", None, None, "path"),
    ],
)
def test_choose_addressing_style(env_value, endpoint, config_file_style, expected) -> None:
    assert choose_addressing_style(env_value, endpoint, config_file_style) == expected


def test_choose_addressing_style_rejects_unknown_value() -> None:
    with pytest.raises(InputError, match="AWS_S3_ADDRESSING_STYLE='sideways'"):
        choose_addressing_style("sideways", None, None)


@pytest.mark.parametrize(
    ("key", "expected"), [("a//b/./c.json", "a/b/c.json"), ("x", "x"), ("a/b/", "a/b")]
)
def test_clean_key(key: str, expected: str) -> None:
    assert clean_key(key) == expected


def test_clean_prefix_keeps_folder_meaning() -> None:
    assert clean_prefix("") == ""
    assert clean_prefix("./") == ""
    assert clean_prefix("runs/") == "runs/"
    assert clean_prefix("runs") == "runs"


# ---- open_store -------------------------------------------------------------------------------


def test_open_store_on_urls(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    s3 = open_store("s3://bkt/some/prefix/")
    assert isinstance(s3, S3Store)
    assert (s3.bucket, s3.prefix, s3.root_url) == ("bkt", "some/prefix", "s3://bkt/some/prefix")
    bare = open_store("s3://bkt")
    assert (bare.bucket, bare.prefix, bare.url("k")) == ("bkt", "", "s3://bkt/k")

    monkeypatch.chdir(tmp_path)
    local = open_store("out")
    assert isinstance(local, LocalStore) and local.root_url == str(tmp_path / "out")
    assert open_store(str(tmp_path / "abs")).root_url == str(tmp_path / "abs")
    assert open_store(f"file://{tmp_path}/f").root_url == str(tmp_path / "f")


@pytest.mark.parametrize("url", ["s3://", "s3:///prefix"])
def test_open_store_rejects_s3_url_without_bucket(url: str) -> None:
    with pytest.raises(InputError) as caught:
        open_store(url)
    assert repr(url) in str(caught.value) and "s3://bucket/prefix" in str(caught.value)


def test_open_store_rejects_unknown_scheme() -> None:
    with pytest.raises(InputError, match="gs://bkt/x"):
        open_store("gs://bkt/x")


def test_url_helpers_need_an_object_key() -> None:
    with pytest.raises(InputError, match="'s3://bkt'.*s3://bucket/key"):
        read_url_bytes("s3://bkt")
