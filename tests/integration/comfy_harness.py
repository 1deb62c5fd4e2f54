"""Start a real ComfyUI server headless on loopback with LoRA Kiln as a custom node, and talk to it.

Everything the server writes lives in a temporary ``--base-directory`` (models, input, output, custom_nodes),
so a test run never touches the ComfyUI checkout it uses.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


def load_workflow_format():
    """headless/workflow_format.py has no ComfyUI import; load it by path (the package needs ComfyUI)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("kiln_workflow_format", REPO / "headless" / "workflow_format.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def find_comfyui() -> Path | None:
    """``$COMFYUI_PATH``, else the ComfyUI containing this checkout, else ``~/comfy/ComfyUI`` (kiln.py's rule)."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from kiln import find_comfyui as find

    return find()


def require_comfyui() -> Path:
    """The ComfyUI to benchmark on (found like the tests), or exit 2 saying how to point at one (the bench scripts)."""
    comfy = find_comfyui()
    if comfy is None:
        raise SystemExit("ComfyUI not found: set COMFYUI_PATH (or install this package in ComfyUI/custom_nodes, or "
                         "extract ComfyUI into ~/comfy/ComfyUI)")
    return comfy


def missing_requirements(comfy: Path) -> list[str]:
    """ComfyUI's requirements (its requirements.txt) that this Python lacks, by distribution name: a server started
    without them dies at start-up, which would show as one error per test instead of one clear reason."""
    import importlib.metadata
    import re

    missing = []
    for line in (comfy / "requirements.txt").read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        name = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", line)
        if not name:
            continue
        try:
            importlib.metadata.distribution(name.group(0))
        except importlib.metadata.PackageNotFoundError:
            missing.append(name.group(0))
    return missing


def comfyui_skip_reason(comfy: Path | None, what: str = "The ComfyUI integration tests") -> str | None:
    """Why the tests that need a ComfyUI server cannot run here (None: they can)."""
    if comfy is None:
        return (
            "ComfyUI NOT FOUND: set COMFYUI_PATH, install this package under ComfyUI/custom_nodes, or extract ComfyUI "
            f"into ~/comfy/ComfyUI (see README, 'Running the tests'). {what} did not run."
        )
    if missing := missing_requirements(comfy):
        return (
            f"ComfyUI at {comfy} cannot start in this Python: its requirements {', '.join(missing)} are not installed "
            f"(bash .ci/comfyui_deps.sh {comfy} installs them for a CPU test machine; see README, 'Running the "
            f"tests'). {what} did not run."
        )
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Result:
    prompt_id: str
    status: str
    messages: list[tuple[str, Any]] = field(default_factory=list)
    previews: list[bytes] = field(default_factory=list)
    history: dict[str, Any] = field(default_factory=dict)

    def of_type(self, kind: str) -> list[Any]:
        return [d for t, d in self.messages if t == kind]

    @property
    def error(self) -> dict[str, Any] | None:
        errs = self.of_type("execution_error")
        return errs[0] if errs else None


class ComfyServer:
    def __init__(self, comfy: Path, base: Path, checkpoint: Path, extra_args: tuple[str, ...] | list[str] = (),
                 cpu: bool = True) -> None:
        self.comfy = comfy
        self.cpu = cpu  # False: ComfyUI's own device choice (the GPU benchmarks)
        self.extra_args = list(extra_args)  # more main.py flags, e.g. ["--front-end-root", <static dir>]
        self.base = base
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        for sub in ("custom_nodes", "models/checkpoints", "models/loras", "input", "output", "temp", "user"):
            (base / sub).mkdir(parents=True, exist_ok=True)
        link = base / "custom_nodes" / "lora-kiln"
        if not link.exists():
            link.symlink_to(REPO, target_is_directory=True)
        fixtures = base / "custom_nodes" / "kiln_test_fixtures"  # test-only nodes (a tiny FLUX text encoder)
        if not fixtures.exists():
            fixtures.symlink_to(REPO / "tests" / "fixture_nodes" / "kiln_test_fixtures", target_is_directory=True)
        ckpt = base / "models" / "checkpoints" / "tiny_sd15.safetensors"
        if not ckpt.exists():
            os.link(checkpoint, ckpt) if checkpoint.stat().st_dev == base.stat().st_dev else shutil.copy(checkpoint, ckpt)
        self.log_path = base / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None

    # ---- lifecycle ----
    def start(self, timeout: float = 180) -> None:
        log = open(self.log_path, "ab")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "main.py", *(["--cpu"] if self.cpu else []), "--listen", "127.0.0.1", "--port", str(self.port),
             "--base-directory", str(self.base), "--disable-auto-launch", "--preview-method", "none",
             *self.database_args(), *self.extra_args],
            cwd=self.comfy, stdout=log, stderr=subprocess.STDOUT, env=env,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            try:
                self.get("/system_stats")
                return
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.5)
        raise RuntimeError(f"ComfyUI did not answer within {timeout}s:\n{self.log()[-4000:]}")

    def database_args(self) -> list[str]:
        """ComfyUI >= 0.3.7x keeps an SQLite database, by default inside the ComfyUI checkout (read-only for tests):
        put it in the base directory when this ComfyUI has the flag."""
        if "--database-url" in (self.comfy / "comfy" / "cli_args.py").read_text(encoding="utf-8"):
            return ["--database-url", f"sqlite:///{self.base / 'user' / 'comfyui.db'}"]
        return []

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # ---- HTTP ----
    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return json.loads(r.read() or b"null")

    def post(self, path: str, body: Any) -> tuple[int, Any]:
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                raw = r.read()
                return r.status, json.loads(raw) if raw else None
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null")

    def interrupt(self) -> None:
        self.post("/interrupt", {})

    def defaults(self, node_type: str) -> dict[str, Any]:
        """The inputs a freshly placed ``node_type`` has (every input with a default, from /object_info)."""
        info = self.get(f"/object_info/{node_type}")[node_type]["input"]
        return {name: spec[1]["default"] for group in ("required", "optional")
                for name, spec in info.get(group, {}).items()
                if len(spec) > 1 and isinstance(spec[1], dict) and "default" in spec[1]}

    # ---- running workflows ----
    def run(self, prompt: dict[str, Any], timeout: float = 600, on_message: Any = None,
            extra_data: dict[str, Any] | None = None) -> Result:
        import websocket

        client_id = uuid.uuid4().hex
        ws = websocket.create_connection(f"ws://127.0.0.1:{self.port}/ws?clientId={client_id}", timeout=timeout)
        try:
            body: dict[str, Any] = {"prompt": prompt, "client_id": client_id}
            if extra_data:
                body["extra_data"] = extra_data
            code, answer = self.post("/prompt", body)
            if code != 200:
                raise PromptRejected(code, answer)
            pid = answer["prompt_id"]
            result = Result(pid, "running")
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                ws.settimeout(max(1.0, deadline - time.monotonic()))
                frame = ws.recv()
                if isinstance(frame, bytes):
                    (event,) = struct.unpack(">I", frame[:4])
                    if event == 1:
                        result.previews.append(frame[8:])
                        result.messages.append(("preview_image", {"bytes": len(frame) - 8}))
                    elif event == 3:
                        (n,) = struct.unpack(">I", frame[4:8])
                        result.messages.append(("progress_text", {"node": frame[8:8 + n].decode(),
                                                                  "text": frame[8 + n:].decode()}))
                    continue
                msg = json.loads(frame)
                kind, data = msg["type"], msg.get("data", {})
                if isinstance(data, dict) and data.get("prompt_id") not in (None, pid):
                    continue
                result.messages.append((kind, data))
                if on_message is not None:
                    on_message(kind, data)
                if kind in ("execution_success", "execution_error", "execution_interrupted"):
                    result.status = kind.split("_", 1)[1]
                    break
                if kind == "executing" and data.get("node") is None and data.get("prompt_id") == pid:
                    result.status = "success" if result.status == "running" else result.status
                    break
            else:
                raise TimeoutError(f"prompt {pid} did not finish in {timeout}s")
        finally:
            ws.close()
        for _ in range(50):
            hist = self.get(f"/history/{pid}")
            if hist:
                result.history = hist[pid]
                break
            time.sleep(0.1)
        return result


class PromptRejected(Exception):
    def __init__(self, code: int, body: Any) -> None:
        super().__init__(f"/prompt answered {code}: {json.dumps(body)[:2000]}")
        self.code = code
        self.body = body


def build_tiny_checkpoint(comfy: Path, out: Path, size: str = "tiny", flags: tuple[str, ...] = ()) -> Path:
    """nodes/tiny_checkpoint.py in a subprocess (``flags``: e.g. ``("--ztsnr",)`` for a v-prediction SDXL)."""
    if out.exists():
        return out
    env = {**os.environ, "COMFYUI_PATH": str(comfy), "PYTHONPATH": str(comfy)}
    subprocess.run([sys.executable, str(REPO / "nodes" / "tiny_checkpoint.py"), str(out), "--size", size, *flags],
                   check=True, env=env, cwd=comfy)
    return out


def make_images(folder: Path, n: int = 4, size: tuple[int, int] = (64, 64), captions: bool = True) -> Path:
    """Small, distinct, learnable images (coloured shapes) with captions."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    colours = [(220, 40, 40), (40, 200, 60), (40, 80, 220), (230, 200, 30), (200, 40, 200), (30, 200, 200)]
    for i in range(n):
        img = Image.new("RGB", size, (245, 245, 240))
        d = ImageDraw.Draw(img)
        c = colours[i % len(colours)]
        w, h = size
        d.ellipse([w * 0.2, h * 0.2, w * 0.8, h * 0.8], fill=c)
        img.save(folder / f"img_{i:02d}.png")
        if captions:
            (folder / f"img_{i:02d}.txt").write_text(f"a kilnshape circle, colour {i}", encoding="utf-8")
    return folder


def load_api(name: str) -> dict:
    return json.loads((REPO / "example_workflows" / "api" / f"{name}.json").read_text())


def tiny_train_workflow(name: str, **train_overrides) -> dict:
    """The shipped example, pointed at the tiny checkpoint and the test images, small and fast."""
    wf = load_api("train_sd15_lora")
    wf["1"]["inputs"]["ckpt_name"] = "tiny_sd15.safetensors"
    wf["2"]["inputs"].update(folder="shapes", resolution=64)
    wf["3"]["inputs"].update(name=name, rank=8, alpha=8.0)
    wf["4"]["inputs"].update(steps=8, learning_rate=1e-3, save_every=0, preview_every=0, preview_size=64,
                             preview_steps=2)
    wf["4"]["inputs"].update(train_overrides)
    wf["5"]["inputs"].update(filename=name)
    return wf


def text_to_image(loader_nodes: dict[str, Any], base: int, prefix: str, ksampler: dict[str, Any],
                  model: list | None = None, lora: str | None = None, negative: str | None = None,
                  guidance: float | None = None) -> dict[str, Any]:
    """One 64 x 64 image as a user's graph makes it from ``loader_nodes`` (MODEL at ``base``, CLIP at ``base + 1``,
    VAE at ``base + 2``): CLIPTextEncode (-> FluxGuidance ``guidance``), EmptySD3LatentImage, KSampler, VAEDecode,
    SaveImage ``base + 9``; the MODEL from the loader, through LoraLoaderModelOnly(``lora``), or from ``model``.
    ``negative``: its own prompt (real CFG), else the positive conditioning again."""
    i = [str(base + k) for k in range(10)]
    graph = dict(loader_nodes)
    model = model or [i[0], 0]
    if lora:
        graph[i[3]] = {"class_type": "LoraLoaderModelOnly", "inputs": {"model": model, "lora_name": lora,
                                                                        "strength_model": 1.0}}
        model = [i[3], 0]
    graph[i[4]] = {"class_type": "CLIPTextEncode", "inputs": {"text": "a kilnshape circle", "clip": [i[1], 0]}}
    positive = negative_link = [i[4], 0]
    if guidance is not None:
        graph[i[5]] = {"class_type": "FluxGuidance", "inputs": {"conditioning": [i[4], 0], "guidance": guidance}}
        positive = [i[5], 0]
    elif negative is not None:
        graph[i[5]] = {"class_type": "CLIPTextEncode", "inputs": {"text": negative, "clip": [i[1], 0]}}
        negative_link = [i[5], 0]
    graph.update({
        i[6]: {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        i[7]: {"class_type": "KSampler", "inputs": {**ksampler, "model": model, "positive": positive,
                                                    "negative": negative_link, "latent_image": [i[6], 0]}},
        i[8]: {"class_type": "VAEDecode", "inputs": {"samples": [i[7], 0], "vae": [i[2], 0]}},
        i[9]: {"class_type": "SaveImage", "inputs": {"images": [i[8], 0], "filename_prefix": prefix}},
    })
    return graph


def kiln_nodes(name: str, rank: int, alpha: float, model: list, clip: list, vae: list) -> dict[str, Any]:
    """Save LoRA ("5": fp32, with its checkpoint), Load Dataset ("6": the shapes folder at 64 px) and Inject LoRA ("7":
    attn+ff) around a Train Steps "4" the caller adds, for a model in separate files."""
    return {
        "5": {"class_type": "KilnSaveLoRA", "inputs": {"state": ["4", 0], "filename": name, "dtype": "fp32",
                                                       "save_checkpoint": True}},
        "6": {"class_type": "KilnLoadDataset", "inputs": {
            "folder": "shapes", "vae": vae, "clip": clip, "resolution": 64, "bucketing": True,
            "trigger_word": "", "repeats": 1, "caption_extension": ".txt", "on_error": "error"}},
        "7": {"class_type": "KilnInjectLoRA", "inputs": {
            "model": model, "name": name, "rank": rank, "alpha": alpha, "targets": "attn+ff", "algorithm": "lora",
            "conv_rank": 0, "dropout": 0.0, "init_lora": "none", "seed": 0, "train_text_encoder": False}},
    }


# the 2026 families' model files (ComfyUI v0.33+) -> their models folder: a tiny FLUX.2 (Klein-like, 1 M parameters;
# its detection reads real shapes) for UNETLoader, FLUX.2's tiny autoencoder (taef2: VAELoader finds its two halves in
# vae_approx), a 16-channel TAESD (Z-Image) and a tiny Wan 2.1 VAE (Qwen-Image). The tiny Z-Image / Qwen-Image networks
# and the Qwen text encoders come from the test-only fixture nodes (tests/fixture_nodes), which every ComfyServer loads.
# Wan (issue 23): a tiny Wan 2.1 T2V and Wan 2.2 5B for UNETLoader (their detection reads real shapes), and Wan 2.2's
# tiny autoencoder (TAEHV, 48 channels: the real Wan 2.2 VAE is 705 M parameters at any size ComfyUI detects).
FILES_2026 = {"tiny_flux2.safetensors": "diffusion_models", "taef2_encoder.safetensors": "vae_approx",
              "taef2_decoder.safetensors": "vae_approx", "tiny_taesd16.safetensors": "vae",
              "tiny_wan21.safetensors": "vae", "tiny_wan21_t2v.safetensors": "diffusion_models",
              "tiny_wan22_5b.safetensors": "diffusion_models", "tiny_taew22.safetensors": "vae"}


def build_2026_files(comfy: Path, folder: Path) -> dict[str, Path]:
    """:data:`FILES_2026` built into ``folder`` (once: files already there are kept), by name."""
    folder.mkdir(parents=True, exist_ok=True)
    build_tiny_checkpoint(comfy, folder / "tiny_flux2.safetensors", size="flux2",
                          flags=("--vae", str(folder / "taef2"), "--vae-kind", "taef2"))
    for kind in ("taesd16", "wan21", "taew22"):
        if not (folder / f"tiny_{kind}.safetensors").exists():
            build_tiny_checkpoint(comfy, folder / f"unused_{kind}.safetensors", size="flux2",
                                  flags=("--vae", str(folder / f"tiny_{kind}.safetensors"), "--vae-kind", kind))
    build_tiny_checkpoint(comfy, folder / "tiny_wan21_t2v.safetensors", size="wan21")
    build_tiny_checkpoint(comfy, folder / "tiny_wan22_5b.safetensors", size="wan22_5b")
    return {name: folder / name for name in FILES_2026}


def write_clip(path: Path, frames: int, fps: int = 16, size: tuple[int, int] = (64, 64), seed: int = 0,
               pts: list[int] | None = None) -> Path:
    """A short learnable clip (a coloured disc moving across a light background) written with PyAV: .mp4 (H.264),
    .webm (VP9) or .gif by the suffix. ``pts``: each frame's presentation time in milliseconds (a variable frame
    rate) instead of ``fps``."""
    from fractions import Fraction

    import av
    from PIL import Image, ImageDraw

    colours = [(220, 40, 40), (40, 200, 60), (40, 80, 220), (230, 200, 30)]
    images = []
    for i in range(frames):
        img = Image.new("RGB", size, (245, 245, 240))
        x = int(8 + (size[0] - 32) * i / max(1, frames - 1))
        ImageDraw.Draw(img).ellipse([x, 16, x + 24, 40], fill=colours[seed % len(colours)])
        images.append(img)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".gif":  # Pillow writes GIFs (PyAV's gif encoder wants palettised frames)
        images[0].save(path, save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0)
        return path
    codec = {".mp4": "libx264", ".webm": "libvpx-vp9", ".mov": "libx264"}[path.suffix.lower()]
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height = size
        stream.pix_fmt = "yuv420p"
        if pts is not None:
            stream.time_base = stream.codec_context.time_base = Fraction(1, 1000)
            stream.codec_context.options = {"bf": "0"}  # no B-frames: decode order = presentation order
        for i, img in enumerate(images):
            frame = av.VideoFrame.from_image(img)
            if pts is not None:
                frame.pts, frame.time_base = pts[i], Fraction(1, 1000)
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def link_models(files: dict[str, Path], base: Path, folders: dict[str, str]) -> None:
    """Each built file into server base ``base``'s models/<folders[name]> (a hard link when it can)."""
    for name, built in files.items():
        target = base / "models" / folders[name] / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            try:
                os.link(built, target)
            except OSError:
                shutil.copy(built, target)
