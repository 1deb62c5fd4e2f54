"""nodes/corridor/compat.py: where ComfyUI versions differ, probed by capability (no ComfyUI needed for these)."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("kiln_compat_under_test", ROOT / "nodes" / "corridor" / "compat.py")
compat = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(compat)


class OldPatcher:  # ComfyUI 0.3.64: no Dynamic VRAM, clone() takes nothing
    def clone(self):
        return OldPatcher()


class Patcher:  # ComfyUI 0.33
    def __init__(self, dynamic: bool, reloadable: bool = True):
        self.dynamic, self.reloadable, self.cloned_with = dynamic, reloadable, None

    def is_dynamic(self):
        return self.dynamic

    def clone(self, disable_dynamic=False, force_deepcopy=False):
        if disable_dynamic and not self.reloadable:
            raise RuntimeError("cannot reload this model without its cached_patcher_init")
        clone = Patcher(self.dynamic and not disable_dynamic)
        clone.cloned_with = {"disable_dynamic": disable_dynamic, "force_deepcopy": force_deepcopy}
        return clone


def test_training_runs_on_a_plain_clone_unless_comfyui_streams_its_weights():
    """A clone (its own patches, for the per-clone weight wrappers; the same modules), never the user's patcher."""
    old, static = OldPatcher(), Patcher(dynamic=False)
    assert isinstance(compat.training_patcher(old), OldPatcher) and compat.training_patcher(old) is not old
    trainee = compat.training_patcher(static)
    assert trainee is not static and trainee.cloned_with == {"disable_dynamic": False, "force_deepcopy": False}


def test_a_dynamic_vram_model_trains_on_a_non_dynamic_clone():
    dynamic = Patcher(dynamic=True)
    trainee = compat.training_patcher(dynamic)
    assert trainee is not dynamic and not trainee.is_dynamic()
    assert trainee.cloned_with == {"disable_dynamic": True, "force_deepcopy": False}


def test_a_dynamic_model_comfyui_cannot_reload_is_a_clear_error():
    with pytest.raises(compat.DynamicVramUnsupported, match="cached_patcher_init"):
        compat.training_patcher(Patcher(dynamic=True, reloadable=False))


@pytest.mark.parametrize(("value", "visible"), [(None, None), (1, "1"), ("0,1", "0,1"), ("all", None), ("ALL", None)])
def test_cuda_device_values_of_both_versions(value, visible):
    assert compat.visible_devices(value) == visible


def test_a_cuda_device_that_is_no_device_id_is_refused_naming_it():
    with pytest.raises(ValueError, match="'abc' is not a device id"):
        compat.visible_devices("abc")
