"""SEN12MS: the synthetic copy in the real layout, the reader, split lists (text and safe pickles), labels from
the LC patch, S1 cleaning, bad files, normalisation constants, sensor pairs."""

import os
import pickle
import shutil

import numpy as np
import pytest
import rasterio
from affine import Affine

from jaxgeo.data import BadSampleError, build_source, data_config, make_iter_dataset, write_geotiff
from jaxgeo.data import sen12ms as s12
from jaxgeo.data.safe_pickle import UnsafeListError
from jaxgeo.data.synthetic_sen12ms import write_synthetic_sen12ms

SIZE = 32
SCENES, PER_SCENE = 8, 4
# The seed's constants, copied here by hand from schmitt-muc/SEN12MS classification/dataset.py, so a typo in the
# module cannot agree with itself.
SEED_S1 = ([-11.76858, -18.294598], [4.525339, 4.3586307])
SEED_S2 = (
  [1226.4215, 1137.3799, 1139.6792, 1350.9973, 1932.9058, 2211.1584, 2154.9846, 2409.1128, 2001.8622, 1356.0801],
  [741.6254, 740.883, 960.1045, 946.76056, 985.52747, 1082.4341, 1057.7628, 1136.1942, 1132.7898, 991.48016],
)


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory):
  return write_synthetic_sen12ms(tmp_path_factory.mktemp("synthetic_sen12ms"), SCENES, PER_SCENE, patch_size=SIZE)


def _config(directory, **fields):
  config = data_config("sen12ms")
  config.synthetic_dir = str(directory)
  config.synthetic_num_scenes, config.synthetic_patches_per_scene, config.synthetic_patch_size = SCENES, PER_SCENE, SIZE
  config.update(fields)
  return config


def _read(path, band=None):
  with rasterio.open(path) as src:
    return src.read(band) if band else src.read()


# ---------------------------------------------------------------- the synthetic copy
def test_synthetic_copy_has_the_real_layout_formats_and_lists(synthetic_root):
  train = s12.read_name_list(os.path.join(synthetic_root, "train_list.txt"))
  test = s12.read_name_list(os.path.join(synthetic_root, "test_list.txt"))
  assert train == s12.read_name_list(os.path.join(synthetic_root, "train_list.pkl"))
  assert test == s12.read_name_list(os.path.join(synthetic_root, "test_list.pkl")) == sorted(test)
  assert len(train) + len(test) == SCENES * PER_SCENE and not set(train) & set(test)
  with open(os.path.join(synthetic_root, "train_list_small.pkl"), "rb") as f:
    small = pickle.load(f)  # a real pickle of numpy.str_, like the seed's train_list_1024.pkl
  assert type(small[0]) is np.str_ and set(small) < set(train)
  scene = lambda name: name.rsplit("_p", 1)[0].replace("_s2_", "/s1_")  # ROIs1158_spring/s1_3, as the real file
  with open(os.path.join(synthetic_root, "SEN12MS_holdOutScenes.txt")) as f:
    assert {scene(n) for n in test} == set(f.read().split())
  assert not {scene(n) for n in train} & {scene(n) for n in test}  # held out by scene, as the real test split
  name = train[0]
  season, folder = name.split("_s2_")[0], "s2_" + name.split("_s2_")[1].split("_")[0]
  assert season in s12.SEASONS and os.path.isfile(os.path.join(synthetic_root, season, folder, name))
  for sensor, count, dtype in (("s2", 13, "uint16"), ("s1", 2, "float32"), ("lc", 4, "uint16")):
    path = s12.sensor_path(synthetic_root, name, sensor)
    assert os.path.basename(path) == name.replace("_s2_", f"_{sensor}_")
    with rasterio.open(path) as src:
      assert (src.driver, src.count, src.height, src.width, src.dtypes[0]) == ("GTiff", count, SIZE, SIZE, dtype)
      assert src.crs.to_epsg() // 100 in (326, 327)  # UTM north / south
      assert src.transform.a == -src.transform.e == 2560 / SIZE  # a 256-px, 10 m patch's extent
  igbp = _read(s12.sensor_path(synthetic_root, name, "lc"), 1)
  assert igbp.min() >= 1 and igbp.max() <= 17
  marker = os.path.join(synthetic_root, "COMPLETE")
  before = os.stat(marker).st_mtime_ns
  assert write_synthetic_sen12ms(os.path.dirname(synthetic_root), SCENES, PER_SCENE, patch_size=SIZE) == synthetic_root
  assert os.stat(marker).st_mtime_ns == before  # cached, not rewritten


