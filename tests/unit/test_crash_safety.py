"""A process killed with SIGKILL in the middle of a save leaves the previous file intact."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import torch

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
