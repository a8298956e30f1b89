"""Split metadata at scale: the iNat2018/Places-LT-shaped fixtures, the compact path
table, and the node cache (parsed once, mapped after, rebuilt when a source changes,
one parse when 8 ranks start at once)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from jrcl_fast.config import DataConfig
from jrcl_fast.data import metadata_cache
from jrcl_fast.data.catalog import load_dataset
from jrcl_fast.data.fixtures import INAT2018_TRAIN, PLACES_LT_TRAIN, class_counts, write_inat2018, write_places_lt
from jrcl_fast.data.long_tailed_dataset import PathTable, Split

SCALE = 0.02  # 163 iNat classes, ~11k training entries


@pytest.fixture(autouse=True)
def own_user_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("JRCL_FAST_CACHE", str(tmp_path / "user-cache"))


def test_full_size_profiles_hit_the_published_counts():
    inat = class_counts(INAT2018_TRAIN)
    groups = ((inat > 100).sum(), ((inat >= 20) & (inat <= 100)).sum(), (inat < 20).sum())
    assert (len(inat), inat.sum(), groups) == (8142, 437_513, (842, 4076, 3224))
    assert inat.max() == 1000 and inat.min() >= 2 and np.all(np.diff(inat) <= 0)
    places = class_counts(PLACES_LT_TRAIN)
    assert (len(places), places.sum(), places.max(), places.min()) == (365, 62_500, 4980, 5)


def reference_inat(root: Path, name: str) -> tuple[list[str], list[int]]:
    """file_name and category id of each image, straight from the JSON."""
    data = json.loads((root / name).read_text())
    category = {a["image_id"]: a["category_id"] for a in data["annotations"]}
    return [im["file_name"] for im in data["images"]], [category[im["id"]] for im in data["images"]]


def test_inat_fixture_loads_then_maps_its_cache(tmp_path):
    root = write_inat2018(tmp_path / "inat", SCALE, seed=int(time.time()))
    first = load_dataset(DataConfig(name="inat2018", root=str(root)))
    cache_files = list((root / ".jrcl_fast_cache").glob("*.meta"))
    assert len(cache_files) == 1
    again = load_dataset(DataConfig(name="inat2018", root=str(root)))
    for dataset in (first, again):
        for split, name in ((dataset.train, "train2018.json"), (dataset.test, "val2018.json")):
            paths, categories = reference_inat(root, name)
            assert list(split.paths) == paths and split.paths[-1] == paths[-1]
            assert [dataset.class_ids[k] for k in split.labels.tolist()] == categories
            mapped = [a for a in (split.labels, split.paths.blob, split.paths.offsets) if not a.flags.writeable]
            assert len(mapped) == 3 and not any(a.flags.owndata for a in mapped)
    assert first.class_names == again.class_names and len(first.class_names) == len(class_counts(INAT2018_TRAIN, SCALE))
    header = metadata_cache._read_header(cache_files[0])
    assert {Path(s["path"]).name for s in header["sources"]} == {"train2018.json", "val2018.json"}
    assert all(len(s["sha256"]) == 64 for s in header["sources"])


def test_a_changed_source_is_parsed_again(tmp_path):
    root = write_places_lt(tmp_path / "places", SCALE)
    before = load_dataset(DataConfig(name="places_lt", root=str(root)))
    lines = (root / "Places_LT_val.txt").read_text().splitlines(keepends=True)
    (root / "Places_LT_val.txt").write_text("".join(lines[1:]))  # one entry fewer
    after = load_dataset(DataConfig(name="places_lt", root=str(root)))
    assert len(after.val) == len(before.val) - 1 and list(after.val.paths) == list(before.val.paths)[1:]
    os.utime(root / "Places_LT_test.txt", ns=(1, 1))  # same bytes, new mtime: parsed again, same result
    touched = load_dataset(DataConfig(name="places_lt", root=str(root)))
    assert list(touched.test.paths) == list(after.test.paths)
    assert np.array_equal(touched.test.labels, after.test.labels)


def test_a_broken_cache_file_is_rebuilt(tmp_path):
    root = write_places_lt(tmp_path / "places", SCALE)
    expected = list(load_dataset(DataConfig(name="places_lt", root=str(root))).train.paths)
    (cache,) = (root / ".jrcl_fast_cache").glob("*.meta")
    head = cache.read_bytes()[:100]
    cache.unlink()  # a new file, as every writer makes: truncating a mapped file in place would fault its readers
    cache.write_bytes(head)
    rebuilt = load_dataset(DataConfig(name="places_lt", root=str(root)))
    assert list(rebuilt.train.paths) == expected and cache.stat().st_size > 100


def test_a_read_only_root_caches_in_the_user_cache(tmp_path, monkeypatch):
    root = write_places_lt(tmp_path / "places", SCALE)
    writable = metadata_cache._writable
    monkeypatch.setattr(metadata_cache, "_writable", lambda folder: folder.parent != root and writable(folder))
    load_dataset(DataConfig(name="places_lt", root=str(root)))
    assert not (root / ".jrcl_fast_cache").exists()
    assert len(list((tmp_path / "user-cache" / "metadata").glob("places_lt-*.meta"))) == 1


RANK = """
import hashlib, sys, time
from jrcl_fast.config import DataConfig
from jrcl_fast.data import metadata_cache
from jrcl_fast.data.catalog import load_dataset

write = metadata_cache.write_cache
def counted(*args):
    with open(sys.argv[2], "a") as log:
        log.write("parsed\\n")
    write(*args)
metadata_cache.write_cache = counted
time.sleep(max(0.0, float(sys.argv[3]) - time.time()))
dataset = load_dataset(DataConfig(name="inat2018", root=sys.argv[1]))
digest = hashlib.sha256("\\n".join(dataset.train.paths).encode() + dataset.train.labels.tobytes()).hexdigest()
print(digest, len(dataset.train))
"""


def test_eight_ranks_starting_at_once_parse_once(tmp_path):
    root = write_inat2018(tmp_path / "inat", SCALE)
    log = tmp_path / "parses.log"
    start_at = str(time.time() + 4.0)  # after all 8 have imported, on a loaded 2-core machine too
    ranks = [subprocess.Popen([sys.executable, "-c", RANK, str(root), str(log), start_at], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(8)]
    outputs = [rank.communicate(timeout=300) for rank in ranks]
    assert [rank.returncode for rank in ranks] == [0] * 8, outputs
    assert log.read_text() == "parsed\n"
    paths, _ = reference_inat(root, "train2018.json")
    assert len({out for out, _ in outputs}) == 1 and outputs[0][0].split()[1] == str(len(paths))


def test_path_table_is_a_sequence_of_the_given_strings():
    rng = np.random.default_rng()
    alphabet = list("abc/._-") + ["é", "ß", "木", "🦉"]
    paths = ["".join(rng.choice(alphabet, size=rng.integers(0, 12))) for _ in range(200)]
    table = PathTable.from_strings(paths)
    assert len(table) == 200 and list(table) == paths and table == paths and table != paths[:-1]
    assert [table[i] for i in (-1, 0, 57)] == [paths[-1], paths[0], paths[57]]
    assert table[10:20:3] == paths[10:20:3] and table[np.int64(5)] == paths[5]
    with pytest.raises(IndexError):
        table[200]
    split = Split(Path("/data"), paths, np.zeros(200, dtype=np.int64), "list.txt")
    assert isinstance(split.paths, PathTable) and split.paths == paths