def test_synthetic_sensors_follow_one_land_cover_map(synthetic_root):
  """Water dark in S1 and NIR, built-up land brightest in S1, vegetation bright in NIR: per class, over all
  patches, so the S1 / S2 of a place share content."""
  names = [line.strip() for line in open(os.path.join(synthetic_root, "train_list.txt"))]
  names += [line.strip() for line in open(os.path.join(synthetic_root, "test_list.txt"))]
  vv, nir = {}, {}
  for name in names:
    igbp = _read(s12.sensor_path(synthetic_root, name, "lc"), 1)
    s1, b08 = (
      _read(s12.sensor_path(synthetic_root, name, "s1"), 1),
      _read(s12.sensor_path(synthetic_root, name, "s2"), 8),
    )
    for value in np.unique(igbp):
      vv.setdefault(int(value), []).append(s1[igbp == value])
      nir.setdefault(int(value), []).append(b08[igbp == value])
  median = lambda d, c: float(np.median(np.concatenate(d[c])))
  vegetation = [c for c in (1, 2, 4, 5, 8, 12, 14) if c in vv]
  assert {17, 13} <= set(vv) and vegetation, f"the seed-0 test set should hold water, urban, vegetation: {sorted(vv)}"
  for c in vegetation:
    assert median(vv, 17) + 6 < median(vv, c) < median(vv, 13) - 3
    assert median(nir, 17) * 5 < median(nir, c)


# ---------------------------------------------------------------- a hand-made patch
# Three LC patches of 16 x 16 = 256 pixels with known IGBP counts.
LC_COUNTS = {
  1: {1: 64, 4: 38, 12: 50, 14: 30, 13: 26, 10: 24, 17: 24},
  2: {1: 90, 12: 86, 14: 80},  # 17 classes: evergreen needleleaf wins; 10 classes: croplands (12 + 14) win
  3: {17: 128, 10: 128},  # a tie
}
HAND = 16


def _write_hand_patch(root, patch, s1=None):
  name = f"ROIs1868_summer_s2_7_p{patch}.tif"
  kwargs = dict(crs="EPSG:32632", transform=Affine(10.0, 0, 500000.0, 0, -10.0, 5200000.0))
  for sensor in ("s1", "s2", "lc"):
    os.makedirs(os.path.dirname(s12.sensor_path(root, name, sensor)), exist_ok=True)
  s2 = (np.arange(1, 14, dtype=np.uint16)[:, None, None] * 100 + np.arange(HAND * HAND).reshape(HAND, HAND)).astype(
    np.uint16
  )
  write_geotiff(s12.sensor_path(root, name, "s2"), s2, **kwargs)
  if s1 is None:
    s1 = np.stack([np.full((HAND, HAND), -10.0), np.full((HAND, HAND), -20.0)]).astype(np.float32)
  write_geotiff(s12.sensor_path(root, name, "s1"), s1, **kwargs)
  igbp = np.concatenate([np.full(n, value) for value, n in LC_COUNTS[patch].items()]).reshape(HAND, HAND)
  write_geotiff(s12.sensor_path(root, name, "lc"), np.stack([igbp] * 4).astype(np.uint16), **kwargs)
  return name


@pytest.fixture
def hand_root(tmp_path):
  root = str(tmp_path / "SEN12MS")
  s1 = np.stack([np.full((HAND, HAND), -10.0), np.full((HAND, HAND), -20.0)]).astype(np.float32)
  s1[0, 0, :3] = (np.nan, np.inf, -np.inf)
  s1[1, 5, 5] = np.nan
  s1[0, 1, 0], s1[1, 1, 1] = 3.0, -40.0  # outside the seed's clip range
  names = [_write_hand_patch(root, 1, s1), _write_hand_patch(root, 2), _write_hand_patch(root, 3)]
  with open(os.path.join(root, "train_list.txt"), "w") as f:
    f.write("\n".join(names) + "\n\n")
  with open(os.path.join(root, "test_list.pkl"), "wb") as f:
    pickle.dump([np.str_(n) for n in names], f)
  return root


def _hand_source(root, **kwargs):
  return s12.Sen12msSource(root, "test", patch_size=HAND, **kwargs)


