import pytest
import torch

from conversion.calibration import calibration_batches, calibration_files
from conversion.verify import image_files
from model.config import preset
from model.errors import UserError
from model.preprocess import load_image, preprocess


@pytest.fixture
def config():
    return preset("refinedet320_vgg16", input_size=64, class_names=("a",))


def test_full_batches_preprocessed_like_serving(image_dir, config):
    files = image_files(image_dir)  # 5 images
    batches = list(calibration_batches(files, config, batch_size=2))
    assert len(batches) == 2  # the fifth image would make a partial batch: dropped
    assert all(b.shape == (2, 3, 64, 64) and b.dtype == torch.float32 and b.is_contiguous() for b in batches)
    want = preprocess([load_image(f) for f in files[2:4]], 64, config.normalization)
    torch.testing.assert_close(batches[1], want)
    assert float(batches[0].mean()) < 50  # mean-subtracted BGR, not raw 0-255 pixels


def test_max_batches(image_dir, config):
    assert len(list(calibration_batches(image_files(image_dir), config, batch_size=1, max_batches=3))) == 3


def test_too_few_images(image_dir, config):
    with pytest.raises(UserError, match="at least 8 images, found 5"):
        next(calibration_batches(image_files(image_dir), config, batch_size=8))
    with pytest.raises(UserError, match="batch size must be >= 1"):
        next(calibration_batches(image_files(image_dir), config, batch_size=0))


def write_voc_root(root, train=("a", "b", "c"), test=("d",)):
    (root / "ImageSets" / "Main").mkdir(parents=True)
    (root / "JPEGImages").mkdir()
    for image_id in (*train, *test):
        (root / "JPEGImages" / f"{image_id}.jpg").write_bytes(b"not decoded here")
    (root / "ImageSets" / "Main" / "train.txt").write_text("\n".join(train) + "\n")
    (root / "ImageSets" / "Main" / "test.txt").write_text("\n".join(test) + "\n")
    return root


def test_calibration_files_of_a_voc_split(tmp_path):
    root = write_voc_root(tmp_path / "voc")
    assert [f.name for f in calibration_files(root)] == ["a.jpg", "b.jpg", "c.jpg"]  # train by default
    assert [f.name for f in calibration_files(root, "test")] == ["d.jpg"]
    with pytest.raises(UserError, match=r"without the split ImageSets/Main/val\.txt"):
        calibration_files(root, "val")
    (root / "ImageSets" / "Main" / "train.txt").write_text("a\nmissing\n")
    with pytest.raises(UserError, match="no image for id 'missing'"):
        calibration_files(root)


def test_calibration_files_of_a_folder_are_thinned_evenly(image_dir, tmp_path):
    files = image_files(image_dir)  # img00 .. img04
    assert calibration_files(image_dir) == files
    assert calibration_files(image_dir, max_images=2) == [files[0], files[2]]
    with pytest.raises(UserError, match="not a folder of images or a VOC-layout root"):
        calibration_files(tmp_path / "nowhere")
    with pytest.raises(UserError, match="--calibration-max-images must be >= 1"):
        calibration_files(image_dir, max_images=0)


@pytest.mark.tensorrt
def test_calibrator_feeds_device_batches_and_writes_its_cache(image_dir, config, tmp_path):
    import tensorrt as trt

    from conversion.calibration import make_calibrator

    batches = calibration_batches(image_files(image_dir), config, batch_size=2)
    cache = tmp_path / "calib.cache"
    calibrator = make_calibrator(trt, batches, 2, cache)
    assert calibrator.get_batch_size() == 2 and calibrator.read_calibration_cache() is None
    pointers = [
        calibrator.get_batch(["images"]),
        calibrator.get_batch(["images"]),
        calibrator.get_batch(["images"]),
    ]
    assert pointers[0] and pointers[1] and pointers[2] is None
    calibrator.write_calibration_cache(b"cache")
    assert cache.read_bytes() == b"cache" and calibrator.read_calibration_cache() == b"cache"
