"""`mim pack`: shards, index, atomic and resumable writes."""

from __future__ import annotations

import hashlib
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mim.cli import main as cli_main
from mim.data.pack import pack, parse_size


def make_images(root: Path, per_class: int = 6, size: tuple[int, int] = (48, 40)) -> Path:
    """A class-per-subfolder folder of noisy JPEG and PNG images (2 classes)."""
    for c, name in enumerate(("cat", "dog")):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = np.random.default_rng(c * 100 + i).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i:02d}.{'png' if i % 3 == 0 else 'jpg'}", quality=90)
    return root


def _members(shard: Path) -> list[str]:
    with tarfile.open(shard) as tar:
        return tar.getnames()


def test_parse_size():
    assert parse_size("1GB") == 1 << 30 and parse_size("500MB") == 500 << 20 and parse_size("64KB") == 64 << 10
    assert parse_size(4096) == 4096 and parse_size("4096") == 4096
    with pytest.raises(ValueError, match="shard_size"):
        parse_size("lots")


def test_pack_folder_index_and_checksums(tmp_path: Path):
    src = make_images(tmp_path / "src")
    index = pack(src, tmp_path / "out", shard_samples=5, progress=False)
    assert index["num_samples"] == 12 and index["num_shards"] == 3 and index["classes"] == ["cat", "dog"]
    assert [s["samples"] for s in index["shards"]] == [5, 5, 2]
    assert json.loads((tmp_path / "out" / "index.json").read_text()) == index
    keys, labels = [], []
    for record in index["shards"]:
        shard = tmp_path / "out" / record["name"]
        assert hashlib.sha256(shard.read_bytes()).hexdigest() == record["sha256"]
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".cls"):
                    labels.append(int(tar.extractfile(member).read()))  # type: ignore[union-attr]
                else:
                    assert member.name.endswith(".jpg")
                    data = tar.extractfile(member).read()  # type: ignore[union-attr]
                    assert data[:2] == b"\xff\xd8"  # JPEG (PNGs re-encoded)
                    keys.append(member.name)
    assert len(set(keys)) == 12 and sorted(labels) == [0] * 6 + [1] * 6
    assert not list((tmp_path / "out").glob("*.tmp"))
    # original JPEG bytes are kept when no resize is asked
    originals = {p.read_bytes() for p in src.rglob("*.jpg")}
    with tarfile.open(tmp_path / "out" / index["shards"][0]["name"]) as tar:
        stored = {tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".jpg")}  # type: ignore[union-attr]
    assert stored & originals


def test_pack_resize_shard_size_and_list_file(tmp_path: Path):
    src = make_images(tmp_path / "src", per_class=3, size=(80, 60))
    lines = [f"{p.relative_to(tmp_path)} {i % 2}" for i, p in enumerate(sorted(src.rglob("*.*")))]
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    index = pack(tmp_path / "list.txt", tmp_path / "out", shard_size="8KB", resize_short=32, progress=False)
    assert index["num_samples"] == 6 and index["num_shards"] >= 2
    with tarfile.open(tmp_path / "out" / index["shards"][0]["name"]) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".jpg"))
        image = Image.open(tar.extractfile(member))  # type: ignore[arg-type]
        assert min(image.size) == 32


def test_pack_is_deterministic_and_resumes_without_rewriting(tmp_path: Path):
    src = make_images(tmp_path / "src")
    reference = pack(src, tmp_path / "ref", shard_samples=3, progress=False)

    def fail_after_two(number: int) -> None:
        if number == 1:
            raise KeyboardInterrupt("simulated kill")

    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        pack(src, out, shard_samples=3, progress=False, after_shard=fail_after_two)
    assert sorted(p.name for p in out.glob("*.tar")) == ["shard-000000.tar", "shard-000001.tar"]
    assert not list(out.glob("*.tmp")) and not (out / "index.json").exists()
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    written = []
    index = pack(src, out, shard_samples=3, progress=False, after_shard=written.append)
    assert written == [2, 3]  # the complete shards were not rewritten
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("shard-00000[01].tar")} == mtimes
    assert [s["sha256"] for s in index["shards"]] == [s["sha256"] for s in reference["shards"]]
    # a damaged complete shard fails its checksum and is rewritten
    (out / "shard-000001.tar").write_bytes(b"garbage")
    written.clear()
    index = pack(src, out, shard_samples=3, progress=False, after_shard=written.append)
    assert written == [1, 2, 3] and index == reference | {"args": index["args"]}


def test_cli_pack(tmp_path: Path, capsys):
    src = make_images(tmp_path / "src", per_class=2)
    assert cli_main(["pack", str(src), str(tmp_path / "out"), "--shard-size", "64KB", "--no-progress"]) == 0
    assert "packed 4 samples" in capsys.readouterr().out
    assert _members(tmp_path / "out" / "shard-000000.tar")
