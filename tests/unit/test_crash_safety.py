"""A process killed with SIGKILL in the middle of a save leaves the previous file intact."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from lora_core import fileio
from lora_core.fileio import load_safetensors

ROOT = Path(__file__).resolve().parents[2]

WRITER = textwrap.dedent(
    """
    import sys, torch
    sys.path.insert(0, {root!r})
    from lora_core.fileio import atomic_save_safetensors
    path = sys.argv[1]
    i = 0
    while True:
        i += 1
        big = torch.full((4_000_000,), float(i))  # 16 MB per save: the kill lands mid-write often
        atomic_save_safetensors({{"x": big}}, path, {{"generation": str(i)}})
        print(i, flush=True)
    """
)


def test_sigkill_during_saves_never_leaves_a_broken_file(tmp_path):
    target = tmp_path / "ckpt.safetensors"
    script = tmp_path / "writer.py"
    script.write_text(WRITER.format(root=str(ROOT)))
    for delay in (0.15, 0.3, 0.45, 0.6):
        proc = subprocess.Popen([sys.executable, str(script), str(target)], stdout=subprocess.PIPE, text=True)
        proc.stdout.readline()  # at least one complete save exists
        time.sleep(delay)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        tensors, meta = load_safetensors(target)  # must always parse: old or new, never half
        generation = int(meta["generation"])
        assert torch.all(tensors["x"] == generation)
    leftovers = [p.name for p in tmp_path.iterdir() if p.name not in ("ckpt.safetensors", "writer.py")]
    assert all(name.startswith(".ckpt.safetensors.") and name.endswith(".tmp") for name in leftovers)


def test_a_write_that_does_not_fit_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    """The free space is checked first: the message names the folder, the bytes needed and free, and the file
    already there (and the folder) are exactly as they were."""
    path = tmp_path / "run" / "a.safetensors"
    fileio.atomic_save_safetensors({"x": torch.zeros(10)}, path, {"generation": "1"})
    before, listing = path.read_bytes(), sorted(p.name for p in path.parent.iterdir())
    real = fileio.shutil.disk_usage
    free = 5 << 20
    monkeypatch.setattr(fileio.shutil, "disk_usage", lambda p: real(p)._replace(free=free))
    with pytest.raises(fileio.NotEnoughSpace) as caught:
        fileio.atomic_save_safetensors({"x": torch.zeros(1_000_000)}, path, {"generation": "2"})
    message = str(caught.value)
    assert str(path.parent) in message and "5.0 MiB are free" in message and "Nothing already written" in message
    assert caught.value.needed > 4_000_000 + fileio.FREE_SPACE_RESERVE and caught.value.free == free
    assert path.read_bytes() == before and sorted(p.name for p in path.parent.iterdir()) == listing
    free = 1 << 40  # enough: the same write goes through
    fileio.atomic_save_safetensors({"x": torch.zeros(1_000_000)}, path, {"generation": "2"})
    assert load_safetensors(path)[1]["generation"] == "2"