def test_reader_yields_raw_units_in_band_set_order(hand_root):
  expected_dn = lambda band: 100 * (s12.S2_BANDS.index(band) + 1) + np.arange(HAND * HAND).reshape(HAND, HAND)
  for sensor, bands in (
    ("s2", ["B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B11", "B12"]),
    ("s2_all", list(s12.S2_BANDS)),
    ("rgb", ["B02", "B03", "B04"]),  # the seed's S2_BANDS_RGB = file bands 2, 3, 4
    ("B04,B03,B02", ["B04", "B03", "B02"]),
  ):
    source = _hand_source(hand_root, sensor=sensor)
    image = source[1]["image"]
    assert source.bands == tuple(bands) and image.shape == (HAND, HAND, len(bands)) and image.dtype == np.float32
    for k, band in enumerate(bands):
      np.testing.assert_array_equal(image[..., k], expected_dn(band))
  sample = _hand_source(hand_root, sensor="s1s2")[0]  # patch 1 (names are sorted): the one with bad S1 values
  assert sample["image"].shape == (HAND, HAND, 12)
  np.testing.assert_array_equal(sample["image"][..., 0], expected_dn("B02"))
  vv, vh = sample["image"][..., 10], sample["image"][..., 11]
  assert sample["num_cleaned"] == 4 and sample["num_cleaned"].dtype == np.int32  # nan, +inf, -inf, nan
  assert vv[0, 0] == vv[0, 1] == vv[0, 2] == vh[5, 5] == -25.0  # data.s1_nan_value
  assert vv[1, 0] == 0.0 and vh[1, 1] == -25.0  # clipped to [-25, 0] dB like the seed
  assert vv[2, 2] == -10.0 and vh[2, 2] == -20.0
  custom = _hand_source(hand_root, sensor="s1", s1_nan_value=-18.0)[0]["image"]
  assert custom[0, 0, 0] == custom[0, 1, 0] == custom[5, 5, 1] == -18.0
  assert _hand_source(hand_root, sensor="s2")[0]["num_cleaned"] == 0  # S1 not read


def test_labels_from_the_lc_patch_against_hand_computed_values(hand_root):
  def labels(**kwargs):
    source = _hand_source(hand_root, **kwargs)
    return [source[i]["labels"] for i in range(3)], source

  # patch 1 fractions (of 256): 17 classes {0: .25, 3: .148, 11: .195, 13: .117, 12: .102, 9: .094, 16: .094};
  # 10 classes {forest .398, croplands .3125, urban .102, grassland .094, water .094}.
  multi17, source = labels(label_type="multi", label_scheme=17)
  assert source.label_kind == "multilabel" and source.class_names[0] == "Evergreen Needleleaf Forests"
  assert np.flatnonzero(multi17[0]).tolist() == [0, 3, 11, 12, 13] and multi17[0].dtype == np.float32
  multi10, source = labels(label_type="multi", label_scheme=10)
  assert len(source.class_names) == 10 and multi10[0].shape == (10,)
  assert np.flatnonzero(multi10[0]).tolist() == [0, 5, 6]
  assert np.flatnonzero(labels(threshold=0.3)[0][0]).tolist() == [0, 5]
  assert np.flatnonzero(labels(threshold=24 / 256)[0][0]).tolist() == [0, 3, 5, 6, 9]  # >=: equal counts in
  fractions = _hand_source(hand_root, label_scheme=10)[0]["label_fractions"]
  np.testing.assert_allclose(fractions, np.asarray([102, 0, 0, 24, 0, 80, 26, 0, 0, 24]) / 256)
  single17, source = labels(label_type="single", label_scheme=17)
  assert source.label_kind == "single" and [int(x) for x in single17] == [0, 0, 9]  # tie 10 vs 17 -> grasslands
  assert single17[0].dtype == np.int32 and single17[0].shape == ()
  single10, _ = labels(label_type="single", label_scheme=10)
  assert [int(x) for x in single10] == [0, 5, 3]  # patch 2: croplands + mosaic; tie grassland vs water -> lower


def test_pair_sensors_and_the_grain_pipeline(synthetic_root):
  source = build_source(_config(os.path.dirname(synthetic_root), pair_sensors=True, sensor="rgb"), "train")
  sample = source[0]
  assert sample["image"].shape == (SIZE, SIZE, 3)
  assert sample["s1"].shape == (SIZE, SIZE, 2) and sample["s2"].shape == (SIZE, SIZE, 10)
  assert all(sample[k].dtype == np.float32 for k in ("image", "s1", "s2"))
  np.testing.assert_array_equal(sample["image"], sample["s2"][..., :3])  # B02, B03, B04 of the same read
  assert set(source.norm_stats) == {"image", "s1", "s2"}
  restored = pickle.loads(pickle.dumps(source))  # what grain does to send it to worker processes
  np.testing.assert_array_equal(restored[3]["s1"], source[3]["s1"])
  dataset = make_iter_dataset(
    source, batch_size_per_process=4, seed=0, num_epochs=1, shuffle=False, drop_remainder=True, read_threads=0
  )
  batch = next(iter(dataset))
  assert batch["s2"].shape == (4, SIZE, SIZE, 10) and batch["num_cleaned"].shape == (4,)
  assert batch["labels"].shape == (4, 10)


