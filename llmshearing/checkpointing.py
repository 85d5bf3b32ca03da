"""Crash-safe checkpoint files for Composer runs.

Composer 0.32 writes a checkpoint straight to its final name and then re-points ``latest-rank<r>.pt``
(remove, then symlink). A crash mid-write leaves a truncated ``ep0-ba<N>-rank0.pt`` behind, and the
resumed run then refuses to save batch N again ("may conflict with a future checkpoint"); a crash
between the remove and the symlink leaves no ``latest`` at all. This module makes the write atomic
(temporary name in the same folder, then ``os.replace``), removes temporary files a crash left behind,
and re-creates a missing ``latest`` symlink from the newest complete checkpoint, so ``autoresume``
always resumes from a complete checkpoint.

Sharded checkpoints (FSDP ``state_dict_type: sharded``) are folders ``ep<E>-ba<N>/`` with one ``__<rank>_0.distcp``
per rank and a ``.metadata`` that torch.distributed.checkpoint writes last, after every rank's shard: a folder
without it is a save a crash interrupted and is removed before the run resumes (``latest`` never points at it:
Composer moves the link only after a save completes).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

__all__ = ["CheckpointError", "PARTIAL_PREFIX", "check_checkpoint_file", "install_atomic_checkpoint_writes", "is_sharded_checkpoint",
           "repair_save_folder", "resume_checkpoint"]

log = logging.getLogger(__name__)

PARTIAL_PREFIX = ".partial-"
_CKPT = re.compile(r"^ep(\d+)-ba(\d+)-rank(\d+)\.pt$")
_SHARDED = re.compile(r"^ep(\d+)-ba(\d+)$")
SHARDED_METADATA = ".metadata"  # written last by torch.distributed.checkpoint


def is_sharded_checkpoint(path: str | Path) -> bool:
    """A complete sharded checkpoint folder (its ``.metadata`` written)."""
    return Path(path).is_dir() and (Path(path) / SHARDED_METADATA).is_file()


def install_atomic_checkpoint_writes() -> None:
    """Wrap Composer's checkpoint file writer so that a checkpoint file only ever exists complete."""
    from composer.utils import checkpoint

    original = checkpoint._write_checkpoint_file
    if getattr(original, "_llmshearing_atomic", False):
        return

    def write(state_dict: dict[str, Any], filename: str) -> None:
        path = Path(filename)
        tmp = path.with_name(PARTIAL_PREFIX + path.name)  # same folder (same filesystem), same suffix
        original(state_dict, str(tmp))
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)

    write._llmshearing_atomic = True  # type: ignore[attr-defined]
    checkpoint._write_checkpoint_file = write


def repair_save_folder(save_folder: str | Path) -> None:
    """Remove partial files of a crashed write; restore a missing ``latest-rank<r>.pt`` symlink."""
    folder = Path(save_folder)
    if not folder.is_dir():
        return
    for p in folder.glob(PARTIAL_PREFIX + "*"):
        log.warning("removing %s: a checkpoint write that did not complete", p)
        p.unlink(missing_ok=True)
    for p in folder.iterdir():
        if _SHARDED.match(p.name) and p.is_dir() and not p.is_symlink() and not is_sharded_checkpoint(p):
            log.warning("removing %s: a sharded checkpoint whose save did not complete (no %s)", p, SHARDED_METADATA)
            shutil.rmtree(p)
    newest: dict[int, tuple[int, int, str]] = {}
    for p in folder.iterdir():
        m = _CKPT.match(p.name)
        if m and p.is_file() and not p.is_symlink():
            ep, ba, rank = map(int, m.groups())
            newest[rank] = max(newest.get(rank, (-1, -1, "")), (ba, ep, p.name))
    sharded = [(int(m.group(2)), int(m.group(1)), p.name) for p in folder.iterdir()
               if (m := _SHARDED.match(p.name)) and is_sharded_checkpoint(p)]
    if sharded:  # rank 0's link points at the folder
        newest[0] = max(newest.get(0, (-1, -1, "")), max(sharded))
    for rank, (_, _, name) in newest.items():
        latest = folder / f"latest-rank{rank}.pt"
        if not latest.exists():
            log.warning("%s is missing (a crash while it was being updated): pointing it at %s", latest, name)
            latest.unlink(missing_ok=True)  # a dangling link
            latest.symlink_to(name)


