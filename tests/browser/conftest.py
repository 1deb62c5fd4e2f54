"""A real ComfyUI server with LoRA Kiln, and its frontend in headless Chromium (Debian's, driven by Playwright).

Skipped, loudly, when ComfyUI, the ``playwright`` package or a Chromium binary is missing: browser downloads are
impossible here, so the system browser is used (``apt-get install chromium``; ``$KILN_CHROMIUM`` overrides).
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
from comfy_harness import REPO, ComfyServer, build_tiny_checkpoint, find_comfyui, make_images  # noqa: E402

ARTIFACTS = REPO / "test-artifacts"
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


def find_chromium() -> str | None:
    for candidate in (os.environ.get("KILN_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
                      shutil.which("chromium-browser")):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


def skip_reason() -> str | None:
    if find_comfyui() is None:
        return ("ComfyUI NOT FOUND (COMFYUI_PATH, custom_nodes/.., ~/comfy/ComfyUI): the browser tests of the live "
                "view did not run")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the 'playwright' Python package is missing (pip install -r requirements-dev.txt): browser tests did not run"
    if find_chromium() is None:
        return ("no Chromium binary (apt-get install chromium, or set KILN_CHROMIUM): the browser tests of the live "
                "view did not run")
    return None


SKIP_REASON = skip_reason()


def pytest_configure(config):
    config.addinivalue_line("markers", "browser: drives ComfyUI's frontend in headless Chromium")


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).parent
    for item in items:
        if Path(str(item.fspath)).parent == here:
            item.add_marker(pytest.mark.browser)
            if SKIP_REASON:
                item.add_marker(pytest.mark.skip(reason=SKIP_REASON))


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    counts: dict[str, int] = {}
    for outcome in ("passed", "failed", "skipped", "error"):
        for rep in terminalreporter.stats.get(outcome, []):
            if "tests/browser/" in getattr(rep, "nodeid", "") and (rep.when == "call" or outcome in ("skipped", "error")):
                counts[outcome] = counts.get(outcome, 0) + 1
    if not counts:
        return
    terminalreporter.write_sep("=", "browser tests (live view in Chromium)")
    terminalreporter.write_line(
        f"browser tests: {counts.get('passed', 0)} passed, {counts.get('failed', 0)} failed, "
        f"{counts.get('error', 0)} errors, {counts.get('skipped', 0)} skipped"
    )
    if counts.get("skipped"):
        terminalreporter.write_line(f"!! browser tests SKIPPED: {SKIP_REASON}")


@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    """A fresh server (own base directory) that shows no first-run template dialog."""
    base = tmp_path_factory.mktemp("comfy_browser")
    ckpt = build_tiny_checkpoint(find_comfyui(), tmp_path_factory.mktemp("ckpt") / "tiny_sd15.safetensors")
    srv = ComfyServer(find_comfyui(), base, ckpt)
    make_images(base / "input" / "shapes", n=4)
    srv.start()
    try:
        code, _ = srv.post("/settings/Comfy.TutorialCompleted", True)
        assert code == 200
        yield srv
    finally:
        srv.stop()
        ARTIFACTS.mkdir(exist_ok=True)
        (ARTIFACTS / "comfyui-browser-server.log").write_text(srv.log())


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=find_chromium(), args=CHROMIUM_FLAGS)
        try:
            yield b
        finally:
            b.close()
