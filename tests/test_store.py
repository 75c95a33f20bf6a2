"""The storage layer on a directory and on S3 (moto_server on loopback, through the same fsspec path as real S3)."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import time

import pytest
from servers import KVCLI, REPO, ThrottleProxy, aws_free_env, free_port, make_big_cache, make_cache, moto_server

from kvcli.container import format, keys
from kvcli.errors import FormatError, InputError, UsageError
from kvcli.storage import remote, store

pytestmark = pytest.mark.slow  # starts servers, moto or Ray: outside the fast `-m 'not slow'` loop

SOURCE = "5" * 64


def corrupt(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x40]) + data[at + 1 :]


@pytest.fixture(params=["dir", "s3"])
def any_store(request, tmp_path):
    if request.param == "dir":
        return lambda: store.open_store(str(tmp_path / "root"), create=True)
    request.getfixturevalue("s3_env")
    prefix = f"s3://caches/{request.node.name.replace('[', '-').rstrip(']')}"
    return lambda: store.open_store(prefix)


def test_put_list_lookup_and_read_back(any_store):
    st = any_store()
    a, b = make_cache(seed=1, source=SOURCE), make_cache(seed=2, tokens=17)
    key_a = st.put(None, a)
    key_b = st.put(None, b)
    assert key_a == keys.key_of_header(format.read_header(format.BytesSource(a)))
    assert st.exists(key_a) and st.size(key_b) == len(b)
    assert st.read(key_a, 100, 50) == a[100:150]
    with st.open(key_a) as src:
        assert src.read(0, src.size) == a
    # A new store object knows nothing in memory: everything comes back from the files.
    again = any_store()
    listed = {e["key"]: e for e in again.list()}
    assert set(listed) == {key_a, key_b}
    assert listed[key_a]["bytes"] == len(a) and listed[key_b]["tokens"] == 17
    assert listed[key_a]["source_sha256"] == SOURCE and listed[key_a]["created_at"] == "2026-01-31T12:00:00Z"
    assert again.list(model="a" * 64) and again.list(model="e" * 64) == []
    header_b = format.read_header(format.BytesSource(b))
    assert [e["key"] for e in again.lookup(tokens_sha256=keys.tokens_sha256(header_b.token_ids))] == [key_b]
    assert [e["key"] for e in again.lookup(source_sha256=SOURCE)] == [key_a]
    assert again.delete(key_a) and not again.exists(key_a) and not again.delete(key_a)
    with pytest.raises(InputError):
        again.open(key_a)


def test_corrupt_or_mislabelled_upload_is_refused_and_leaves_nothing(any_store):
    st = any_store()
    data = make_cache(seed=3)
    key = keys.key_of_header(format.read_header(format.BytesSource(data)))
    with pytest.raises(FormatError, match="checksum"):
        st.put(None, corrupt(data, len(data) - 10))
    with pytest.raises(FormatError, match="truncated"):
        st.put(None, data[:-1])
    with pytest.raises(FormatError, match="does not match"):
        st.put("f" * 64, data)
    with pytest.raises(UsageError):
        st.put("../" + "f" * 61, data)
    assert st.list() == [] and not st.exists(key)
    if isinstance(st, store.DirStore):
        assert os.listdir(st.root) == []


def test_a_damaged_file_in_the_store_is_left_out_of_listings(tmp_path):
    st = store.open_store(str(tmp_path))
    key = st.put(None, make_cache(seed=4))
    (tmp_path / ("e" * 64 + ".kvc")).write_bytes(b"not a cache")
    (tmp_path / "notes.txt").write_text("ignored")
    assert [e["key"] for e in st.list()] == [key]


def _put_many(root: str, data: bytes, n: int) -> None:
    st = store.open_store(root)
    for _ in range(n):
        st.put(None, data)


def test_two_writers_of_one_key_both_succeed_and_leave_one_valid_file(tmp_path):
    data = make_cache(seed=5, tokens=400, dim=64)
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_put_many, args=(str(tmp_path), data, 20)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    names = sorted(os.listdir(tmp_path))
    assert len(names) == 2 and names[0] == ".index" and names[1].endswith(".kvc")  # no temporaries left behind
    assert (tmp_path / names[1]).read_bytes() == data
    entries = [p for p in (tmp_path / ".index").rglob("*") if p.is_file()]
    assert [p.name for p in entries] == [names[1][:-4]] * (400 // 256)  # nor among the index entries


def test_open_store_kinds(tmp_path):
    assert isinstance(store.open_store(str(tmp_path)), store.DirStore)
    assert isinstance(store.open_store(f"file://{tmp_path}"), store.DirStore)
    assert isinstance(store.open_store("http://127.0.0.1:9"), store.ServerStore)
    with pytest.raises(InputError):
        store.open_store(str(tmp_path / "missing"))
    with pytest.raises(UsageError):
        store.open_store("nosuchprotocol://x/y")


def test_s3_store_survives_two_replicas_writing_one_bucket(s3_env):
    one, two = store.open_store("s3://caches/shared"), store.open_store("s3://caches/shared/")
    k1 = one.put(None, make_cache(seed=6))
    k2 = two.put(None, make_cache(seed=7))
    assert {e["key"] for e in one.list()} == {e["key"] for e in two.list()} == {k1, k2}
    assert one.url_for(k1) == f"s3://caches/shared/{k1}.kvc"


def staged_upload(data: bytes) -> tuple[str, str]:
    src = format.BytesSource(data)
    header = format.read_header(src)
    return keys.key_of_header(header), store.header_digest(src, header)


def test_uploads_in_parts_are_checked_staged_and_completed(any_store):
    st = any_store()
    st.part_bytes = part = 64 << 10
    data = make_cache(seed=8, tokens=600, dim=64)  # about 300 KiB: five parts
    key, upload = staged_upload(data)
    for offset, length, words in ((1, 10, "multiple"), (part // 2, 10, "multiple"), (-part, 10, "multiple"),
                                  (0, part + 1, "1 to"), (0, 0, "1 to")):
        with pytest.raises(UsageError, match=words):
            st.put_part(key, upload, offset, data[:length] if offset >= 0 else b"x" * length)
    with pytest.raises(UsageError):
        st.put_part(key, "../" + "0" * 61, 0, data[:10])
    assert st.upload_state(key, upload)["parts"] == []
    offsets = list(range(0, len(data), part))
    for offset in offsets[1:]:
        st.put_part(key, upload, offset, data[offset : offset + part])
    with pytest.raises(store.UploadConflict, match=f"lacks bytes \\[0, {part}\\)"):
        st.complete_upload(key, upload, len(data))
    st.put_part(key, upload, 0, data[:part])
    with pytest.raises(store.UploadConflict, match="more than the declared"):
        st.complete_upload(key, upload, len(data) - 1)
    # A fresh store object (another replica) sees the same parts, and completes the upload.
    other = any_store()
    other.part_bytes = part
    assert [o for o, _ in other.upload_state(key, upload)["parts"]] == offsets
    assert other.complete_upload(key, upload, len(data)) == key
    assert st.read(key, 0, len(data)) == data
    assert st.upload_state(key, upload)["parts"] == [] and not st.abort_upload(key, upload)
    # A corrupt assembly is refused, stores nothing and drops its parts.
    bad = make_cache(seed=9, tokens=600, dim=64)
    bad_key, bad_upload = staged_upload(bad)
    for offset in offsets:
        chunk = bytearray(bad[offset : offset + part])
        if offset == part:
            chunk[5] ^= 0x10
        st.put_part(bad_key, bad_upload, offset, bytes(chunk))
    with pytest.raises(FormatError, match="checksum mismatch"):
        st.complete_upload(bad_key, bad_upload, len(bad))
    assert not st.exists(bad_key) and st.upload_state(bad_key, bad_upload)["parts"] == []
    with pytest.raises(InputError, match="no upload"):
        st.complete_upload(bad_key, bad_upload, len(bad))
    # Sweeping drops only uploads idle longer than the age given; abort drops one.
    st.put_part(bad_key, bad_upload, 0, bad[:part])
    assert st.sweep_uploads() == 0 and st.upload_state(bad_key, bad_upload)["parts"]
    assert st.sweep_uploads(max_age_s=-60) == 1 and st.upload_state(bad_key, bad_upload)["parts"] == []
    st.put_part(bad_key, bad_upload, 0, bad[:part])
    assert st.abort_upload(bad_key, bad_upload) and st.upload_state(bad_key, bad_upload)["parts"] == []
    assert [e["key"] for e in st.list()] == [key]  # staging never shows in listings
    if isinstance(st, store.DirStore):
        assert [p for p in (st.root / store.UPLOADS).rglob("*") if p.is_file()] == []


def test_push_to_an_object_store_resumes_from_staged_parts(s3_env, tmp_path):
    st = store.open_store("s3://caches/pushed")
    st.part_bytes = part = 64 << 10
    data = make_cache(seed=10, tokens=600, dim=64)
    path = tmp_path / "c.kvc"
    path.write_bytes(data)
    key, upload = staged_upload(data)
    for offset in (0, part, 3 * part):  # what an earlier push got across before it broke off
        st.put_part(key, upload, offset, data[offset : offset + part])
    result = store.push(st, path)
    assert result == {"key": key, "url": f"s3://caches/pushed/{key}.kvc", "bytes": len(data), "uploaded": True,
                      "resumed_from": 2 * part, "sent": len(data) - 3 * part}
    assert st.read(key, 0, len(data)) == data and st.upload_state(key, upload)["parts"] == []
    assert store.push(st, path)["uploaded"] is False
    local = store.open_store(str(tmp_path / "dir"), create=True)
    local.part_bytes = part
    assert store.push(local, path)["sent"] == len(data)  # a directory: one atomic put, nothing to resume
    assert sorted(os.listdir(tmp_path / "dir")) == [".index", f"{key}.kvc"]



def test_push_replaces_a_truncated_or_foreign_object_under_its_key(any_store, tmp_path):
    st = any_store()
    data = make_cache(seed=12)
    path = tmp_path / "c.kvc"
    path.write_bytes(data)
    key = keys.key_of_header(format.read_header(format.BytesSource(data)))
    for damaged in (data[:-10], make_cache(seed=13)):  # what another writer or a broken disk left under the key
        st._write(key, format.BytesSource(damaged))
        assert store.push(st, path)["uploaded"] is True
        assert st.read(key, 0, len(data)) == data
    assert store.push(st, path)["uploaded"] is False  # a sound copy is trusted: nothing sent


# ---------------------------------------------------------------- S3 failures seen by the commands


def run_kvcli(args, env: dict) -> subprocess.Popen:
    return subprocess.Popen(KVCLI + [str(a) for a in args], env=env, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, timeout: float = 120) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    return proc.returncode, out, err


def assert_storage_error(result: tuple[int, str, str], words: str) -> None:
    """Exit 8 and one `Error:` line naming the cause: no traceback, no "a bug in kvcli"."""
    code, out, err = result
    lines = err.splitlines()
    assert code == 8 and len(lines) == 1 and lines[0].startswith("Error: ") and words in lines[0], err[-3000:]
    assert out == ""


def s3_commands(tmp_path, url: str) -> dict[str, list]:
    """push, pull, generate --cache and prefill --out-dir against `url`. The model path does not exist: a command
    that got as far as loading it would exit 7, so an exit 8 shows the store was found out before any work."""
    cache = tmp_path / "c.kvc"
    cache.write_bytes(make_cache(seed=70))
    doc = tmp_path / "doc.txt"
    doc.write_text("A short document.\n")
    key = "7" * 64
    return {"push": ["push", cache, url],
            "pull": ["pull", f"{url}/{key}.kvc", "-o", tmp_path / "pulled.kvc"],
            "generate": ["generate", "--cache", f"{url}/{key}.kvc", "--model", tmp_path / "no-model", "Q"],
            "prefill": ["prefill", doc, "--out-dir", url, "--model", tmp_path / "no-model"]}


@pytest.mark.parametrize("failure", ["no credentials", "unreachable endpoint"])
def test_s3_failures_are_one_line_and_exit_8_for_every_command(failure, tmp_path):
    pytest.importorskip("s3fs")
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    if failure == "no credentials":
        env, words = aws_free_env(AWS_ENDPOINT_URL=endpoint), "no usable S3 credentials"
    else:
        env, words = aws_free_env(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="k", AWS_SECRET_ACCESS_KEY="s"), \
            "Could not connect to the endpoint"
    procs = {name: run_kvcli(args, env) for name, args in s3_commands(tmp_path, "s3://caches/p").items()}
    for name, proc in procs.items():
        assert_storage_error(finish(proc), words)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.kvc", "doc.txt"]  # no partial file from pull


def test_s3_store_killed_mid_push_is_one_line_and_exit_8(tmp_path):
    pytest.importorskip("s3fs")
    boto3 = pytest.importorskip("boto3")
    path = tmp_path / "big.kvc"
    path.write_bytes(make_big_cache(seed=71, mib=20))  # three parts of 8 MiB
    with moto_server() as env:
        s3 = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id="testing",
                          aws_secret_access_key="testing", region_name="us-east-1")
        s3.create_bucket(Bucket="caches")
        port = int(env["AWS_ENDPOINT_URL"].rsplit(":", 1)[1])
        with ThrottleProxy(("127.0.0.1", port), up_rate=4e6) as proxy:  # about 5 s for the whole file
            proc = run_kvcli(["push", path, "s3://caches/p"],
                             aws_free_env(**{**env, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{proxy.port}"}))
            deadline = time.monotonic() + 60
            def staged_parts():  # push's writability probe lives under .uploads/ too, briefly
                listed = s3.list_objects_v2(Bucket="caches", Prefix="p/.uploads/").get("Contents", [])
                return [o for o in listed if "/probe-" not in o["Key"]]

            while not staged_parts():
                assert proc.poll() is None and time.monotonic() < deadline, finish(proc)
                time.sleep(0.05)
            env.proc.kill()  # one part staged, the next on its way
        result = finish(proc)
    assert_storage_error(result, "cannot stage a part")


def test_s3_requests_are_retried_by_botocore_alone_below_kvcli(monkeypatch):
    """s3fs's own retry loop multiplied botocore's: an endpoint that accepted connections and never answered
    kept one push going for more than 6 minutes (docs/server.md has the measurements)."""
    pytest.importorskip("s3fs")
    for name in ("AWS_RETRY_MODE", "AWS_MAX_ATTEMPTS"):
        monkeypatch.delenv(name, raising=False)
    fs, _ = remote.filesystem("s3://caches/retries")
    assert fs.retries == 1 and fs.config_kwargs["retries"] == {"mode": "standard"}
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "7")  # the user's choice stands
    fs, _ = remote.filesystem("s3://caches/retries")
    assert "retries" not in fs.config_kwargs
