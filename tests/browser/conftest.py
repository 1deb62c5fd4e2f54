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
from comfy_harness import REPO, ComfyServer, comfyui_skip_reason, find_comfyui, make_images  # noqa: E402

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
    if reason := comfyui_skip_reason(find_comfyui(), "The browser tests"):
        return reason
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the 'playwright' Python package is missing (pip install -r requirements-dev.txt): browser tests did not run"
    if find_chromium() is None:
        return ("no Chromium binary (apt-get install chromium, or set KILN_CHROMIUM): the browser tests of the live "
                "view did not run")
    return None


SKIP_REASON = skip_reason()

# ---- a newer frontend package, to run the browser tests against it too (ComfyUI's --front-end-root).
# Install: pip install --target .frontend-new --no-deps comfyui-frontend-package==<version>; $KILN_NEW_FRONTEND_ROOT
# overrides the folder (the --target folder, or the package's static/ folder itself).
NEW_FRONTEND_DIR = REPO / ".frontend-new"


def stock_frontend_version() -> str | None:
    """The comfyui-frontend-package ComfyUI serves by default (the one installed for this interpreter)."""
    from importlib import metadata

    try:
        return metadata.version("comfyui-frontend-package")
    except metadata.PackageNotFoundError:
        return None


def newer_frontend() -> tuple[str, Path] | tuple[None, str]:
    """(version, static folder) of the newer frontend, or (None, why it is not used)."""
    configured = os.environ.get("KILN_NEW_FRONTEND_ROOT")
    root = Path(configured) if configured else NEW_FRONTEND_DIR
    static = root if (root / "index.html").is_file() else root / "comfyui_frontend_package" / "static"
    if not (static / "index.html").is_file():
        return None, (f"no newer ComfyUI frontend at {root} (pip install --target {root} --no-deps "
                      f"comfyui-frontend-package==<newest>, or set KILN_NEW_FRONTEND_ROOT)")
    version = "unknown"
    for meta in sorted(static.parents[1].glob("comfyui_frontend_package-*.dist-info/METADATA")):
        version = next((line.split(":", 1)[1].strip() for line in meta.read_text().splitlines()
                        if line.startswith("Version:")), version)
    stock = stock_frontend_version()
    if version != "unknown" and version == stock:
        return None, f"the frontend at {static} is {version}, the same as the stock one"
    return version, static


NEW_FRONTEND = newer_frontend()


def pytest_configure(config):
    config.addinivalue_line("markers", "browser: drives ComfyUI's frontend in headless Chromium")
    config.addinivalue_line("markers", "newest_frontend: also runs against the newer frontend package "
                                       "(.frontend-new/ or $KILN_NEW_FRONTEND_ROOT) when installed")


def pytest_generate_tests(metafunc):
    """Browser tests run on the stock frontend; those marked newest_frontend on the newer one too."""
    if "frontend" in metafunc.fixturenames:
        kinds = ["stock", "newest"] if metafunc.definition.get_closest_marker("newest_frontend") else ["stock"]
        metafunc.parametrize("frontend", kinds, indirect=True, scope="module")


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
        terminalreporter.write_line(f"!! browser tests SKIPPED: {SKIP_REASON}" if SKIP_REASON else
                                    f"!! {counts['skipped']} browser test(s) SKIPPED (reasons: pytest -rs)")
    version, where = NEW_FRONTEND
    terminalreporter.write_line(
        f"frontends: stock {stock_frontend_version()}; "
        + (f"newer {version} ({where})" if version else f"newer: NOT TESTED, {where}"))


@pytest.fixture(scope="module")
def frontend(request) -> str:
    """Which frontend the server serves: "stock" (ComfyUI's default) or "newest" (skipped when not installed)."""
    kind = getattr(request, "param", "stock")
    if kind == "newest" and NEW_FRONTEND[0] is None:
        pytest.skip(f"newer frontend not tested: {NEW_FRONTEND[1]}")
    return kind


@pytest.fixture(scope="module")
def comfy(tmp_path_factory, tiny_checkpoint, frontend):
    """A fresh server (own base directory) that shows no first-run template dialog, serving ``frontend``."""
    base = tmp_path_factory.mktemp(f"comfy_browser_{frontend}")
    extra = ["--front-end-root", str(NEW_FRONTEND[1])] if frontend == "newest" else []
    srv = ComfyServer(find_comfyui(), base, tiny_checkpoint, extra_args=extra)
    srv.frontend = frontend
    srv.frontend_version = NEW_FRONTEND[0] if frontend == "newest" else stock_frontend_version()
    make_images(base / "input" / "shapes", n=4)
    srv.start()
    try:
        code, _ = srv.post("/settings/Comfy.TutorialCompleted", True)
        assert code == 200
        yield srv
    finally:
        srv.stop()
        ARTIFACTS.mkdir(exist_ok=True)
        log = "comfyui-browser-server.log" if frontend == "stock" else f"comfyui-browser-server-{frontend}.log"
        (ARTIFACTS / log).write_text(srv.log())


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=find_chromium(), args=CHROMIUM_FLAGS)
        try:
            yield b
        finally:
            b.close()
