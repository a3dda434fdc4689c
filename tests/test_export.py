"""`python -m anomaly.export`: one ONNX graph that predicts as the checkpoint it came from."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import onnxruntime
import pytest
import torch

from anomaly import export
from anomaly.bench import model_config
from anomaly.errors import AnomalyError
from anomaly.pipeline import ImagePipeline
from anomaly.predict import main as predict_main
from anomaly.tasks import build_detector, load_detector
from tests.conftest import SHARED_DTD, SHARED_MVTEC
from tests.test_predict import read_rows, write_odd_images
from tests.test_train import run

TOLERANCE = export.PARITY_TOLERANCE


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    """The tiny run's checkpoint exported by the command: (checkpoint, graph, command output)."""
    _, best, _ = trained
    path = tmp_path_factory.mktemp("export") / "model.onnx"
    done = subprocess.run(
        [sys.executable, "-m", "anomaly.export", f"ckpt_path={best}", f"output={path}"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return best, path, done.stdout


def assert_same_outputs(pipeline: ImagePipeline, session, images: np.ndarray) -> None:
    """onnxruntime's outputs on uint8 images equal PyTorch's within the export's tolerances."""
    with torch.inference_mode():
        maps, scores, _, anomalous = (o.numpy() for o in pipeline(torch.from_numpy(images)))
    got = session.run(list(export.OUTPUT_NAMES), {export.INPUT_NAME: images})
    assert got[0].shape == maps.shape and got[0].dtype == np.float32
    np.testing.assert_allclose(got[0], maps, rtol=0, atol=TOLERANCE)
    allowed = export.score_tolerance(pipeline.detector)
    np.testing.assert_allclose(got[1], scores, rtol=0, atol=allowed)
    # The graph normalizes its own scores exactly as the detector does.
    normalized = pipeline.detector.normalized_score(torch.from_numpy(got[1])).numpy()
    np.testing.assert_allclose(got[2], normalized, rtol=1e-12, atol=0)
    assert got[3].dtype == bool and (got[3] == anomalous).all()


def test_residual_ae_graph_matches_pytorch_at_any_batch_and_image_size(tmp_path):
    torch.manual_seed(0)
    detector = build_detector(model_config("residual_ae")).eval()
    detector.set_normal_statistics(torch.rand(32, 32) * 0.1, torch.rand(32, 32) * 0.1 + 0.05)
    assert detector.normalize_levels  # the graph matches each image's levels too
    detector.set_reference_levels(0.45, 0.2)
    pipeline = ImagePipeline(detector, (32, 32))
    with torch.inference_mode():
        check = pipeline(export.check_batch((32, 32)))[1]
    detector.set_threshold(float(check.mean()), float(check.min()) - 1)  # verdicts of both kinds
    path = tmp_path / "residual.onnx"
    properties = export.metadata(pipeline, "residual_ae", "x")
    map_difference, score_difference = export.export_onnx(pipeline, path, properties)
    assert 0 <= map_difference <= TOLERANCE
    assert 0 <= score_difference <= export.score_tolerance(detector)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    for shape in [(1, 32, 32, 3), (3, 64, 64, 3), (2, 45, 71, 3), (1, 20, 24, 3)]:
        assert_same_outputs(pipeline, session, rng.integers(0, 256, shape, dtype=np.uint8))
    metadata = session.get_modelmeta().custom_metadata_map
    assert metadata["image_size"] == "32,32" and metadata["model"] == "residual_ae"
    assert float(metadata["threshold"]) == float(detector.threshold)


def test_the_command_writes_a_graph_with_the_checkpoints_threshold(exported):
    best, path, stdout = exported
    assert f"wrote {path}: sdc_ccm at 32x32 px, threshold" in stdout
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    metadata = {p.key: p.value for p in model.metadata_props}
    checkpoint = torch.load(best, map_location="cpu", weights_only=True)["state_dict"]
    assert float(metadata["threshold"]) == float(checkpoint["detector.threshold"])
    assert float(metadata["normal_median"]) == float(checkpoint["detector.normal_median"])
    assert metadata["image_size"] == "32,32" and metadata["checkpoint"] == best.name
    assert "uint8" in metadata["input"] and "uint8" in model.doc_string
    assert [i.name for i in model.graph.input] == ["images"]
    assert [o.name for o in model.graph.output] == list(export.OUTPUT_NAMES)
    assert not list(path.parent.glob("*.tmp")) and not list(path.parent.glob("*.data"))


def test_sdc_ccm_graph_matches_pytorch_at_any_batch_and_image_size(exported):
    best, path, _ = exported
    detector, config = load_detector(best)
    detector.net.to(memory_format=torch.channels_last)  # as predict and training run it
    pipeline = ImagePipeline(detector, (config["data"]["image_size"],) * 2)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(1)
    for shape in [(1, 32, 32, 3), (4, 64, 64, 3), (2, 33, 50, 3)]:
        assert_same_outputs(pipeline, session, rng.integers(0, 256, shape, dtype=np.uint8))


def test_predict_through_onnxruntime_gives_the_checkpoints_predictions(exported, trained, tmp_path):
    best, path, _ = exported
    category = trained[2]
    for name, model in (("ckpt", best), ("onnx", path)):
        output = tmp_path / name
        arguments = [f"ckpt_path={model}", f"input={category / 'test'}", f"output={output}"]
        assert predict_main([*arguments, "heatmaps=false"]) == 0
    from_ckpt = {row["path"]: row for row in read_rows(tmp_path / "ckpt" / "predictions.csv")}
    from_onnx = read_rows(tmp_path / "onnx" / "predictions.csv")
    assert len(from_onnx) == len(from_ckpt) == 132
    allowed = export.score_tolerance(load_detector(best)[0])
    for row in from_onnx:
        expected = from_ckpt[row["path"]]
        assert abs(float(row["score"]) - float(expected["score"])) <= allowed
        assert row["verdict"] == expected["verdict"]


def test_predict_through_onnxruntime_reads_any_mode_and_reports_broken_files(
    exported, tmp_path, capsys
):
    _, path, _ = exported
    sizes = write_odd_images(tmp_path / "in")
    status = predict_main(
        [f"ckpt_path={path}", f"input={tmp_path / 'in'}", f"output={tmp_path / 'out'}"]
    )
    assert status == 1 and "2 of 7 files could not be read" in capsys.readouterr().err
    assert len(read_rows(tmp_path / "out" / "predictions.csv")) == len(sizes)
    heatmaps = sorted(p.name for p in (tmp_path / "out" / "heatmaps").iterdir())
    assert heatmaps == sorted(name.replace("/", "__").rsplit(".", 1)[0] + ".png" for name in sizes)


def test_the_graph_runs_with_onnxruntime_alone(exported):
    _, path, _ = exported
    script = (
        "import sys, numpy, onnxruntime\n"
        f"session = onnxruntime.InferenceSession({str(path)!r})\n"
        "images = numpy.zeros((2, 40, 40, 3), numpy.uint8)\n"
        "maps, scores, normalized, anomalous = session.run(None, {'images': images})\n"
        "assert maps.shape == (2, 32, 32) and scores.shape == (2,)\n"
        "assert 'torch' not in sys.modules and 'anomaly' not in sys.modules\n"
        "print('ok')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def identity_graph(path) -> None:
    """A valid ONNX file that is no export of this project."""
    node = onnx.helper.make_node("Identity", ["x"], ["y"])
    value = onnx.helper.make_tensor_value_info
    inputs = [value("x", onnx.TensorProto.FLOAT, [1])]
    outputs = [value("y", onnx.TensorProto.FLOAT, [1])]
    graph = onnx.helper.make_graph([node], "g", inputs, outputs)
    onnx.save(onnx.helper.make_model(graph), str(path))


def test_a_graph_that_disagrees_with_pytorch_is_not_written(tmp_path, monkeypatch):
    pipeline = ImagePipeline(build_detector(model_config("residual_ae")).eval(), (32, 32))
    # Stand-ins for the slow exporter and for a graph that computes something else.
    monkeypatch.setattr(torch.onnx, "export", lambda model, args, path, **_: identity_graph(path))
    monkeypatch.setattr(export, "differences", lambda *_: (0.5, 0.0))
    path = tmp_path / "model.onnx"
    path.write_bytes(b"an older export")
    with pytest.raises(AnomalyError, match=r"model.onnx: .* maps differ from PyTorch's by 0.5"):
        export.export_onnx(pipeline, path, export.metadata(pipeline, "residual_ae", "x"))
    assert path.read_bytes() == b"an older export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_a_model_the_exporter_cannot_handle_is_one_line(exported, tmp_path, monkeypatch, capsys):
    best, _, _ = exported

    def refuse(*_, **__):
        raise RuntimeError("Unsupported operator: aten::something\nwith a long trace")

    monkeypatch.setattr(torch.onnx, "export", refuse)
    assert export.main([f"ckpt_path={best}", f"output={tmp_path / 'model.onnx'}"]) == 1
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 1, errors
    assert "model.onnx: torch.onnx.export cannot export this model" in errors[0]
    assert "Unsupported operator: aten::something" in errors[0]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["output=a.onnx"], "missing ckpt_path"),
        (["ckpt_path=a.ckpt", "output=a.onnx", "format=tflite"], "format='tflite'"),
        (["ckpt_path=a.ckpt", "output=/nowhere/a.onnx"], "folder /nowhere does not exist"),
        (["ckpt_path=/nowhere.ckpt", "output=a.onnx"], "/nowhere.ckpt"),
    ],
)
def test_bad_export_arguments_are_one_line(arguments, message, capsys):
    assert export.main(arguments) == 1
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith("error: ") and message in errors[0]