# ---------------------------------------------------------------- split lists
def _names(n):
  return [f"ROIs1970_fall_s2_{3 + i % 2}_p{i}.tif" for i in range(n)]


def test_lists_txt_pkl_and_the_seed_80_20_split(tmp_path):
  root = tmp_path / "SEN12MS"
  (root / "ROIs1970_fall").mkdir(parents=True)
  names = _names(11) + [s12.KNOWN_BROKEN[0]]  # 12 entries: int(0.8 * 12) = 9 train, 3 validation
  with open(root / "train_list.pkl", "wb") as f:
    pickle.dump([np.str_(n) for n in names], f)
  with open(root / "test_list.txt", "w") as f:
    f.write("\n".join(f"data/sen12ms/data/ROIs1970_fall/s2_3/{n}" for n in names[:3]))  # OpenSelfSup-style paths
  split = lambda s, **kw: s12.split_names(str(root), s, **kw)[0]
  assert split("train") == sorted(names[:9])
  assert split("validation") == sorted(names[9:11])  # the broken patch is dropped after splitting, as the seed
  assert split("test") == sorted(names[:3])
  assert split("validation", val_fraction=0.5) == sorted(names[6:11])
  # numpy < 2 writes numpy.core (not numpy._core) into protocol-2 pickles, as the seed's lists have it
  old = pickle.dumps([np.str_(n) for n in names[:5]], protocol=2).replace(
    b"numpy._core.multiarray", b"numpy.core.multiarray"
  )
  assert b"numpy.core.multiarray" in old
  (tmp_path / "old.pkl").write_bytes(old)
  (tmp_path / "tuple.pkl").write_bytes(pickle.dumps(tuple(names[:2])))
  (tmp_path / "val.txt").write_text("\n".join(names[:2]))
  assert s12.read_name_list(tmp_path / "old.pkl") == names[:5]
  assert s12.read_name_list(tmp_path / "tuple.pkl") == names[:2]
  assert split("train", val_list=str(tmp_path / "val.txt")) == sorted(names[:11])
  assert split("validation", val_list=str(tmp_path / "val.txt")) == sorted(names[:2])
  # a list file given in the config wins over the one in root
  assert split("train", train_list=str(tmp_path / "old.pkl"), val_fraction=0.0) == sorted(names[:5])


def test_malicious_pickle_is_refused_without_running(tmp_path):
  marker = tmp_path / "pwned"

  class Payload:
    def __reduce__(self):
      return (os.system, (f"touch {marker}",))

  evil = tmp_path / "train_list.pkl"
  evil.write_bytes(pickle.dumps([np.str_("ROIs1158_spring_s2_1_p1.tif"), Payload()]))
  with pytest.raises(UnsafeListError, match=r"refusing global '(posix|os|nt)\.system' in list file .*train_list"):
    s12.read_name_list(evil)
  disguised = tmp_path / "train_list.txt"  # read by what it is, not by its name
  disguised.write_bytes(evil.read_bytes())
  with pytest.raises(UnsafeListError):
    s12.read_name_list(disguised)
  disguised.unlink()
  (tmp_path / "ROIs1158_spring").mkdir()
  with pytest.raises(UnsafeListError):
    s12.Sen12msSource(tmp_path, "train")
  assert not marker.exists()
  # numpy scalars that are not strings, and dtypes that are not string dtypes, are refused as well
  (tmp_path / "floats.pkl").write_bytes(pickle.dumps([np.float64(1.0)]))
  with pytest.raises(UnsafeListError, match="numpy dtype 'f8'"):
    s12.read_name_list(tmp_path / "floats.pkl")
  (tmp_path / "dict.pkl").write_bytes(pickle.dumps({"a": 1}))
  with pytest.raises(ValueError, match="dict.pkl: expected a pickled list"):
    s12.read_name_list(tmp_path / "dict.pkl")
  (tmp_path / "s1.txt").write_text("ROIs1158_spring_s1_1_p1.tif\n")
  with pytest.raises(ValueError, match=r"s1.txt: entry 0 'ROIs1158_spring_s1_1_p1.tif' is not a SEN12MS S2"):
    s12.read_name_list(tmp_path / "s1.txt")
  # the proof that the test means something: plain pickle runs the payload
  with open(evil, "rb") as f:
    pickle.load(f)
  assert marker.exists()


