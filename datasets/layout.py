"""Where a segmentation tree keeps its images, masks, split lists and annotations.

Every dataset is read through a ``SegLayout``: one folder of ``<id><suffix>`` images, one folder of
``<id>.png`` class-index masks (optional for inference-only splits) and split lists
(``<split>.txt``, one id per line) looked up in an ordered list of folders. ``VOCLayout`` is the
PASCAL VOC tree; ``datasets.coco.COCOLayout`` maps a COCO 2014 root onto the same interface.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from datasets.files import first_few, image_size, read_rgb, stems
from toco.errors import DataError

SHIPPED_SPLITS = Path(__file__).resolve().parent / "splits"


def parse_split_file(path: Path) -> list[str]:
    """Ids of a split file in file order (blank lines skipped); DataError when unusable."""
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        raise DataError(f"split file {path} not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read split file {path}: {exc}") from exc
    names = []
    for number, line in enumerate(lines, start=1):
        name = line.strip()
        if not name:
            continue
        if len(name.split()) != 1:
            raise DataError(f"{path} line {number}: expected one image id, got {name!r}")
        names.append(name)
    return names


def duplicate_ids(names: list[str]) -> list[str]:
    """Ids listed more than once, in first-seen order."""
    return [n for n, count in Counter(names).items() if count > 1]


class SegLayout:
    """Common behaviour of dataset layouts; subclasses say where the folders are.

    Subclasses provide ``root`` (named in messages and cache keys), ``image_dir``, ``mask_dir``
    (None when the tree has no masks) and ``split_dirs`` (searched in order).
    """

    root: Path
    image_suffix: str = ".jpg"
    # True where annotation_labels() labels every id and masks exist for a subset only
    # (a tagged collection); otherwise every training id needs a mask or annotation file.
    masks_optional: bool = False

    @property
    def image_dir(self) -> Path:
        raise NotImplementedError

    @property
    def mask_dir(self) -> Path | None:
        raise NotImplementedError

    @property
    def split_dirs(self) -> tuple[Path, ...]:
        raise NotImplementedError

    def annotation_path(self, name: str) -> Path | None:
        """Per-image annotation file with object names (VOC XML), or None."""
        return None

    def annotation_labels(self) -> dict[str, list[int]] | None:
        """Image-level labels given by the dataset's annotations (COCO), or None."""
        return None

    def require_mask_dir(self) -> Path:
        mask_dir = self.mask_dir
        if mask_dir is None:
            raise DataError(f"{self.root} has no mask folder")
        return mask_dir

    def image_path(self, name: str) -> Path:
        return self.image_dir / f"{name}{self.image_suffix}"

    def read_image(self, name: str) -> Image.Image:
        """The image of ``name``, fully decoded, as RGB (DataError naming a broken file)."""
        return read_rgb(self.image_path(name))

    def image_size(self, name: str) -> tuple[int, int]:
        """(width, height) of the image of ``name`` as ``read_image`` gives it, from the header."""
        return image_size(self.image_path(name))

    def mask_names(self) -> set[str]:
        """Ids that have a mask file (none without a mask folder)."""
        mask_dir = self.mask_dir
        return stems(mask_dir, ".png") if mask_dir is not None else set()

    def notes(self) -> list[str]:
        """Facts worth a line in a check report that are not errors (files left out)."""
        return []

    def split_has_masks(self, split: str) -> bool:
        """Whether evaluating ``split`` scores masks; True here: a missing mask is an error."""
        return True

    def split_ids(self, split: str) -> tuple[list[str], Path]:
        """The ids of ``split`` as listed (repeats kept, unchecked) and the file listing them."""
        path = self.split_path(split)
        return parse_split_file(path), path

    def mask_path(self, name: str) -> Path:
        return self.require_mask_dir() / f"{name}.png"

    def available_splits(self) -> list[str]:
        found: set[str] = set()
        for folder in self.split_dirs:
            if folder.is_dir():
                found |= stems(folder, ".txt")
        return sorted(found)

    def split_path(self, split: str) -> Path:
        """The first ``<split>.txt`` along ``split_dirs``; DataError listing the known splits."""
        for folder in self.split_dirs:
            if (folder / f"{split}.txt").is_file():
                return folder / f"{split}.txt"
        known = ", ".join(self.available_splits()) or "none"
        where = ", ".join(str(d) for d in self.split_dirs)
        raise DataError(
            f"split file {self.split_dirs[0] / f'{split}.txt'} not found (splits in {where}: "
            f"{known})"
        )

    def present_images(self) -> set[str]:
        return stems(self.image_dir, self.image_suffix)

    def read_split(self, split: str) -> list[str]:
        """Ids of ``split`` in file order, checked: present, unique, non-empty, images exist."""
        names, path = self.split_ids(split)
        if not names:
            raise DataError(f"split file {path} lists no image ids")
        duplicates = duplicate_ids(names)
        if duplicates:
            raise DataError(
                f"split file {path} repeats {len(duplicates)} id(s): {first_few(duplicates)}"
            )
        present = self.present_images()
        missing = [n for n in names if n not in present]
        if missing:
            raise DataError(
                f"split file {path} names {len(missing)} image(s) missing from "
                f"{self.image_dir}: {first_few(missing)}"
            )
        return names


@dataclass(frozen=True)
class VOCLayout(SegLayout):
    """A PASCAL-VOC-style tree; construction checks the parts every use needs::

        root/JPEGImages/<id>.jpg
        root/SegmentationClassAug/<id>.png   (the SBD-augmented masks; preferred when present)
        root/SegmentationClass/<id>.png      (otherwise)
        root/Annotations/<id>.xml            (object names; labels where a mask is missing)
        root/ImageSets/Segmentation/<split>.txt, then ``shipped_splits``/<split>.txt

    Args:
        root: the tree's root folder (VOCdevkit/VOC2012 for PASCAL VOC).
        shipped_splits: split lists shipped with the project, used where the root has none
            (train_aug, ...); None for trees that bring all their lists.
    """

    root: Path
    shipped_splits: Path | None = field(default=SHIPPED_SPLITS / "voc")

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root).expanduser())
        if not self.root.is_dir():
            raise DataError(f"dataset root {self.root} does not exist or is not a folder")
        if not self.image_dir.is_dir():
            raise DataError(
                f"{self.image_dir} not found: a VOC-style root needs JPEGImages/, "
                "SegmentationClass[Aug]/ and ImageSets/Segmentation/"
            )

    @property
    def image_dir(self) -> Path:
        return self.root / "JPEGImages"

    @property
    def split_dir(self) -> Path:
        return self.root / "ImageSets" / "Segmentation"

    @property
    def split_dirs(self) -> tuple[Path, ...]:
        shipped = (self.shipped_splits,) if self.shipped_splits is not None else ()
        return (self.split_dir, *shipped)

    @property
    def mask_dir(self) -> Path | None:
        """SegmentationClassAug (the SBD-augmented masks) wins over SegmentationClass."""
        for name in ("SegmentationClassAug", "SegmentationClass"):
            if (self.root / name).is_dir():
                return self.root / name
        return None

    def require_mask_dir(self) -> Path:
        mask_dir = self.mask_dir
        if mask_dir is None:
            raise DataError(f"{self.root} has neither SegmentationClassAug/ nor SegmentationClass/")
        return mask_dir

    def annotation_path(self, name: str) -> Path | None:
        return self.root / "Annotations" / f"{name}.xml"
