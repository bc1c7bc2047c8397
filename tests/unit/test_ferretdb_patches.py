"""FerretDB's build patches: each applies to the pinned module source, and builds are told apart."""

from __future__ import annotations

import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from stockflow.config import Settings
from stockflow.errors import ProvisionError
from stockflow.stack.ferretdb import MODULE, _binary_version
from stockflow.stack.ferretdb_patches import (
    BUILD,
    CAS_PATCHES,
    POOL_PATCHES,
    SPEED_PATCHES,
    WITHOUT_CAS,
    WITHOUT_POOL_FIX,
    Build,
    apply_patches,
)


def _module_source(version: str) -> Path | None:
    """The module's source in the local Go module cache, if Go and the download are there."""
    go = shutil.which("go")
    if go is None:
        return None
    cache = subprocess.run([go, "env", "GOMODCACHE"], capture_output=True, text=True).stdout
    escaped = "".join(f"!{c.lower()}" if c.isupper() else c for c in MODULE)
    source = Path(cache.strip()) / f"{escaped}@{version}"
    return source if source.is_dir() else None


def _writable_copy(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    for path in [target, *target.rglob("*")]:
        path.chmod(path.stat().st_mode | stat.S_IWUSR)
    return target


def test_every_patch_applies_once_to_the_pinned_version(tmp_path: Path) -> None:
    source = _module_source(Settings().ferretdb_version)
    if source is None:
        pytest.skip("FerretDB's module source is not in the Go module cache (no build yet)")
    copy = _writable_copy(source, tmp_path / "src")
    apply_patches(copy, BUILD.patches)
    update = (copy / "internal/handler/common/update.go").read_text()
    assert "OldDocs: []*types.Document{old}" in update
    assert "AND %s = $3" in (copy / "internal/backends/postgresql/collection.go").read_text()
    with pytest.raises(ProvisionError, match="expected code is not there"):
        apply_patches(copy, CAS_PATCHES)  # already applied: the anchors are gone


def _patched_files(source: Path, target: Path, build: Build) -> Path:
    """A writable copy of only the files ``build`` patches, with the patches applied."""
    for path in {patch.path for patch in build.patches}:
        (target / path).parent.mkdir(parents=True, exist_ok=True)
        (target / path).write_text((source / path).read_text())
    apply_patches(target, build.patches)
    return target


@pytest.mark.parametrize("build", [BUILD, WITHOUT_CAS, WITHOUT_POOL_FIX], ids=lambda b: b.tag)
def test_every_build_applies_to_the_pinned_version(tmp_path: Path, build: Build) -> None:
    source = _module_source(Settings().ferretdb_version)
    if source is None:
        pytest.skip("FerretDB's module source is not in the Go module cache (no build yet)")
    _patched_files(source, tmp_path, build)


def test_no_update_holds_a_query_open_while_it_writes(tmp_path: Path) -> None:
    """The deadlock fix in place, with the compare-and-set patch over it: each statement's
    query is read and closed before the first write or re-read, and closed per statement."""
    source = _module_source(Settings().ferretdb_version)
    if source is None:
        pytest.skip("FerretDB's module source is not in the Go module cache (no build yet)")
    handler = _patched_files(source, tmp_path, BUILD) / "internal/handler"

    update = (handler / "common/update.go").read_text()
    body = update[update.index("func UpdateDocument(") :]
    consumed = body.index("iterator.ConsumeValues(iter)")
    assert consumed < body.index("c.UpdateAll(") and consumed < body.index("c.InsertAll(")
    assert consumed < body.index("refetchForUpdate(ctx, c,")

    statements = (handler / "msg_update.go").read_text()
    loop = statements[statements.index("for _, u := range params.Updates {") :]
    loop = loop[: loop.index("return matched, modified, &upserted, nil")]
    assert not re.search(r"^\s*defer ", loop, re.MULTILINE)
    assert loop.index("closer.Close()") > loop.index("common.UpdateDocument(")

    find_and_modify = (handler / "msg_findandmodify.go").read_text()
    assert find_and_modify.index("iter.Close()") < find_and_modify.index("c.DeleteAll(")
    update_user = (handler / "msg_updateuser.go").read_text()
    assert update_user.index("qr.Iter.Close()") < update_user.index("usersCol.UpdateAll(")


def test_each_build_has_its_own_cache_folder_and_differs_by_one_patch_set() -> None:
    """``WITHOUT_CAS`` is the local build minus the compare-and-set patch only (the benchmark
    of its cost compares the two), ``WITHOUT_POOL_FIX`` the local build minus the deadlock
    fix only (the deadlock test runs it)."""
    assert len({BUILD.tag, WITHOUT_CAS.tag, WITHOUT_POOL_FIX.tag}) == 3
    assert all("-" not in b.tag for b in (BUILD, WITHOUT_CAS, WITHOUT_POOL_FIX))
    assert set(BUILD.patches) - set(WITHOUT_CAS.patches) == set(CAS_PATCHES)
    assert set(BUILD.patches) - set(WITHOUT_POOL_FIX.patches) == set(POOL_PATCHES)
    assert set(BUILD.patches) == set(SPEED_PATCHES + POOL_PATCHES + CAS_PATCHES)
    assert BUILD.patches.index(SPEED_PATCHES[-1]) < BUILD.patches.index(CAS_PATCHES[0])


def test_version_of_a_build_not_on_disk_does_not_raise(tmp_path: Path) -> None:
    """``stack status`` after an upgrade: the running build's binary may be the only one."""
    missing = tmp_path / "ferretdb-v1.24.2-stockflow9" / "ferretdb"
    assert _binary_version(str(missing)) == "FerretDB (unknown version)"