# ---------------------------------------------------------------- bad files
def test_bad_files_are_named(synthetic_root, tmp_path):
  root = str(tmp_path / "copy")
  shutil.copytree(synthetic_root, root)
  source = s12.Sen12msSource(root, "test", sensor="s1s2", patch_size=SIZE)
  s2 = s12.sensor_path(root, source.names[0], "s2")
  with open(s2, "r+b") as f:
    f.truncate(os.path.getsize(s2) // 2)
  with pytest.raises(BadSampleError, match="truncated or corrupt") as e:
    source[0]
  assert e.value.path == s2
  s1 = s12.sensor_path(root, source.names[1], "s1")
  os.remove(s1)
  with pytest.raises(BadSampleError, match="missing S1 sigma0 dB file") as e:
    source[1]
  assert e.value.path == s1
  assert s12.Sen12msSource(root, "test", sensor="s2", patch_size=SIZE)[1]["image"].shape == (SIZE, SIZE, 10)
  kwargs = dict(crs="EPSG:32632", transform=Affine(80.0, 0, 0, 0, -80.0, 0))
  lc = s12.sensor_path(root, source.names[2], "lc")
  write_geotiff(lc, np.ones((3, SIZE, SIZE), np.uint16), **kwargs)
  with pytest.raises(BadSampleError, match="has 3 bands, expected 4") as e:
    source[2]
  assert e.value.path == lc
  write_geotiff(lc, np.full((4, SIZE, SIZE), 255, np.uint16), **kwargs)
  with pytest.raises(BadSampleError, match=r"1024 pixels with values \[255\] outside 1..17"):
    source[2]
  s2_small = s12.sensor_path(root, source.names[3], "s2")
  write_geotiff(s2_small, np.ones((13, 16, 16), np.uint16), **kwargs)
  with pytest.raises(BadSampleError, match="wrong size 16x16, expected 32x32"):
    source[3]
  write_geotiff(s2_small, np.ones((13, SIZE, SIZE), np.float32), **kwargs)
  with pytest.raises(BadSampleError, match="wrong dtype float32, expected uint16"):
    source[3]
  os.remove(s12.sensor_path(root, source.names[3], "s1"))
  assert len(source.problems(3)) == 2 and source.problems(4) == []
  with pytest.raises(FileNotFoundError, match="season folder"):
    s12.Sen12msSource(str(tmp_path), "test", test_list=os.path.join(root, "test_list.txt"))


def test_config_errors_name_the_field(synthetic_root, tmp_path):
  directory = os.path.dirname(synthetic_root)
  for field, value, message in (
    ("label_type", "multi_label", "data.label_type"),
    ("label_scheme", 19, "data.label_scheme"),
    ("sensor", "B02,B13", r"data.sensor.*unknown: \['B13'\]"),
    ("threshold", 0.0, "data.threshold"),
  ):
    with pytest.raises(ValueError, match=message):
      build_source(_config(directory, **{field: value}), "train")
  with pytest.raises(FileNotFoundError, match="no train_list for SEN12MS"):
    s12.Sen12msSource(tmp_path, "train")
  with pytest.raises(FileNotFoundError, match="data.root"):
    build_source(_config(directory, root=str(tmp_path / "nowhere")), "train")


def test_norm_stats_are_the_seed_constants(synthetic_root):
  directory = os.path.dirname(synthetic_root)
  stats = lambda sensor, **kw: build_source(_config(directory, sensor=sensor, **kw), "train").norm_stats

  def same(actual, expected):
    np.testing.assert_array_equal(np.asarray(actual[0]), np.float64(expected[0]))
    np.testing.assert_array_equal(np.asarray(actual[1]), np.float64(expected[1]))

  same(stats("s2")["image"], SEED_S2)
  same(stats("s1")["image"], SEED_S1)
  same(stats("s1s2")["image"], (SEED_S2[0] + SEED_S1[0], SEED_S2[1] + SEED_S1[1]))  # the seed's 12-channel case
  same(stats("rgb")["image"], (SEED_S2[0][:3], SEED_S2[1][:3]))  # the seed's 3-channel case
  all13 = stats("s2_all")["image"]
  same((all13[0][1:9] + all13[0][11:], all13[1][1:9] + all13[1][11:]), SEED_S2)
  assert all13[0][0] == pytest.approx(1605.575) and all13[0][10] == pytest.approx(22.1035)  # SSL4EO-S12 L1C
  pair = stats("s2", pair_sensors=True)
  same(pair["s1"], SEED_S1)
  same(pair["s2"], SEED_S2)
