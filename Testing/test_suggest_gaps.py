"""Where to paint next without a model: the gaps between annotated slices ranked by how much flow
propagation from below and from above disagree (real OpenCV flows, real files, real `python -m hsam`)."""

import json
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest

import hsam.guidance.flow as flow
from hsam.evaluation.baselines import flow_propagator
from hsam.guidance.flow import SliceFlows
from hsam.guidance.gaps import rank_gaps
from hsam.volumes.segmentation import Segment, write_segmentation
from hsam.volumes.volume import Volume, write_volume

SLICES, SIZE = 31, 64
PAINTED = [0, 10, 20, 30]
APPEARS = 15  # the second structure starts here, inside the gap 10–20


def scene() -> tuple[np.ndarray, np.ndarray]:
    """(image, labels) (z, y, x): a disc moving through every slice (class 1), and a second disc
    (class 2) that appears at slice ``APPEARS`` and stays, on a textured background."""
    rng = np.random.default_rng(1)
    texture = rng.normal(0, 1, (SIZE // 4, SIZE // 4)).repeat(4, 0).repeat(4, 1) * 60 + 300
    y, x = np.mgrid[:SIZE, :SIZE]
    image = np.empty((SLICES, SIZE, SIZE), np.float32)
    labels = np.zeros((SLICES, SIZE, SIZE), np.uint8)
    for z in range(SLICES):
        moving = (y - 20 - 0.5 * z) ** 2 + (x - 20) ** 2 <= 64
        appearing = ((y - 44) ** 2 + (x - 44) ** 2 <= 49) & (z >= APPEARS)
        image[z] = np.where(moving | appearing, 900.0, texture)
        labels[z][moving], labels[z][appearing] = 1, 2
    return image, labels


def painted(labels: np.ndarray, slices: list[int]) -> np.ndarray:
    out = np.zeros_like(labels)
    out[slices] = labels[slices]
    return out


@pytest.fixture(autouse=True)
def fresh_flows(monkeypatch):
    """An empty flow cache, so that each test computes its own flows."""
    monkeypatch.setattr(flow, "_CACHE", OrderedDict())


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("gaps")
    image, labels = scene()
    volume = Volume(image, (0.8, 0.8, 2.0), (0.0, 0.0, 0.0), tuple(np.eye(3).ravel()))
    write_volume(folder / "volume.nrrd", volume)
    segments = [Segment("moving", 1, (1.0, 0.0, 0.0)), Segment("appearing", 2, (0.0, 1.0, 0.0))]
    write_segmentation(folder / "painted.seg.nrrd", painted(labels, PAINTED), volume, segments)
    write_segmentation(folder / "one.seg.nrrd", painted(labels, [20]), volume, segments)
    write_segmentation(folder / "adjacent.seg.nrrd", painted(labels, [20, 21]), volume, segments)
    return {"folder": folder, "volume": folder / "volume.nrrd", "painted": folder / "painted.seg.nrrd"}


def hsam(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hsam", *map(str, args)], capture_output=True, encoding="utf-8",
                          timeout=300)


def test_the_gap_where_a_structure_appears_ranks_first():
    image, labels = scene()
    propagation, _ = flow_propagator(image, labels, PAINTED, modality="mr")
    gaps = rank_gaps(propagation)
    assert [(g.low, g.high) for g in gaps][0] == (10, 20)
    assert gaps[0].slice == 15
    # the appearing structure alone disagrees there (class 2), several times the motion elsewhere
    assert gaps[0].score > 3 * max(g.score for g in gaps[1:]), [(g.low, g.score) for g in gaps]
    assert gaps[0].disagreement[2] > 0 and all(g.disagreement[2] == 0 for g in gaps[1:])
    assert [g.score for g in gaps] == sorted((g.score for g in gaps), reverse=True)
    assert [(g.low, g.high) for g in rank_gaps(propagation, 2)] == [(g.low, g.high) for g in gaps[:2]]


def test_a_small_structure_weighs_as_much_as_a_large_one():
    """A large disc growing in the gap 0–10 changes many more voxels than a small disc appearing in the
    gap 10–20; relative to each structure's size the small one changes more, and ranks first."""
    rng = np.random.default_rng(2)
    texture = rng.normal(0, 1, (SIZE // 4, SIZE // 4)).repeat(4, 0).repeat(4, 1) * 60 + 300
    y, x = np.mgrid[:SIZE, :SIZE]
    image = np.empty((21, SIZE, SIZE), np.float32)
    labels = np.zeros((21, SIZE, SIZE), np.uint8)
    for z in range(21):
        large = (y - 26) ** 2 + (x - 26) ** 2 <= (14 + 0.8 * min(z, 10)) ** 2
        small = ((y - 56) ** 2 + (x - 56) ** 2 <= 9) & (z >= 15)
        image[z] = np.where(large | small, 900.0, texture)
        labels[z][large], labels[z][small] = 1, 2
    propagation, _ = flow_propagator(image, labels, [0, 10, 20], modality="mr")
    gaps = rank_gaps(propagation)
    assert [(g.low, g.high) for g in gaps] == [(10, 20), (0, 10)]
    assert gaps[1].disagreement.sum() > 2 * gaps[0].disagreement.sum()  # in voxels the large one wins


def test_the_flows_are_computed_once_for_ranking_and_propagating(monkeypatch):
    computed = []
    original = SliceFlows._compute
    monkeypatch.setattr(SliceFlows, "_compute", lambda self, pair: computed.append(pair) or original(self, pair))
    image, labels = scene()
    propagation, _ = flow_propagator(image, labels, PAINTED, modality="mr")
    rank_gaps(propagation)
    ranked = len(computed)
    assert ranked == len(set(computed)) == 2 * (SLICES - len(PAINTED))
    for low, high in zip(PAINTED, PAINTED[1:]):
        propagation.between(low, high)
    assert len(computed) == ranked  # the propagation reuses every flow the ranking computed


@pytest.mark.parametrize("annotated", [[3, 4, 6, 9, 10, 30], [0, 2, 5, 6, 7, 30], [1, 29]])
def test_suggestions_never_name_an_annotated_slice(annotated):
    image, labels = scene()
    propagation, _ = flow_propagator(image, labels, annotated, modality="mr")
    gaps = rank_gaps(propagation)
    inner = [(low, high) for low, high in zip(annotated, annotated[1:]) if high - low > 1]
    assert sorted((g.low, g.high) for g in gaps) == inner  # every gap with a slice inside, once
    for gap in gaps:
        assert gap.slice not in annotated and gap.low < gap.slice < gap.high


def test_cli_without_a_model_suggests_the_middle_of_the_gap_that_changes(files):
    folder = files["folder"]
    done = hsam("suggest", files["volume"], "--annotated", files["painted"], "-n", "2", "--csv", folder / "s.csv")
    assert done.returncode == 0, done.stderr
    picks = [int(i) for i in done.stdout.strip().split(",")]
    assert len(picks) == 2 and picks[0] == 15, done.stdout
    assert "10–20" in done.stderr
    rows = (folder / "s.csv").read_text().splitlines()
    assert rows[0] == "rank,axis,slice,gap_low,gap_high,score" and rows[1].startswith("1,axial,15,10,20,")

    done = hsam("suggest", files["volume"], "--annotated", files["painted"], "-n", "5", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["ranking"] == "flow" and report["annotated"] == PAINTED and report["axis"] == "axial"
    suggestions = report["suggestions"]
    assert [s["rank"] for s in suggestions] == [1, 2, 3]  # three gaps: three suggestions, not five
    assert suggestions[0]["slice"] == 15 and suggestions[0]["gap"] == [10, 20]
    assert not {s["slice"] for s in suggestions} & set(PAINTED)
    assert suggestions[0]["score"] > suggestions[1]["score"] >= suggestions[2]["score"]

    done = hsam("suggest", files["volume"], "--annotated", files["painted"], "-n", "1", "--progress", "json")
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["event"] == "result" and result["suggestions"] == suggestions[:1]


@pytest.mark.parametrize("arguments, message", [
    (["--annotated", "0,10,20"], "not slice indices"),
    ([], "--annotated"),
    (["--annotated", "{folder}/one.seg.nrrd"], "needs at least two"),
    (["--annotated", "{folder}/adjacent.seg.nrrd"], "no axial slice lies between"),
    (["--annotated", "{painted}", "--min-distance", "3"], "--min-distance needs a model"),
    (["--annotated", "{folder}/missing.seg.nrrd"], "not found"),
    (["--annotated", "{painted}", "--csv", "{folder}/s.txt"], ".csv"),
])
def test_bad_input_gives_one_line(files, arguments, message):
    folder, painted_file = files["folder"], files["painted"]
    arguments = [a.format(folder=folder, painted=painted_file) for a in arguments]
    done = hsam("suggest", files["volume"], *arguments)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith("hsam: error: "), done.stderr
    assert message.lower() in lines[0].lower(), lines[0]
    assert not (Path(folder) / "s.txt").exists()
