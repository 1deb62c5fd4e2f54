"""Checkpoint retention (Train Steps' keep_checkpoints) on a real server."""

from __future__ import annotations

from comfy_harness import tiny_train_workflow


def checkpoints(server, name: str) -> list[str]:
    return sorted(p.name for p in (server.base / "output" / "lora_kiln" / name / "checkpoints").glob("*.kiln.safetensors"))


def test_keep_checkpoints_keeps_the_newest_and_never_a_cancelled_one(server):
    """save_every 1 over 5 steps with keep_checkpoints 2: steps 4 and 5 stay, 1-3 were removed (each after the next
    was written); a Cancel checkpoint already in the folder is untouched. With keep_checkpoints 0 (the default)
    every checkpoint stays."""
    name = "keep_two"
    folder = server.base / "output" / "lora_kiln" / name / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    stranger = folder / "keep_two_step000002_cancelled.kiln.safetensors"
    stranger.write_bytes(b"not ours")  # a Cancel checkpoint of an earlier run: never removed
    wf = tiny_train_workflow(name, steps=5, save_every=1, keep_checkpoints=2)
    wf["5"]["inputs"]["save_checkpoint"] = True
    result = server.run(wf)
    assert result.status == "success", result.error
    assert checkpoints(server, name) == ["keep_two_step000002_cancelled.kiln.safetensors",
                                         "keep_two_step000004.kiln.safetensors", "keep_two_step000005.kiln.safetensors"]
    assert stranger.read_bytes() == b"not ours"

    wf = tiny_train_workflow("keep_all", steps=3, save_every=1)
    result = server.run(wf)
    assert result.status == "success", result.error
    assert checkpoints(server, "keep_all") == [f"keep_all_step00000{i}.kiln.safetensors" for i in (1, 2, 3)]
