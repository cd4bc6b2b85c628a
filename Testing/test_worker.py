"""The engine in a worker process (``HSAMLib.worker``), against real ``python -m hsam`` processes:
progress stream, cancel, a killed worker, bad input, the device probe, and the MRML round trip."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from hsam.inference.segment import segment_volume
from hsam.models.build import build_hsam
from hsam.models.bundle import BundleMetadata, read_bundle_metadata, save_bundle
from hsam.volumes.preprocess import IntensityPreprocessing
from hsam.volumes.segmentation import Segment
from hsam.volumes.volume import Volume, write_volume
from phantom import phantom_arrays

from HSAMLib import devices
from HSAMLib.worker import CANCELLED, FAILED, SUCCEEDED, WorkerJob

CLASSES = [
    Segment("ellipsoid", 3, (0.9, 0.3, 0.2), "Segmentation category and type - 3D Slicer General Anatomy list~SCT^123037004^Anatomical Structure~SCT^10200004^Liver~^^~Anatomic codes - DICOM master list~^^~^^"),
    Segment("sphere", 5, (0.2, 0.6, 0.9), None),
]
CANCEL_LIMIT_SECONDS = 2.0
ROOT = Path(__file__).resolve().parent.parent
WAIT_LIMIT_SECONDS = 600  # only a guard against a hung worker: the CPU may be shared


def phantom_volume(depth: int) -> tuple[Volume, np.ndarray]:
    image, labels = phantom_arrays((depth, 40, 48), label_values=[s.label_value for s in CLASSES])
    return Volume((image * 1000).astype(np.int16), (0.8, 0.7, 2.0), (-20.0, -15.0, -7.0)), labels


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """An untrained tiny model (224 px) for the two classes."""
    torch.manual_seed(0)
    metadata = BundleMetadata(
        preset="tiny", img_size=224, num_classes=2, class_names=[s.name for s in CLASSES],
        class_colors=[s.color for s in CLASSES], label_values=[s.label_value for s in CLASSES],
        preprocessing=IntensityPreprocessing(mode="percentile").to_dict(),
        terminology=[s.terminology for s in CLASSES],
    )
    path = tmp_path_factory.mktemp("model") / "tiny.hsam"
    return save_bundle(path, build_hsam("tiny", num_classes=2, img_size=224).eval(), metadata)


@pytest.fixture(scope="module")
def volume_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("volume") / "volume.nrrd"
    write_volume(path, phantom_volume(40)[0])
    return path


@pytest.fixture(autouse=True)
def no_job_left_behind(monkeypatch):
    """Every worker a test starts is ended and its folder removed, also when the test fails."""
    started = []
    start = WorkerJob.start

    def tracked_start(job, arguments):
        started.append(job)
        return start(job, arguments)

    monkeypatch.setattr(WorkerJob, "start", tracked_start)
    yield
    for job in started:
        job.cancel()


def segment_job(volume_file, bundle, output_folder, *options) -> WorkerJob:
    job = WorkerJob()
    return job.start(["segment", volume_file, "-m", bundle, "-o", output_folder / "result.seg.nrrd",
                      "--device", "cpu", "--progress", "json", *options])


def wait_for_event(job: WorkerJob, phase: str, timeout: float = WAIT_LIMIT_SECONDS) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for event in job.poll():
            if event.get("phase") == phase and event["fraction"] > 0:
                return event
        assert job.running, job.error
        time.sleep(0.02)
    raise AssertionError(f"no {phase} progress within {timeout} s")


def assert_gone(job: WorkerJob) -> None:
    assert job.process.poll() is not None
    if sys.platform != "win32":
        with pytest.raises(ProcessLookupError):
            os.killpg(job.process.pid, 0)  # no process of the worker's group is left
    assert not job.folder.exists()


def test_segment_progress_reaches_one_in_order_and_result_is_written(volume_file, bundle, tmp_path):
    job = segment_job(volume_file, bundle, tmp_path, "--slices", "10:17")
    events = []
    assert job.wait(timeout=WAIT_LIMIT_SECONDS, on_events=events.extend)

    assert job.state == SUCCEEDED and job.error is None
    fractions = [e["fraction"] for e in events]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert [e["phase"] for e in events][:2] == ["load", "segment"]
    assert any(e["phase"] == "segment" and 0 < e["fraction"] < 1 for e in events)
    assert events[-1]["event"] == "result" and job.result == events[-1]
    assert events[-1]["output"] == str(tmp_path / "result.seg.nrrd")
    assert (tmp_path / "result.seg.nrrd").is_file()
    job.cleanup()
    assert not job.folder.exists()


def test_cancel_while_segmenting_stops_within_two_seconds_and_leaves_nothing(volume_file, bundle, tmp_path):
    job_output = tmp_path / "out"
    job_output.mkdir()
    job = segment_job(volume_file, bundle, job_output)
    wait_for_event(job, "segment")

    started = time.monotonic()
    job.cancel()
    elapsed = time.monotonic() - started

    assert elapsed < CANCEL_LIMIT_SECONDS
    assert job.state == CANCELLED
    assert_gone(job)
    assert list(job_output.iterdir()) == []


def test_an_error_while_waiting_ends_the_worker(volume_file, bundle, tmp_path):
    job = segment_job(volume_file, bundle, tmp_path)

    def interrupted(events):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        job.wait(timeout=60, on_events=interrupted)
    assert job.state == CANCELLED
    assert_gone(job)
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def training_files(tmp_path_factory):
    from hsam.volumes.segmentation import write_segmentation

    folder = tmp_path_factory.mktemp("training")
    volume, labels = phantom_volume(8)
    write_volume(folder / "volume.nrrd", volume)
    write_segmentation(folder / "labels.seg.nrrd", labels, volume, CLASSES)
    return folder / "volume.nrrd", folder / "labels.seg.nrrd"


def finetune_job(training_files, output, *options) -> WorkerJob:
    volume, labels = training_files
    return WorkerJob().start(["finetune", volume, labels, "-o", output, "--img-size", "224", "--device", "cpu",
                              "--slices", "1,2,3,4,5,6", "--progress", "json", *options])


def test_finetune_reports_epochs_losses_and_reaches_one(training_files, tmp_path):
    job = finetune_job(training_files, tmp_path / "model.hsam", "--epochs", "2")
    events = []
    assert job.wait(timeout=WAIT_LIMIT_SECONDS, on_events=events.extend), "fine-tuning did not end"
    job.cleanup()

    assert job.state == SUCCEEDED, job.error
    training = [e for e in events if e["phase"] == "train" and e.get("loss") is not None]
    assert [e["epoch"] for e in training] == sorted(e["epoch"] for e in training) and len(training) >= 2
    assert all(np.isfinite(e["loss"]) for e in training)
    assert any(e["val_dice"] is not None for e in training)  # validation slice held out of 6
    fractions = [e["fraction"] for e in events]
    assert fractions == sorted(fractions) and events[-1]["fraction"] == 1.0 and events[-1]["event"] == "result"
    assert read_bundle_metadata(tmp_path / "model.hsam").class_names == ["ellipsoid", "sphere"]


def test_cancel_while_training_stops_within_two_seconds_and_leaves_nothing(training_files, tmp_path):
    job = finetune_job(training_files, tmp_path / "model.hsam", "--epochs", "1000")
    wait_for_event(job, "train")

    started = time.monotonic()
    job.cancel()

    assert time.monotonic() - started < CANCEL_LIMIT_SECONDS
    assert job.state == CANCELLED
    assert_gone(job)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_a_killed_worker_is_reported_as_failed(volume_file, bundle, tmp_path):
    job = segment_job(volume_file, bundle, tmp_path)
    wait_for_event(job, "segment")
    os.kill(job.process.pid, signal.SIGKILL)

    assert job.wait(timeout=10)
    assert job.state == FAILED
    assert "SIGKILL" in job.error and "memory" in job.error
    with pytest.raises(Exception, match="SIGKILL"):
        job.check()
    job.cleanup()


def test_bad_input_comes_back_as_the_cli_one_line_message(bundle, tmp_path):
    flat = tmp_path / "flat.nrrd"
    array = np.zeros((4, 20, 30), np.float32)
    array[1, 2, 3] = np.nan
    sitk.WriteImage(sitk.GetImageFromArray(array), str(flat))  # HSAM's own writer refuses NaN voxels
    job = segment_job(flat, bundle, tmp_path)
    assert job.wait(timeout=WAIT_LIMIT_SECONDS)
    cli = subprocess.run([sys.executable, "-m", "hsam", "segment", str(flat), "-m", str(bundle), "-o",
                          str(tmp_path / "x.seg.nrrd")], capture_output=True, encoding="utf-8", timeout=WAIT_LIMIT_SECONDS)

    assert job.state == FAILED and cli.returncode == job.process.returncode == 2
    assert f"hsam: error: {job.error}" == cli.stderr.strip()
    assert "NaN" in job.error and "Traceback" not in job.error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["flat.nrrd"]
    job.cleanup()


def test_a_crash_is_reported_with_its_last_line(tmp_path):
    job = WorkerJob()
    job.command = lambda arguments: [sys.executable, "-c", "import sys; sys.stderr.write('Traceback\\nMemoryError: boom\\n'); sys.exit(1)"]
    job.start([])
    assert job.wait(timeout=WAIT_LIMIT_SECONDS)
    assert job.state == FAILED and "(exit status 1)" in job.error and job.error.endswith("MemoryError: boom")
    job.cleanup()


# --- PythonSlicer: a launcher around the engine; Slicer itself going away ------------------------

# What CTK's launcher (PythonSlicer) does around python-real, as far as the worker can tell: no signal
# handling (SIGTERM kills it at once, its child goes on), and a child ended by a signal becomes exit
# status 1 (ctkAppLauncher.cpp, applicationFinished: CrashExit -> EXIT_FAILURE).
LAUNCHER = """
import subprocess, sys
code = subprocess.Popen(sys.argv[1:]).wait()
sys.exit(1 if code < 0 else code)
"""
ENGINE_PRINTS_ITS_PID = "import json, os, time; print(json.dumps({'pid': os.getpid()}), flush=True); time.sleep(600)"


def running(pid: int) -> bool:
    """True while ``pid`` runs (a zombie waiting to be reaped does not count)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = f"/proc/{pid}/stat"
    return not (os.path.exists(stat) and open(stat).read().rsplit(")", 1)[1].split()[0] == "Z")


