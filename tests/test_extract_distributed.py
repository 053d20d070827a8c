"""``torchrun --nproc-per-node 2 smi-hub extract`` (gloo, CPU) writes the same store, byte for
byte, as one process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import smi_hub
from smi_hub import SMIModel
from smi_hub.feature_store import FeatureStore

BIN = Path(sys.executable).parent  # the environment's scripts: smi-hub, torchrun


@pytest.mark.slow
@pytest.mark.distributed
def test_two_process_extract_equals_one_process(tmp_path):
    torch.manual_seed(0)
    model = SMIModel(
        arch="resnet18",
        base_width=4,
        small_stem=True,
        image_size=28,
        mean=[0.3] * 3,
        std=[0.35] * 3,
    )
    weights = smi_hub.save_weights_folder(model.eval(), tmp_path / "w")
    gallery = smi_hub.default_gallery(tmp_path / "g", per_class=3)
    (gallery / "Bag" / "broken.png").write_bytes(b"x")
    common = [str(gallery), "--model", str(weights), "--shard-size", "4", "--batch-size", "3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    smi_hub_bin = str(BIN / "smi-hub")
    one = subprocess.run(
        [smi_hub_bin, "extract", *common, "-o", str(tmp_path / "one")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert one.returncode == 0, one.stderr
    two = subprocess.run(
        [
            str(BIN / "torchrun"),
            "--standalone",
            "--nproc-per-node",
            "2",
            "--no-python",
            smi_hub_bin,
            "extract",
            *common,
            "-o",
            str(tmp_path / "two"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert two.returncode == 0, two.stderr
    assert two.stdout.count("feature rows") == 1  # rank 0 reports
    files = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "two").iterdir())
    assert len(files) == 1 + 8  # 31 inputs in shards of 4, and the manifest
    for name in files:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()
    store = FeatureStore.open(tmp_path / "two")
    assert len(store) == 30 and store.failed[0][0].endswith("broken.png")
