"""Data layer: the CTR dataset, the CoLLM-format loader/writer, raw converters, default paths."""

from .collm import liked_histories, load_collm_split, write_collm_split
from .dataset import PAD, SPLITS, CTRDataset, Split
from .paths import DATA_ENV, resolve_data_dir
from .raw import convert_amazon, convert_movielens

__all__ = [
    "CTRDataset",
    "DATA_ENV",
    "PAD",
    "SPLITS",
    "Split",
    "convert_amazon",
    "convert_movielens",
    "liked_histories",
    "load_collm_split",
    "resolve_data_dir",
    "write_collm_split",
]
