"""Distributed fine-tuning with torch's own launcher: two CPU processes over Gloo."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from safetensors.torch import load_file

from hsam.models.bundle import load_bundle

TESTING_DIR = Path(__file__).resolve().parent

TRAIN_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    sys.path.insert(0, {testing!r})
    from safetensors.torch import save_file
    from phantom import phantom_volume
    from hsam.models.bundle import save_bundle
    from hsam.training.config import FinetuneConfig
    from hsam.training.distributed import is_main_process
    from hsam.training.finetune import finetune

    out = sys.argv[1]
    volume, labels, segments = phantom_volume((16, 48, 48))
    result = finetune(volume, labels, segments, FinetuneConfig(epochs=2, img_size=224, device="cpu", seed=3))
    rank = os.environ["RANK"]
    save_file({{k: v.contiguous() for k, v in result.model.state_dict().items()}}, f"{{out}}/weights-{{rank}}.safetensors")
    if is_main_process():
        save_bundle(f"{{out}}/ddp.hsam", result.model, result.metadata)
        with open(f"{{out}}/history.json", "w") as f:
            json.dump(result.history, f)
    """
)


@pytest.mark.slow
def test_two_process_training_gives_one_loadable_model(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(TRAIN_SCRIPT.format(testing=str(TESTING_DIR)), encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), str(tmp_path)]
    run = subprocess.run(command, env=env, capture_output=True, encoding="utf-8", timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]

    model, metadata = load_bundle(tmp_path / "ddp.hsam")
    training = metadata.training
    assert training["processes"] == 2
    # 14 labelled slices: 2 held out for validation, 12 shared by 2 processes in batches of 2.
    case = training["cases"][0]
    assert len(case["validation_slices"]) == 2 and len(case["slices"]) == 12
    assert training["steps"] == 2 * 3
    assert len(json.loads((tmp_path / "history.json").read_text(encoding="utf-8"))) == 2
    assert model.num_classes == 3

    # Gradients were averaged across processes: both end with the same weights.
    first, second = (load_file(tmp_path / f"weights-{rank}.safetensors") for rank in (0, 1))
    assert first.keys() == second.keys()
    assert all((first[k] == second[k]).all() for k in first)
    assert not (tmp_path / "weights-2.safetensors").exists()
