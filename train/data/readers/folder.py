"""`folder`: an image folder (`ROOT/<class>/<pictures>`, or the pictures themselves; `ROOT/train` beside
`ROOT/test` for a test split), decoded once into `data.cache_dir` (train/data/pictures.py)."""

from __future__ import annotations

from pathlib import Path

from train.config import DataConfig
from train.data import pictures
from train.data.readers._base import Read, Reader


class Folder(Reader):
    def read(self, cfg: DataConfig, split: str, labelled: bool) -> Read:
        decoded = pictures.read_folder(Path(cfg.path), split, cfg.resolution, cfg.channels, Path(cfg.cache_dir))
        return Read(decoded.images, len(decoded.classes), decoded.labels if labelled else None)

    def has_test_split(self, cfg: DataConfig) -> bool:
        return (Path(cfg.path) / "test").is_dir()

    def identity(self, data: dict) -> tuple[str, str, str | None]:
        return Path(data["path"]).name, "image-folder", None


READER = Folder()