def test_predict_refuses_a_broken_or_foreign_onnx_file(tmp_path, capsys):
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a protobuf")
    foreign = tmp_path / "foreign.onnx"
    identity_graph(foreign)
    for path, message in [
        (broken, "broken.onnx: not a readable ONNX model"),
        (foreign, "foreign.onnx: not a graph of python -m anomaly.export"),
        (tmp_path / "missing.onnx", "missing.onnx: no such file"),
    ]:
        status = predict_main(
            [f"ckpt_path={path}", f"input={tmp_path}", f"output={tmp_path / 'o'}"]
        )
        errors = capsys.readouterr().err.strip().splitlines()
        assert status == 1 and len(errors) == 1 and message in errors[0], errors


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED_MVTEC / "capsule").is_dir(), reason="shared capsule data absent")
@pytest.mark.parametrize("model", ["residual_ae", "sdc_ccm"])
def test_on_the_capsule_test_split_the_graph_gives_the_checkpoints_verdicts(model, tmp_path):
    """Both runtimes through `anomaly.predict` on real 256 px images, the model at 128 px."""
    run_dir = tmp_path / "run"
    settings = [
        f"model={model}",
        "data=mvtec",
        f"data.root={SHARED_MVTEC}",
        f"data.dtd_root={SHARED_DTD}",
        "data.category=capsule",
        "data.image_size=128",
        "data.batch_size=8",
        "trainer.max_epochs=2",
        "trainer.limit_train_batches=4",
        "test=false",
        f"hydra.run.dir={run_dir}",
    ]
    done = run("train.py", *settings)
    assert done.returncode == 0, done.stderr[-3000:]
    best = next((run_dir / "checkpoints").glob("epoch_*.ckpt"))
    graph = tmp_path / "model.onnx"
    assert export.main([f"ckpt_path={best}", f"output={graph}"]) == 0
    rows = {}
    for name, path in (("ckpt", best), ("onnx", graph)):
        output = tmp_path / name
        test_split = SHARED_MVTEC / "capsule" / "test"
        arguments = [f"ckpt_path={path}", f"input={test_split}", f"output={output}"]
        assert predict_main([*arguments, "heatmaps=false"]) == 0
        rows[name] = {row["path"]: row for row in read_rows(output / "predictions.csv")}
    assert len(rows["onnx"]) == len(rows["ckpt"]) == 132
    allowed = export.score_tolerance(load_detector(best)[0])
    for path, row in rows["onnx"].items():
        expected = rows["ckpt"][path]
        assert row["verdict"] == expected["verdict"] and row["verdict"] != "uncalibrated"
        assert abs(float(row["score"]) - float(expected["score"])) <= allowed
