"""cenet.data.locate: what each path holds, the search order, and the not-found message."""

from __future__ import annotations

import urllib.error
from pathlib import Path

import pytest

import cenet.data.locate as locate
from cenet.data.locate import (
    CIFAR10_URL,
    find_data,
    find_data_root,
    identify_data,
    shared_data_candidates,
)


def test_identify_each_format(jpeg_tar, python_tar, python_dir, image_folder, tmp_path):
    assert identify_data(jpeg_tar.path).kind == "jpeg_tar"
    assert identify_data(python_tar.path).kind == "python_tar"
    # a directory holding an archive, an extracted release (itself or its parent)
    assert identify_data(python_tar.path.parent) == locate.DataSource("python_tar", python_tar.path)
    batches = python_dir.path / "cifar-10-batches-py"
    assert identify_data(python_dir.path) == locate.DataSource("python_dir", batches)
    assert identify_data(batches) == locate.DataSource("python_dir", batches)
    assert identify_data(image_folder) == locate.DataSource("image_folder", image_folder)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert identify_data(empty) is None
    assert identify_data(tmp_path / "missing") is None


def test_identify_renamed_archives_by_content(jpeg_tar, python_tar, tmp_path):
    renamed_jpeg = tmp_path / "my-images.tgz"
    renamed_jpeg.write_bytes(jpeg_tar.path.read_bytes())
    renamed_py = tmp_path / "release.tar.gz"
    renamed_py.write_bytes(python_tar.path.read_bytes())
    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(b"not a tar at all" * 100)
    assert identify_data(renamed_jpeg).kind == "jpeg_tar"
    assert identify_data(renamed_py).kind == "python_tar"
    assert identify_data(junk) is None


def test_folder_dataset_accepts_only_image_folders(jpeg_tar, python_dir, image_folder):
    assert identify_data(image_folder, dataset="folder").kind == "image_folder"
    assert identify_data(jpeg_tar.path, dataset="folder") is None
    assert identify_data(python_dir.path, dataset="folder") is None
    with pytest.raises(ValueError, match="unknown dataset 'imagenet'"):
        identify_data(image_folder, dataset="imagenet")


def test_explicit_missing_path_raises_at_once(tmp_path, monkeypatch, python_dir):
    monkeypatch.setenv("CENET_DATA", str(python_dir.path))  # a valid fallback must NOT be used
    missing = tmp_path / "nope" / "cifar.tar.gz"
    with pytest.raises(FileNotFoundError, match="does not exist") as err:
        find_data(missing)
    assert str(missing) in str(err.value)


def test_explicit_path_without_data_raises(tmp_path, monkeypatch, python_dir):
    monkeypatch.setenv("CENET_DATA", str(python_dir.path))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="holds no cifar10 data") as err:
        find_data(empty)
    assert str(empty) in str(err.value)


def test_search_order_explicit_env_shared(tmp_path, monkeypatch, jpeg_tar, python_tar, python_dir):
    checkout = tmp_path / "work" / "main" / "src" / "pkg"
    checkout.mkdir(parents=True)
    shared = tmp_path / "work" / "shared" / "data"
    shared.mkdir(parents=True)
    (shared / "cifar10-jpeg.tar.gz").write_bytes(jpeg_tar.path.read_bytes())
    kw = {"search_from": [checkout], "cache_dir": tmp_path / "cache"}

    monkeypatch.setenv("CENET_DATA", str(python_dir.path))
    # 1. explicit beats the environment variable
    assert find_data(python_tar.path, **kw) == locate.DataSource("python_tar", python_tar.path)
    # 2. the environment variable beats shared/data
    assert find_data(None, **kw).kind == "python_dir"
    assert find_data("", **kw).kind == "python_dir"  # empty string means "not given"
    # 3. shared/data next to the checkout
    monkeypatch.delenv("CENET_DATA")
    assert find_data(None, **kw) == locate.DataSource("jpeg_tar", shared / "cifar10-jpeg.tar.gz")