def wait_until_gone(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while running(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not running(pid)


def launched_job(tmp_path, *engine) -> WorkerJob:
    """A job whose worker is the launcher above around ``engine`` (a command line)."""
    launcher = tmp_path / "launcher.py"
    launcher.write_text(LAUNCHER)
    job = WorkerJob()
    job.command = lambda arguments: [sys.executable, str(launcher), *engine]
    return job.start([])


def engine_pid(job: WorkerJob) -> int:
    deadline = time.monotonic() + WAIT_LIMIT_SECONDS
    while time.monotonic() < deadline:
        for event in job.poll():
            return event["pid"]
        time.sleep(0.02)
    raise AssertionError(f"the engine did not start: {job.stderr_lines}")


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX process groups")
def test_cancel_reaches_an_engine_behind_a_launcher_that_does_not_forward_signals(tmp_path):
    """The engine is busy in native code (SIGTERM ignored): SIGTERM ends only the launcher, and the
    SIGKILL that follows must still reach the engine."""
    stuck = "import signal; signal.signal(signal.SIGTERM, signal.SIG_IGN); " + ENGINE_PRINTS_ITS_PID
    job = launched_job(tmp_path, sys.executable, "-c", stuck)
    pid = engine_pid(job)
    try:
        started = time.monotonic()
        job.cancel()

        assert time.monotonic() - started < CANCEL_LIMIT_SECONDS
        assert wait_until_gone(pid, 2.0), "the engine behind the launcher is still running"
        assert job.state == CANCELLED and not job.folder.exists()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_an_engine_killed_behind_the_launcher_is_reported_as_out_of_memory(tmp_path):
    job = launched_job(tmp_path, sys.executable, "-c", ENGINE_PRINTS_ITS_PID)
    os.kill(engine_pid(job), signal.SIGKILL)  # what the system does when memory runs out

    assert job.wait(timeout=10)
    assert job.state == FAILED and job.process.returncode == 1
    assert "exit status 1" in job.error and "memory" in job.error
    job.cleanup()


def test_the_engine_writes_its_own_exit_status_behind_the_launcher(tmp_path):
    from HSAMLib.worker import STATUS_FILE

    job = launched_job(tmp_path, sys.executable, "-m", "hsam", "segment", str(tmp_path / "missing.nrrd"),
                       "-m", str(tmp_path / "missing.hsam"), "-o", str(tmp_path / "out.seg.nrrd"))
    assert job.wait(timeout=WAIT_LIMIT_SECONDS)

    assert job.state == FAILED and (job.folder / STATUS_FILE).read_text() == "2"
    assert "not found" in job.error
    assert "memory" not in job.error
    job.cleanup()


SLICER_WITH_A_JOB = """
import json, sys, time
from HSAMLib.worker import WorkerJob
job = WorkerJob(name="hsam-test")
job.command = lambda arguments: [sys.executable, "-c", "from hsam.runtime.watchdog import watch_parent; watch_parent(0.1); "
                                 "import time; print('watching', flush=True); time.sleep(600)"]
job.start([])
print(json.dumps({"folder": str(job.folder), "worker": job.process.pid}), flush=True)
time.sleep(600)
"""


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_a_worker_ends_when_slicer_is_killed_and_the_next_job_removes_its_folder(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT / "HSAMSegment"))
    slicer = subprocess.Popen([sys.executable, "-c", SLICER_WITH_A_JOB], stdout=subprocess.PIPE, env=env, encoding="utf-8")
    started = json.loads(slicer.stdout.readline())
    live = WorkerJob(name="hsam-test")  # a job of a Slicer that is still running (this one)
    try:
        watching = Path(started["folder"]) / "worker-stdout.jsonl"
        deadline = time.monotonic() + WAIT_LIMIT_SECONDS
        while "watching" not in watching.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert running(started["worker"])
        slicer.kill()
        slicer.wait()

        assert wait_until_gone(started["worker"], 5.0), "the worker outlived Slicer"
        assert Path(started["folder"]).is_dir()
        WorkerJob(name="hsam-test").cleanup()  # the next start
        assert not Path(started["folder"]).exists() and live.folder.is_dir()
    finally:
        live.cleanup()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(started["worker"], signal.SIGKILL)


def test_python_m_hsam_ends_at_once_when_its_slicer_is_already_gone():
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    env = dict(os.environ, PYTHONPATH=str(ROOT / "HSAMSegment"), HSAM_PARENT_PID=str(gone.pid))
    result = subprocess.run([sys.executable, "-m", "hsam", "--version"], capture_output=True, encoding="utf-8", env=env,
                            timeout=WAIT_LIMIT_SECONDS)
    assert result.returncode == 143 and result.stdout == ""
    env.pop("HSAM_PARENT_PID")
    assert subprocess.run([sys.executable, "-m", "hsam", "--version"], capture_output=True, env=env).returncode == 0


def test_a_worker_that_cannot_start_leaves_no_folder(tmp_path):
    job = WorkerJob(python=str(tmp_path / "no-such-python"))
    with pytest.raises(OSError):
        job.start(["devices", "--json"])
    assert not job.folder.exists()


def test_device_probe_json_on_this_machine():
    job = devices.startProbe()
    assert job.wait(timeout=WAIT_LIMIT_SECONDS)
    probe = devices.probeResult(job)
    assert not job.folder.exists()

    assert probe["torch"]["version"] == torch.__version__
    assert probe["cuda"]["available"] == torch.cuda.is_available()
    assert len(probe["cuda"]["devices"]) == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    assert probe["cpu"]["cores"] == os.cpu_count() and isinstance(probe["cpu"]["bf16"], bool)
    assert isinstance(probe["mps"]["available"], bool)
    assert devices.describeChoice(probe, "auto") == probe["auto"]
    if not torch.cuda.is_available():
        assert "No CUDA GPU" in devices.describeChoice(probe, "cuda")
    cli = subprocess.run([sys.executable, "-m", "hsam", "devices", "--json"], capture_output=True, encoding="utf-8",
                         timeout=WAIT_LIMIT_SECONDS)
    assert json.loads(cli.stdout).keys() == probe.keys()


def test_devices_for_people(capsys):
    from hsam.cli import main

    assert main(["devices"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"PyTorch {torch.__version__}")
    assert any(line.startswith("CPU: ") for line in lines) and lines[-1].startswith("auto picks: ")
    assert ("CUDA: not available" in lines) != torch.cuda.is_available()


# --- the Slicer-side logic through the worker, on a real MRML scene ------------------------------


def test_segment_logic_through_the_worker_matches_the_engine(scene, bundle):
    from HSAMLib import mrml
    from HSAMLib.segment_logic import HSAMSegmentLogic

    from hsam.models.bundle import load_bundle

    volume = phantom_volume(6)[0]
    volume_node = mrml.node_from_volume(volume, scene, "CT")
    events = []
    node = HSAMSegmentLogic().segment(volume_node, bundle, device="cpu", batchSize=2, onEvents=events.extend)

    model, metadata = load_bundle(bundle)
    expected = segment_volume(model, mrml.volume_from_node(volume_node), metadata, device="cpu", batch_size=2).labels
    labels, segments = mrml.labels_from_segmentation(node, volume_node)
    assert [(s.name, s.color) for s in segments] == [(s.name, s.color) for s in CLASSES]
    assert segments[0].terminology == CLASSES[0].terminology
    ordinal = np.zeros_like(expected)
    for index, segment in enumerate(CLASSES, start=1):
        ordinal[expected == segment.label_value] = index
    np.testing.assert_array_equal(labels, ordinal)
    assert events[-1]["fraction"] == 1.0


def test_a_failed_segmentation_leaves_the_scene_unchanged(scene, tmp_path):
    from hsam.runtime.errors import HSAMError
    from HSAMLib import mrml
    from HSAMLib.segment_logic import HSAMSegmentLogic

    broken = tmp_path / "broken.hsam"
    broken.write_bytes(b"not a model")
    volume_node = mrml.node_from_volume(phantom_volume(4)[0], scene, "CT")
    before = scene.GetNumberOfNodes()
    with pytest.raises(HSAMError, match="broken.hsam"):
        HSAMSegmentLogic().segment(volume_node, broken, device="cpu")
    assert scene.GetNumberOfNodes() == before


def test_finetune_logic_through_the_worker_saves_into_the_models_folder(scene, tmp_path):
    from HSAMLib import mrml
    from HSAMLib.training_logic import HSAMTrainingLogic

    volume, labels = phantom_volume(8)
    volume_node = mrml.node_from_volume(volume, scene, "CT")
    annotations = np.zeros_like(labels)
    annotations[[2, 5]] = labels[[2, 5]]
    segmentation = mrml.labels_to_segmentation(annotations, CLASSES, volume_node)
    trainer = HSAMTrainingLogic()
    config = trainer.makeConfig("tiny", epochs=1, batchSize=2, device="cpu", imageSize=224)
    events = []
    path = trainer.finetune(volume_node, segmentation, "my model", config, onEvents=events.extend, modelsFolder=tmp_path)

    assert path == tmp_path / "my_model.hsam" and sorted(p.name for p in tmp_path.iterdir()) == ["my_model.hsam"]
    metadata = read_bundle_metadata(path)
    assert metadata.class_names == ["ellipsoid", "sphere"] and metadata.terminology[0] == CLASSES[0].terminology
    assert any(e.get("loss") is not None for e in events) and events[-1]["fraction"] == 1.0


def test_finetune_logic_trains_one_model_on_several_pairs(scene, tmp_path):
    """Two (volume, segmentation) pairs on different grids; the second annotates only the ellipsoid."""
    from HSAMLib import mrml
    from HSAMLib.training_logic import HSAMTrainingLogic

    pairs = []
    for name, depth, spacing, classes in (("first", 8, (0.8, 0.7, 2.0), CLASSES), ("second", 10, (1.0, 1.0, 1.5), CLASSES[:1])):
        volume, labels = phantom_volume(depth)
        volume.spacing = spacing
        node = mrml.node_from_volume(volume, scene, name)
        annotations = np.zeros_like(labels)
        annotations[[2, 5]] = labels[[2, 5]]
        annotations[annotations == CLASSES[1].label_value] = 0 if len(classes) == 1 else CLASSES[1].label_value
        pairs.append((node, mrml.labels_to_segmentation(annotations, classes, node)))
    trainer = HSAMTrainingLogic()
    config = trainer.makeConfig("tiny", epochs=1, batchSize=2, device="cpu", imageSize=224)
    path = trainer.finetuneCohort(pairs, "cohort model", config, modelsFolder=tmp_path)

    metadata = read_bundle_metadata(path)
    assert metadata.class_names == ["ellipsoid", "sphere"]
    cases = metadata.training["cases"]
    assert [c["name"] for c in cases] == ["first", "second"] and [c["shape"][0] for c in cases] == [8, 10]
    assert cases[1]["labelled_voxels"]["sphere"] == 0 and cases[1]["slices"] == [2, 5]
    with pytest.raises(Exception, match="add at least one"):
        trainer.finetuneCohort([], "empty", config, modelsFolder=tmp_path)


def test_slicer_side_modules_never_import_torch():
    code = (
        "import sys\n"
        "from HSAMLib import annotations, dependencies, devices, fill_logic, models, mrml, parameters, plots, "
        "segment_logic, suggest_logic, training_logic, worker\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision', 'segment_anything')))\n"
    )
    env = dict(os.environ, PYTHONPATH=str(devices.__file__).rsplit(os.sep, 2)[0])
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, encoding="utf-8", env=env, timeout=WAIT_LIMIT_SECONDS)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
