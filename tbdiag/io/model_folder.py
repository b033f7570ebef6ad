"""The other files of a model folder — config, tokenizer, model card — found for copying beside new weights,
and what cannot be copied faithfully (weights in other formats, broken links, links to folders, deep folders)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path

from tbdiag.io.checkpoint import ST_INDEX, TORCH_INDEX
from tbdiag.errors import TbdiagError
from tbdiag.io.outputs import CHECKPOINT_SUFFIXES, FOLDER_DEPTH

WEIGHT_SUFFIXES = CHECKPOINT_SUFFIXES  # weights in any format: the output rule's list


def companions(folder: Path, own: Sequence[Path]) -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
    """The other files of a model folder, relative to it: (copied beside the pruned weights — config,
    tokenizer, generation config, model card, ``1_Pooling/config.json`` …; left out, each with why — weights
    in another format, which would not be pruned, broken links, links to folders, folders deeper than
    `FOLDER_DEPTH` levels). Hidden files and folders (``.git``, ``.cache``) are passed over, and so are the
    files in ``own`` (the shards and index that are written anew) and shard indexes.

    Raises:
        TbdiagError: a file or folder that cannot be read (the copy would silently miss it).
    """
    own_files = {p.resolve() for p in own}
    copied: list[str] = []
    left_out: list[tuple[str, str]] = []
    level = [folder]
    for depth in range(FOLDER_DEPTH + 1):
        below = []
        for sub in level:
            if depth == FOLDER_DEPTH:
                left_out.append((sub.relative_to(folder).as_posix(), f"a folder deeper than {FOLDER_DEPTH} levels"))
                continue
            for entry in _entries(sub):
                rel = entry.relative_to(folder).as_posix()
                if entry.name.startswith(".") or entry.resolve() in own_files or entry.name in (ST_INDEX, TORCH_INDEX):
                    continue
                if entry.is_symlink() and not entry.exists():
                    left_out.append((rel, "a broken link"))
                elif entry.is_dir() and entry.is_symlink():
                    left_out.append((rel, "a link to a folder"))
                elif entry.is_dir():
                    below.append(entry)
                elif entry.suffix.lower() in WEIGHT_SUFFIXES:
                    left_out.append((rel, "weights in another format, not pruned"))
                elif entry.is_file():
                    if not os.access(entry, os.R_OK):
                        raise TbdiagError(f"{entry}: cannot be read; the pruned folder would miss it: make it readable, "
                                          "or write the weights alone to a .safetensors file")
                    copied.append(rel)
        level = below
    return tuple(copied), tuple(left_out)


def _entries(folder: Path) -> list[Path]:
    try:
        return sorted(folder.iterdir())
    except OSError as exc:
        raise TbdiagError(f"{folder}: cannot be read ({exc.strerror or exc}); the pruned folder would miss its files: "
                          "make it readable, or write the weights alone to a .safetensors file") from None


def copy_companions(folder: Path, names: Sequence[str], to: Path) -> None:
    """Copy the files ``names`` (relative) of ``folder`` into ``to``; a link's target (Hugging Face cache
    snapshots link into a blob store) is copied as a file."""
    for rel in names:
        (to / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(folder / rel, to / rel)