def test_unusable_env_var_falls_through_to_shared(tmp_path, monkeypatch, jpeg_tar):
    shared = tmp_path / "shared" / "data"
    shared.mkdir(parents=True)
    (shared / "cifar10-jpeg.tar.gz").write_bytes(jpeg_tar.path.read_bytes())
    monkeypatch.setenv("CENET_DATA", str(tmp_path / "does-not-exist"))
    start = tmp_path / "a" / "b"
    start.mkdir(parents=True)
    found = find_data(None, search_from=[start], download=False)
    assert found.path == shared / "cifar10-jpeg.tar.gz"


def test_shared_candidates_walk_up_from_each_start(tmp_path):
    a = tmp_path / "work" / "main" / "src" / "cenet" / "data"
    b = tmp_path / "elsewhere"
    got = shared_data_candidates([a, b])
    assert got[0] == a / "shared" / "data"
    assert tmp_path / "work" / "shared" / "data" in got
    assert b / "shared" / "data" in got
    assert len(got) == len(set(got))  # common parents are listed once


def test_package_location_reaches_the_real_shared_dir(tmp_path, monkeypatch):
    real = Path("/work/shared/data")
    here = Path(locate.__file__).resolve()
    checkout = here.parents[3]  # <checkout>/src/cenet/data/locate.py
    archive = real / "cifar10-jpeg.tar.gz"
    if not archive.is_file() or checkout.parent != Path("/work"):
        pytest.skip("not in the /work/<checkout> + /work/shared/data/cifar10-jpeg.tar.gz layout")
    assert real in shared_data_candidates([here.parent])
    monkeypatch.chdir(tmp_path)  # the walk up from the package file alone must find it
    assert find_data_root(None, download=False) == archive


def test_offline_message_names_every_place(tmp_path, monkeypatch):
    start = tmp_path / "checkout" / "src"
    start.mkdir(parents=True)
    (tmp_path / "shared" / "data").mkdir(parents=True)  # exists but empty
    cache = tmp_path / "mycache"
    env_value = str(tmp_path / "env-data-missing")
    monkeypatch.setenv("CENET_DATA", env_value)
    calls = []

    def offline(root):
        calls.append(root)
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(locate, "download_cifar10", offline)
    with pytest.raises(FileNotFoundError) as err:
        find_data(None, search_from=[start], cache_dir=cache)
    msg = str(err.value)
    assert calls == [cache / "cifar10"]
    for candidate in shared_data_candidates([start]):
        assert str(candidate) in msg
    assert f"{tmp_path / 'shared' / 'data'} (exists, no cifar10 data in it)" in msg
    assert f"$CENET_DATA={env_value}: does not exist" in msg
    assert CIFAR10_URL in msg and str(cache / "cifar10") in msg
    assert "URLError" in msg and "Name or service not known" in msg
    assert "--data PATH" in msg and "CENET_DATA=PATH" in msg
    assert isinstance(err.value.__cause__, urllib.error.URLError)


def test_message_when_env_unset_and_download_disabled(tmp_path):
    start = tmp_path / "x"
    start.mkdir()
    with pytest.raises(FileNotFoundError) as err:
        find_data(None, search_from=[start], cache_dir=tmp_path / "c", download=False)
    msg = str(err.value)
    assert "$CENET_DATA: unset" in msg
    assert "disabled (download=False)" in msg and CIFAR10_URL in msg


def test_folder_dataset_never_downloads(tmp_path):
    start = tmp_path / "x"
    start.mkdir()
    with pytest.raises(FileNotFoundError, match="not available for dataset='folder'"):
        find_data(None, dataset="folder", search_from=[start])


def test_download_lands_in_cache_and_is_found_next_time(tmp_path, monkeypatch, python_dir):
    calls = []

    def fake_download(root: Path):
        calls.append(root)
        target = root / "cifar-10-batches-py"
        target.mkdir(parents=True)
        for f in (python_dir.path / "cifar-10-batches-py").iterdir():
            (target / f.name).write_bytes(f.read_bytes())

    monkeypatch.setattr(locate, "download_cifar10", fake_download)
    start = tmp_path / "x"
    start.mkdir()
    kw = {"search_from": [start], "cache_dir": tmp_path / "c"}
    first = find_data(None, **kw)
    assert first == locate.DataSource(
        "python_dir", tmp_path / "c" / "cifar10" / "cifar-10-batches-py"
    )
    assert find_data(None, download=False, **kw) == first
    assert len(calls) == 1
