"""Which dataset folders a server may read and write (lora_core/folder_access.py), without ComfyUI."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lora_core.folder_access import (
    ALLOWED_FOLDERS_VAR,
    FolderAccess,
    is_loopback_address,
    is_within,
    listens_on_loopback_only,
    parse_allowed_folders,
)


@pytest.mark.parametrize("address", ["127.0.0.1", "127.5.6.7", "::1", "[::1]", "localhost", "LocalHost",
                                     " 127.0.0.1 ", "::ffff:127.0.0.1", "::1%lo"])
def test_loopback_addresses(address):
    assert is_loopback_address(address)


@pytest.mark.parametrize("address", ["0.0.0.0", "::", "192.168.1.20", "10.0.0.1", "128.0.0.1", "::ffff:10.0.0.1",
                                     "example.com", "localhost.example.com", "", "127.0.0.1.nip.io"])
def test_addresses_that_others_can_reach(address):
    assert not is_loopback_address(address)


@pytest.mark.parametrize(("listen", "local"), [
    ("127.0.0.1", True),  # ComfyUI's default
    ("127.0.0.1,::1", True),
    ("localhost", True),
    ("0.0.0.0,::", False),  # a bare --listen
    ("0.0.0.0", False),
    ("127.0.0.1,192.168.1.20", False),  # one reachable address is enough
    ("", False),  # aiohttp would bind every interface
    (None, False),
    (" , ", False),
])
def test_listen_values(listen, local):
    assert listens_on_loopback_only(listen) is local


def test_allowed_folders_are_split_on_the_path_separator_and_resolved(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    (tmp_path / "link").symlink_to(b, target_is_directory=True)
    value = f"{a}{os.pathsep}{os.pathsep} {tmp_path / 'link'} "
    assert parse_allowed_folders(value) == (a.resolve(), b.resolve())
    assert parse_allowed_folders(None) == () and parse_allowed_folders("") == ()


def test_a_relative_allowed_folder_is_refused_by_name():
    with pytest.raises(ValueError, match=r"'datasets'.*not an absolute path.*KILN_ALLOWED_FOLDERS="):
        parse_allowed_folders(f"/data{os.pathsep}datasets")


def test_within_resolves_dotdot_and_symlinks(tmp_path):
    root, outside = tmp_path / "input", tmp_path / "secret"
    (root / "cats").mkdir(parents=True)
    outside.mkdir()
    (root / "escape").symlink_to(outside, target_is_directory=True)
    assert is_within(root, [root]) and is_within(root / "cats", [root])
    assert is_within(root / "not_there_yet", [root])
    assert not is_within(root / ".." / "secret", [root])
    assert not is_within(root / "cats" / ".." / ".." / "secret", [root])
    assert not is_within(root / "escape", [root])  # a symlink inside input/ pointing outside
    assert not is_within(tmp_path / "input_other", [root])  # a prefix of the name is not a parent
    assert is_within(root / "escape", [outside])


def _access(tmp_path: Path, **kw) -> FolderAccess:
    return FolderAccess(comfy_roots=(tmp_path / "input", tmp_path / "models" / "loras"), input_dir=tmp_path / "input",
                        listen="0.0.0.0,::", local=False, **kw)


def test_a_reachable_server_refuses_other_folders_and_says_how_to_allow_them(tmp_path):
    access = _access(tmp_path)
    outside = tmp_path / "photos"
    message = access.refusal(outside)
    assert message is not None
    assert str(outside) in message and "'0.0.0.0,::'" in message
    assert f"{ALLOWED_FOLDERS_VAR}={outside.resolve()}" in message and str(tmp_path / "input") in message
    assert access.refusal(tmp_path / "input" / "cats") is None
    assert access.refusal(tmp_path / "models" / "loras" / "x") is None
    assert access.refusal(tmp_path / "input" / ".." / "photos") is not None


def test_a_symlink_is_named_with_where_it_leads(tmp_path):
    (tmp_path / "input").mkdir()
    (tmp_path / "photos").mkdir()
    (tmp_path / "input" / "link").symlink_to(tmp_path / "photos", target_is_directory=True)
    message = _access(tmp_path).refusal(tmp_path / "input" / "link")
    assert message is not None and f"resolves to {(tmp_path / 'photos').resolve()}" in message


def test_allowed_roots_and_local_servers_accept_other_folders(tmp_path):
    outside = tmp_path / "photos"
    assert _access(tmp_path, allowed_roots=(outside,)).refusal(outside / "cats") is None
    assert _access(tmp_path, allowed_roots=(tmp_path / "other",)).refusal(outside) is not None
    assert FolderAccess(comfy_roots=(), local=True).refusal(Path("/anything/at/all")) is None
