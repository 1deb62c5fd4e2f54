"""Re-queues never retrain what is already trained (nodes/requeue.py), on a real server.

A preview or save_every change reuses the finished run (0 steps, the same LoRA) and renders the previews again with
the new settings; a changed caption, seed or learning rate trains again; a restarted server finds the finished run
on disk; a server killed mid-run resumes from its last checkpoint and ends with the LoRA an uninterrupted run gives.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import yaml
from PIL import Image
from safetensors.torch import load_file

from comfy_harness import REPO, ComfyServer, find_comfyui, make_images, tiny_train_workflow

NAME = "requeue"
REUSED = "reused a finished run (step 4): 0 steps"


def workflow(tag: str, name: str = NAME, **train) -> dict:
    """4 steps with previews at 2 and 4; Save LoRA writes models/loras/<name>_<tag>.safetensors."""
    # a learning rate no other test trains with: the shared server's store must not hold this run already
    wf = tiny_train_workflow(name, **{"steps": 4, "preview_every": 2, "learning_rate": 1.5e-3, **train})
    wf["5"]["inputs"].update(filename=f"{name}_{tag}", save_checkpoint=False)
    return wf


def run(server, wf: dict, **kwargs):
    result = server.run(wf, **kwargs)
    assert result.status == "success", (result.error, server.log()[-3000:])
    return result


def text(result) -> str:
    return result.history["outputs"]["4"]["text"][0]


def trained_steps(result) -> list[int]:
    """The global steps Train Steps trained in this prompt (its live progress events)."""
    return [p[0] for d in result.of_type("kiln.train.progress") if d["node"] == "4" for p in d["points"]]


def lora(server, name: str) -> dict:
    return load_file(str(server.base / "models" / "loras" / f"{name}.safetensors"))


def same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and np.array_equal(a[k].numpy(), b[k].numpy())
                                        for k in a)


def previews(server, result) -> dict[int, np.ndarray]:
    refs = result.history["outputs"]["4"]["kiln_previews"]
    return {ref["step"]: np.asarray(Image.open(server.base / "temp" / ref["subfolder"] / ref["filename"]).convert("RGB"),
                                    dtype=np.int16) for ref in refs}


@pytest.fixture(scope="module")
def first(server):
    result = run(server, workflow("first"))
    assert text(result).startswith("trained 4 steps · step 4"), text(result)
    assert trained_steps(result) == list(range(1, 5))
    return {"result": result, "lora": lora(server, f"{NAME}_first"), "previews": previews(server, result)}


def test_a_preview_change_trains_nothing_keeps_the_lora_and_renders_the_new_previews(server, first):
    for tag, change in (("prompt", {"preview_prompt": "a kilnshape square, in the rain"}), ("seed", {"preview_seed": 7})):
        result = run(server, workflow(tag, **change))
        assert text(result).startswith(REUSED), text(result)
        assert trained_steps(result) == []
        assert REUSED in [d["text"] for d in result.of_type("progress_text") if d["node"] == "4"]
        assert same_tensors(lora(server, f"{NAME}_{tag}"), first["lora"])
        assert [h[0] for h in result.history["outputs"]["4"]["kiln_history"]] == list(range(1, 5))
        shown = previews(server, result)
        assert sorted(shown) == [2, 4]  # the same steps, rendered with the new preview settings
        assert all(not np.array_equal(shown[s], first["previews"][s]) for s in shown), tag
        assert len(result.of_type("preview_image")) == 2


def test_a_save_every_change_trains_nothing_and_the_previews_come_back_exactly(server, first):
    result = run(server, workflow("save", save_every=2))
    assert text(result).startswith(REUSED), text(result)
    assert trained_steps(result) == []
    assert same_tensors(lora(server, f"{NAME}_save"), first["lora"])
    shown = previews(server, result)
    # same preview settings: the snapshots kept at steps 2 and 4 render what training rendered, bit for bit
    assert sorted(shown) == [2, 4] and all(np.array_equal(shown[s], first["previews"][s]) for s in shown)
    # a preview_every change shows the steps a fresh run would, as far as snapshots were kept
    denser = run(server, workflow("denser", preview_every=1))
    assert trained_steps(denser) == []
    assert sorted(previews(server, denser)) == [2, 4]
    assert "no snapshot kept for the previews of step 1, 3 (retrain renders them)" in text(denser), text(denser)
    sparser = run(server, workflow("sparser", preview_every=4))
    assert sorted(previews(server, sparser)) == [4] and np.array_equal(previews(server, sparser)[4], first["previews"][4])


def test_a_copy_of_the_dataset_is_the_same_training_and_one_edited_caption_is_not(server, first):
    folder = server.base / "input" / "requeue_copy"
    shutil.copytree(server.base / "input" / "shapes", folder)
    wf = workflow("copy")
    wf["2"]["inputs"]["folder"] = "requeue_copy"
    assert text(run(server, wf)).startswith(REUSED)  # the folder's name or path is not the training
    (folder / "img_02.txt").write_text("a kilnshape circle, colour two", encoding="utf-8")
    wf["5"]["inputs"]["filename"] = f"{NAME}_caption"
    result = run(server, wf)
    assert text(result).startswith("trained 4 steps"), text(result)
    assert trained_steps(result) == list(range(1, 5))
    assert not same_tensors(lora(server, f"{NAME}_caption"), first["lora"])


@pytest.mark.parametrize(("tag", "node", "change"), [("seed", "3", {"seed": 1}),
                                                     ("lr", "4", {"learning_rate": 2e-3})])
def test_the_seed_or_the_learning_rate_trains_again(server, first, tag, node, change):
    wf = workflow(f"changed_{tag}")
    wf[node]["inputs"].update(change)
    result = run(server, wf)
    assert text(result).startswith("trained 4 steps"), text(result)
    assert trained_steps(result) == list(range(1, 5))
    assert not same_tensors(lora(server, f"{NAME}_changed_{tag}"), first["lora"])


def test_retrain_trains_again_and_gives_the_bytes_reuse_gave(server, first):
    finished = server.base / "output" / "lora_kiln" / NAME / "finished"
    before = {p.name: p.stat().st_mtime_ns for p in finished.glob("*.kiln.safetensors")}
    result = run(server, workflow("retrain", retrain=True))
    assert text(result).startswith("trained 4 steps"), text(result)
    assert trained_steps(result) == list(range(1, 5))
    assert same_tensors(lora(server, f"{NAME}_retrain"), first["lora"])  # on the CPU training is bit-exact
    after = {p.name: p.stat().st_mtime_ns for p in finished.glob("*.kiln.safetensors")}
    rewritten = [n for n in after if after[n] != before.get(n)]
    assert len(rewritten) == 1 and rewritten[0] in before  # the same digest: its finished state, written again
    snapshots = finished / rewritten[0].replace(".kiln.safetensors", ".previews")
    assert sorted(p.name for p in snapshots.iterdir()) == ["step000002.safetensors", "step000004.safetensors"]


# ---- restarts and crashes: more servers on the same base directory ------------------------------------------

@pytest.fixture(scope="module")
def servers(server, tiny_checkpoint):
    """Start more servers on the shared server's base directory (each a fresh process: nothing in memory)."""
    started: list[ComfyServer] = []

    def start() -> ComfyServer:
        srv = ComfyServer(find_comfyui(), server.base, tiny_checkpoint)
        started.append(srv)
        srv.start()
        return srv

    yield start
    for srv in started:
        srv.stop()


