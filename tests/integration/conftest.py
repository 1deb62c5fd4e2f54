"""Fixtures that run a real ComfyUI server with LoRA Kiln loaded. Skipped, loudly, when ComfyUI is absent."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from comfy_harness import (  # noqa: E402, F401
    REPO,
    ComfyServer,
    build_2026_files,
    build_tiny_checkpoint,
    comfyui_skip_reason,
    find_comfyui,
    make_images,
)

COMFY = find_comfyui()
SKIP_REASON = comfyui_skip_reason(COMFY)


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).parent
    for item in items:
        if Path(str(item.fspath)).parent == here:
            item.add_marker(pytest.mark.comfyui)
            if SKIP_REASON is not None:
                item.add_marker(pytest.mark.skip(reason=SKIP_REASON))


@pytest.fixture(scope="session")
def comfy_base(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("comfy_base")


@pytest.fixture(scope="session")
def sdxl_checkpoint(tmp_path_factory) -> Path:
    """A 152 M-parameter SDXL UNet with the full CLIP-L and CLIP-G: the stock loader detects it as SDXL."""
    return build_tiny_checkpoint(COMFY, tmp_path_factory.mktemp("xl") / "tiny_sdxl.safetensors", size="sdxl")


@pytest.fixture(scope="session")
def sd3_checkpoint(tmp_path_factory) -> Path:
    """A depth-2 SD3 MMDiT with the full CLIP-L and CLIP-G, no T5 and a 16-channel TAESD: loaded as SD3."""
    return build_tiny_checkpoint(COMFY, tmp_path_factory.mktemp("sd3") / "tiny_sd3.safetensors", size="sd3")


@pytest.fixture(scope="session")
def flux_files(tmp_path_factory) -> tuple[Path, Path]:
    """A FLUX.1-dev of one double- and one single-stream block (545 M parameters, bf16) for UNETLoader, and a
    16-channel TAESD for VAELoader. Its text encoder comes from the test-only TestTinyFluxCLIP node."""
    folder = tmp_path_factory.mktemp("flux")
    unet, vae = folder / "tiny_flux.safetensors", folder / "tiny_flux_vae.safetensors"
    build_tiny_checkpoint(COMFY, unet, size="flux", flags=("--vae", str(vae)))
    return unet, vae


@pytest.fixture(scope="session")
def chroma_files(tmp_path_factory) -> tuple[Path, Path]:
    """A Chroma of one double- and one single-stream block (631 M parameters, bf16) for UNETLoader, and a 16-channel
    TAESD for VAELoader. Its text encoder comes from the test-only TestTinyChromaCLIP node."""
    folder = tmp_path_factory.mktemp("chroma")
    unet, vae = folder / "tiny_chroma.safetensors", folder / "tiny_chroma_vae.safetensors"
    build_tiny_checkpoint(COMFY, unet, size="chroma", flags=("--vae", str(vae)))
    return unet, vae


@pytest.fixture(scope="session")
def server(comfy_base, tiny_checkpoint):
    srv = ComfyServer(COMFY, comfy_base, tiny_checkpoint)
    make_images(comfy_base / "input" / "shapes", n=4)
    srv.start()
    yield srv
    srv.stop()
    artifacts = REPO / "test-artifacts"
    artifacts.mkdir(exist_ok=True)
    (artifacts / "comfyui-server.log").write_text(srv.log())


@pytest.fixture(scope="session")
def families_2026_files(tmp_path_factory) -> dict[str, Path]:
    """ComfyUI v0.33's 2026 families: comfy_harness.FILES_2026, built once per session."""
    return build_2026_files(COMFY, tmp_path_factory.mktemp("f2026"))
