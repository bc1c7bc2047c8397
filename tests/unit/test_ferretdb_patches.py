"""FerretDB's build patches: each applies to the pinned module source, and builds are told apart."""

from __future__ import annotations

import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from stockflow.config import Settings
from stockflow.errors import ProvisionError
from stockflow.stack.ferretdb import MODULE, _binary_version
from stockflow.stack.ferretdb_patches import BUILD, CAS_PATCHES, WITHOUT_CAS, apply_patches


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


def test_the_compare_and_set_build_has_its_own_cache_folder() -> None:
    assert BUILD.tag != WITHOUT_CAS.tag
    assert set(WITHOUT_CAS.patches) < set(BUILD.patches)
    assert set(CAS_PATCHES) <= set(BUILD.patches)


def test_version_of_a_build_not_on_disk_does_not_raise(tmp_path: Path) -> None:
    """``stack status`` after an upgrade: the running build's binary may be the only one."""
    missing = tmp_path / "ferretdb-v1.24.2-stockflow9" / "ferretdb"
    assert _binary_version(str(missing)) == "FerretDB (unknown version)"