def earlier_checkpoints(save_folder: str | Path, rank: int) -> list[Path]:
    """This rank's checkpoint files in ``save_folder``, oldest first (links such as ``latest-rank0.pt`` aside); of a
    sharded checkpoint, the rank's shard file in it (as Composer records what it saved)."""
    found = []
    for p in Path(save_folder).iterdir() if Path(save_folder).is_dir() else []:
        m = _CKPT.match(p.name)
        if m and int(m.group(3)) == rank and p.is_file() and not p.is_symlink():
            found.append((int(m.group(2)), int(m.group(1)), p))
        m = _SHARDED.match(p.name)
        if m and not p.is_symlink() and is_sharded_checkpoint(p):
            found.append((int(m.group(2)), int(m.group(1)), p / f"__{rank}_0.distcp"))
    return [p for _, _, p in sorted(found)]


def adopt_earlier_checkpoints(saver: Any, save_folder: str | Path, rank: int) -> int:
    """Make Composer's ``CheckpointSaver`` count the checkpoints earlier attempts of the run left in
    ``save_folder``, so that ``save_num_checkpoints_to_keep`` holds across restarts (Composer counts only the
    checkpoints its own process wrote: three restarts with 2 to keep left 5). Returns how many were adopted."""
    known = {str(Path(p)) for p in saver.saved_checkpoints}
    earlier = [str(p) for p in earlier_checkpoints(save_folder, rank) if str(p) not in known]
    saver.saved_checkpoints[:0] = earlier
    return len(earlier)


class CheckpointError(RuntimeError):
    """A checkpoint to resume from is missing or unreadable."""


def resume_checkpoint(save_folder: str | None, load_path: str | None, autoresume: bool) -> Path | None:
    """The local checkpoint file a run will load (autoresume's latest, else ``load_path``), if any."""
    if autoresume and save_folder:
        latest = Path(save_folder) / "latest-rank0.pt"
        if latest.exists():  # a sharded (folder) checkpoint is read by Composer, each rank its shard
            return latest.resolve() if latest.resolve().is_file() else None
    if load_path and "://" not in load_path and not Path(load_path).is_dir():
        return Path(load_path)
    return None


def check_checkpoint_file(path: str | Path, model_config: dict[str, Any] | None = None) -> None:
    """Cheap checks of a ``torch.save`` checkpoint before the Trainer loads it.

    Reads the zip directory (at the end of the file), so a file cut short by a crash or an incomplete
    copy is reported with its name and the fix, instead of a deserialisation traceback; with
    ``model_config``, also unpickles the checkpoint memory-mapped (tensors are not read) and compares
    the model shape it was written for.

    Raises:
        CheckpointError: missing, not a torch zip archive, or truncated.
        ValueError: written for another model shape.
    """
    import zipfile

    path = Path(path)
    fix = ("delete it and point latest-rank0.pt at the previous checkpoint (or set load_path to an earlier "
           "one), or start a new run in another save_folder")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; set load_path to an existing checkpoint file")
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(f"checkpoint {path} is damaged or truncated ({e}); {fix}") from None
    if not any(n.endswith("data.pkl") for n in names):
        raise CheckpointError(f"checkpoint {path} is not a torch.save archive (no data.pkl); {fix}")
    if model_config is not None:
        from llmshearing.callbacks.checkpoint_metadata import check_same_shape
        from llmshearing.export import load_composer_checkpoint

        try:
            state = load_composer_checkpoint(path)  # memory-mapped: the tensors are not read
        except ValueError as e:
            raise CheckpointError(f"{e}; {fix}") from None
        meta = (state.get("callbacks") or {}).get("CheckpointMetadata")
        if meta:
            check_same_shape(meta.get("hf_config", {}), model_config)
