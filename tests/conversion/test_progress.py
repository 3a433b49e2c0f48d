"""conversion.progress and the calibration reader's reports: what `export onnx --int8` shows while it works."""

from __future__ import annotations

from conversion.progress import StageProgress
from conversion.quantize import ImageReader
from conversion.verify import image_files
from model.config import preset


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, object]] = []

    def stage(self, text: str) -> None:
        self.events.append(("stage", text))

    def images(self, count: int) -> None:
        self.events.append(("images", count))


def test_the_reader_reports_every_image_and_the_end_of_calibration(image_dir):
    recorder = Recorder()
    config = preset("refinedet320_vgg16", input_size=64, class_names=("a", "b"))
    reader = ImageReader(image_files(image_dir), config, 2, "images", recorder)  # type: ignore[arg-type]
    assert len(reader) == 2  # 5 images in batches of 2: the partial batch is left out
    for start in range(len(reader)):  # as quantize_static reads in strides of one batch
        reader.set_range(start, start + 1)
        while reader.get_next() is not None:
            pass
    assert reader.get_next() is None  # asked again after the end: reported once only
    end = ("stage", "choosing the activation ranges and quantizing")
    assert recorder.events == [("images", 2), ("images", 2), end]


def test_stage_progress_prints_stages_and_a_bar_on_stderr(capsys):
    with StageProgress("export onnx", total_images=3) as progress:
        progress.stage("calibrating")
        progress.images(2)
        progress.images(1)
        progress.stage("quantizing")
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err
    assert (
        lines.index("export onnx: calibrating (")
        < lines.index("3/3 [")
        < lines.index("export onnx: quantizing (")
    )
    assert progress.done == 3
    with StageProgress("export onnx", total_images=3, enabled=False) as silent:
        silent.stage("calibrating")
        silent.images(3)
    assert capsys.readouterr().err == "" and silent.done == 3
