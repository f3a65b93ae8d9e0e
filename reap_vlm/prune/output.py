"""The output folder's safety: never the source, never an input, --force only over an earlier output, enough
disk; and the source's other files carried over."""

from __future__ import annotations

import shlex
import shutil
from pathlib import Path

from .. import outputs
from ..checkpoint.reader import INDEX_NAME
from ..errors import ReapError
from ..metadata import METADATA_NAME

PRUNING_RECORD = "pruning_record.json"

# ----------------------------------------------------------------------------------------------- other files

SKIPPED_FILES = {INDEX_NAME, METADATA_NAME, PRUNING_RECORD, "config.json"}
REAP_LEFTOVERS = ("reap_state", "reap_heatmap")  # reap.py's, should an older version have written them there


def files_to_carry(source: Path) -> list[Path]:
    """Everything in the source folder but weights, the index, config.json (rewritten), stale REAP files and
    hidden entries (download caches)."""
    return sorted(p for p in source.iterdir()
                  if not p.name.startswith(".") and p.name not in SKIPPED_FILES and p.suffix != ".safetensors"
                  and not p.name.startswith(REAP_LEFTOVERS))


def carry_files(paths: list[Path], out: Path) -> None:
    ignore = shutil.ignore_patterns("*.safetensors", ".*")  # no unpruned weights hide in subfolders
    for path in paths:
        if path.is_dir():
            shutil.copytree(path, out / path.name, ignore=ignore)
        else:
            shutil.copyfile(path, out / path.name)  # follows HF-cache symlinks: a real file in the output


def tree_size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


# ----------------------------------------------------------------------------------------------- safety checks

def check_output_location(source: Path, output: Path) -> None:
    """Refuse outputs that would write into the source or, with --force, delete it."""
    source, output = Path(source).resolve(), Path(output).resolve()
    if output == source:
        raise ReapError(f"output folder {output} is the source folder; choose another --output "
                        "(the source is never written)")
    if source in output.parents:
        raise ReapError(f"output folder {output} is inside the source folder {source}; choose a folder outside it")
    if output in source.parents:
        raise ReapError(f"output folder {output} contains the source folder {source}; replacing it would delete "
                        "the source — choose another --output")


def check_output_replaceable(output: Path, force: bool, protected: dict[str, Path | None]) -> None:
    """Refuse an output whose replacement would delete anything but an earlier pruned checkpoint.

    ``protected`` names inputs (the metadata being read, reap.py's output folder) that the output may not be
    or contain.  An existing output needs ``force``, and even then only an empty folder or one holding
    pruning_record.json (written by this module) is replaced."""
    output = Path(output)
    where = output.resolve()
    for what, path in protected.items():
        if path is None or not Path(path).exists():
            continue
        path = Path(path).resolve()
        if path == where or where in path.parents:
            raise ReapError(f"output folder {output} {'is' if path == where else 'contains'} {what} {path}; "
                            "replacing it would delete it — choose another --output")
    if not output.exists() and not output.is_symlink():
        return
    if not force:
        raise ReapError(f"output {output} already exists; pass --force to replace it or choose another folder")
    if output.is_dir() and (not any(output.iterdir()) or (output / PRUNING_RECORD).is_file()):
        return
    kind = "not a folder" if not output.is_dir() else f"a folder with no {PRUNING_RECORD}"
    raise ReapError(f"--force replaces only an empty folder or an earlier prune_model.py output, and {output} is "
                    f"{kind}; choose a new or empty --output folder, or delete {output} yourself if it is expendable")


def stale_partials(output: Path) -> list[tuple[Path, int]]:
    """Temporary folders beside ``output`` left by a killed run (fsutil.atomic_output_dir's ``.<name>.partial-*``
    and ``.<name>.old-*``), with their sizes."""
    output = Path(output).absolute()
    if not output.parent.is_dir():
        return []
    found = sorted(p for pattern in (f".{output.name}.partial-*", f".{output.name}.old-*")
                   for p in output.parent.glob(pattern) if p.is_dir() and not p.is_symlink())
    return [(p, tree_size(p)) for p in found]


def describe_stale(output: Path, stale: list[tuple[Path, int]]) -> str:
    """'2 stale temporary folders (12.30 GB) ...; delete them with rm -rf ...' for warnings and errors."""
    output = Path(output).absolute()
    kinds = sorted({p.name[len(output.name) + 2:].split("-")[0] for p, _ in stale})  # partial / old
    patterns = " ".join(shlex.quote(str(output.parent / f".{output.name}.")) + f"{kind}-*" for kind in kinds)
    total = sum(size for _, size in stale)
    plural = "s" if len(stale) > 1 else ""
    return (f"{len(stale)} stale temporary folder{plural} ({total / 1e9:.2f} GB) beside {output}, left by an "
            f"interrupted prune_model.py run; unless another prune is writing there now, delete "
            f"{'them' if plural else 'it'} with: rm -rf {patterns}")


def check_free_space(output: Path, needed: int, stale: list[tuple[Path, int]] | None = None) -> None:
    hint = f"; {describe_stale(output, stale)}" if stale else ""
    outputs.check_free_space(output, needed, "the pruned checkpoint", hint=hint)