@pytest.fixture(scope="module")
def restarted(servers) -> ComfyServer:
    return servers()


def test_a_restarted_server_reuses_the_finished_run_from_disk(first, restarted):
    result = run(restarted, workflow("restarted"))
    assert text(result).startswith(REUSED), text(result)
    assert trained_steps(result) == []
    assert same_tensors(lora(restarted, f"{NAME}_restarted"), first["lora"])
    assert sorted(previews(restarted, result)) == [2, 4]


KILLED = {"steps": 10, "save_every": 2}


def test_a_server_killed_mid_run_resumes_from_its_checkpoint_to_the_uninterrupted_result(server, restarted, servers):
    reference = run(server, workflow("reference", name="requeue_ref", **KILLED, preview_every=0))
    assert trained_steps(reference) == list(range(1, 11))

    # the victim renders large previews at steps 4 and 8 (previews are not part of the training): the kill, sent
    # once step 3 is reported, lands long before step 10 even on a fast machine
    victim = restarted
    slow = {**KILLED, "preview_every": 4, "preview_size": 256, "preview_steps": 12}

    def kill_after_a_checkpoint(kind, data):
        if kind == "kiln.train.progress" and data.get("node") == "4" and data["step"] >= 3 and victim.alive():
            os.kill(victim.proc.pid, signal.SIGKILL)  # a crash or power loss: no Cancel, no clean shutdown

    with pytest.raises(Exception):  # noqa: B017 - the websocket dies with the server
        victim.run(workflow("killed", name="requeue_kill", **slow), on_message=kill_after_a_checkpoint, timeout=300)
    victim.proc.wait(30)
    folder = server.base / "output" / "lora_kiln" / "requeue_kill"
    steps = sorted(int(p.name.split("_step")[1][:6]) for p in (folder / "checkpoints").glob("*.kiln.safetensors"))
    assert steps and steps[-1] < 10, steps
    assert not (folder / "finished").is_dir() or not list((folder / "finished").glob("*.kiln.safetensors"))

    after = servers()
    result = run(after, workflow("killed", name="requeue_kill", **KILLED, preview_every=4))
    done = steps[-1]
    assert text(result).startswith(f"resumed from step {done}: {10 - done} steps"), text(result)
    assert trained_steps(result) == list(range(done + 1, 11))
    assert [h[0] for h in result.history["outputs"]["4"]["kiln_history"]] == list(range(1, 11))
    assert sorted(previews(after, result)) == [4, 8]  # the step-4 one from its snapshot when it came before the kill
    assert same_tensors(lora(after, "requeue_kill_killed"), lora(server, "requeue_ref_reference"))
    # finished now: the next re-queue reuses it
    again = run(after, workflow("again", name="requeue_kill", **KILLED, preview_every=0))
    assert text(again).startswith("reused a finished run (step 10): 0 steps"), text(again)


