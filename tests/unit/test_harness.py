"""The test harness says why ComfyUI tests cannot run, once, naming what is missing (not one error per test)."""

from comfy_harness import comfyui_skip_reason, missing_requirements


def test_a_comfyui_whose_requirements_are_missing_is_one_reason_naming_the_packages(tmp_path):
    (tmp_path / "requirements.txt").write_text(
        "numpy>=1.25.0\nkiln-no-such-package==1.0  # a comment\n\n#non essential\nanother_missing_pkg\n")
    assert missing_requirements(tmp_path) == ["kiln-no-such-package", "another_missing_pkg"]
    reason = comfyui_skip_reason(tmp_path)
    assert "kiln-no-such-package, another_missing_pkg are not installed" in reason
    assert f"bash .ci/comfyui_deps.sh {tmp_path}" in reason


def test_no_comfyui_says_where_it_was_looked_for():
    assert "COMFYUI_PATH" in comfyui_skip_reason(None)