def test_kiln_py_reuses_a_finished_run_too(tmp_path, tiny_checkpoint):
    data = make_images(tmp_path / "shapes", n=2)
    cfg = {"base_model": str(tiny_checkpoint), "train_data_dir": str(data), "output_dir": str(tmp_path / "out"),
           "output_name": "again", "resolution": 64, "lora_rank": 4, "lora_alpha": 4, "max_steps": 2,
           "learning_rate": 1e-3}
    (tmp_path / "again.yaml").write_text(yaml.safe_dump(cfg))

    def kiln(*flags: str) -> str:
        done = subprocess.run([sys.executable, str(REPO / "kiln.py"), str(tmp_path / "again.yaml"), *flags],
                              cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout + done.stderr

    assert "trained 2 steps" in kiln()
    assert "reused a finished run (step 2): 0 steps" in kiln()
    run_dir = tmp_path / "out" / "again"
    assert same_tensors(load_file(str(run_dir / "again.safetensors")), load_file(str(run_dir / "again_00001.safetensors")))
    assert len(list((run_dir / "finished").glob("*.kiln.safetensors"))) == 1
    assert "trained 2 steps" in kiln("--retrain")  # forced: trains again, to the same bytes (CPU)
    assert same_tensors(load_file(str(run_dir / "again.safetensors")), load_file(str(run_dir / "again_00002.safetensors")))


# ---- the store's rules, file by file (nodes/requeue.py with ComfyUI imported as a library) ---------------------

STORE = textwrap.dedent(
    """
    import importlib, json, sys
    from pathlib import Path
    sys.path.insert(0, {repo!r})
    import kiln
    headless = kiln.boot_comfyui(kiln.find_comfyui(), extras=False)
    pkg = headless.__name__.rsplit(".headless.", 1)[0]
    rq = importlib.import_module(pkg + ".nodes.requeue")
    folders = importlib.import_module(pkg + ".nodes.corridor.folders")
    core = importlib.import_module(pkg + ".lora_core")
    import torch
    folders.configure_directories(runs=Path({runs!r}))
    D, E, F = "d" * 64, "e" * 64, "f" * 64
    start = core.TrainState(adapter_config=core.AdapterConfig(rank=2), specs=(),
                            weights={{"a.lora_down.weight": torch.zeros(2, 3), "a.lora_up.weight": torch.zeros(3, 2)}})
    out = {{}}

    def at(step, **weights):
        return start.replace(step=step, weights={{**start.weights, **weights}})

    def ckpt(state, digest, target, name="c"):
        path = folders.checkpoint_directory("n") / f"{{name}}_step{{state.step:06d}}.kiln.safetensors"
        state.save(path, plain_metadata=rq.checkpoint_metadata_for(digest, target, state.step))
        return path

    def what(digest=D, steps=10, retrain=False):
        p = rq.plan("n", digest, start, steps, retrain)
        return [p.action, p.found.step if p.found is not None else None]

    out["nothing"] = what()
    ckpt(at(4), D, 10)
    ckpt(at(6), D, 12, "other_target")  # same digest, another target: never
    ckpt(at(8), E, 10, "other_run")  # another run: never
    ckpt(at(7, **{{"a.lora_up.weight": torch.zeros(4, 2)}}), D, 10, "other_shape")  # does not fit: never
    bad = folders.checkpoint_directory("n") / "x_step000009.kiln.safetensors"
    bad.write_bytes(ckpt(at(9), D, 10, "x").read_bytes()[:300])  # truncated by a crash: never
    out["checkpoints"] = what()
    out["retrain"] = what(retrain=True)
    rq.store_finished("n", D, at(10))
    out["finished_in_memory"] = what()
    rq.MEMORY.drop(D)
    out["finished_on_disk"] = what()
    out["finished_other_steps"] = what(steps=11)  # the target differs (and so would the digest): not this file
    out["other_run"] = what(E)  # E's own checkpoint
    fake = rq.finished_path("n", F)
    fake.write_bytes(rq.finished_path("n", D).read_bytes())  # a file named for F that records D: never
    out["misnamed"] = what(F)

    parts = {{"format": "f", "training_code_version": 1, "engine_sources": "new", "host_sources": "h", "start": "s",
              "dataset": "d", "config": "c", "base": "b"}}
    G = "9" * 64
    rq._PARTS[G] = parts  # as run_digest leaves it; a checkpoint of the same run from older training code:
    at(5).save(folders.checkpoint_directory("n") / "old_step000005.kiln.safetensors", plain_metadata={{
        rq.DIGEST_KEY: "8" * 64, rq.TARGET_KEY: "10", rq.STEP_KEY: "5",
        rq.PARTS_KEY: json.dumps(dict(parts, engine_sources="old"))}})
    p = rq.plan("n", G, start, 10)
    out["other_version"] = [p.action, p.describe(0, 10)]

    from safetensors.torch import save_file
    for step in (2, 4, 6, 8):  # snapshots beyond the byte cap: the earliest go, the latest stays
        path = rq.snapshot_path("n", D, step)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({{"w": torch.zeros(256)}}, str(path), {{rq.DIGEST_KEY: D, rq.STEP_KEY: str(step)}})
    size = rq.snapshot_path("n", D, 2).stat().st_size
    rq.trim_snapshots("n", D, max_bytes=2 * size)
    out["snapshots"] = sorted(rq.snapshot_files("n", D))

    for i in range(20):  # many finished runs of one name: the most recent ones stay, and the one just written
        rq.store_finished("many", f"{{i:064x}}", at(10))
    out["kept"] = len(list(rq.finished_directory("many").glob("*.kiln.safetensors")))
    one = rq.finished_path("many", f"{{19:064x}}").stat().st_size
    rq.collect("many", keep=f"{{4:064x}}", max_bytes=2 * one)
    out["kept_by_bytes"] = sorted(int(p.name[:64], 16) for p in rq.finished_directory("many").glob("*.kiln.safetensors"))
    print("RESULT" + json.dumps(out))
    """
)


def test_the_store_never_matches_what_does_not_fit(tmp_path):
    script = STORE.format(repo=str(REPO), runs=str(tmp_path / "runs"))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.split("RESULT", 1)[1])
    assert out["nothing"] == ["train", None]
    assert out["checkpoints"] == ["resume", 4]  # not 6 (other target), 7 (other shape), 8 (other run), 9 (truncated)
    assert out["retrain"] == ["train", None]
    assert out["finished_in_memory"] == ["reuse", 10] and out["finished_on_disk"] == ["reuse", 10]
    assert out["finished_other_steps"] == ["train", None]
    assert out["other_run"] == ["resume", 8]
    assert out["misnamed"] == ["train", None]
    assert out["other_version"] == ["train", "trained 10 steps (the checkpoint at step 5 of this run was written by "
                                   "another version of Kiln's training code, so it is not resumed automatically; "
                                   "Load Checkpoint continues it)"]
    assert out["snapshots"] == [6, 8]
    assert out["kept"] == 16
    assert out["kept_by_bytes"] == [4, 19]  # within 2 runs' bytes: the one to keep, then the most recent
