"""The text data sets: where they live and how they are read.

`../shared/data` beside the project holds the real data (see its README):
the WikiText-2 raw test split for perplexity (Merity et al. 2016), read with
CRLF turned into LF as that README prescribes, and the tokenized validation
split that calibration uses by default.
"""
from pathlib import Path

from runtime.errors import UserError
from runtime.resolve import PROJECT_ROOT

DATA_DIR = PROJECT_ROOT.parent / "shared" / "data"
DATASETS = {"wikitext2": DATA_DIR / "wikitext-2-raw" / "wiki.test.raw"}
CALIBRATION_TEXT = DATA_DIR / "wikitext-2" / "wiki.valid.tokens"


def read_text(path: Path) -> str:
    """A UTF-8 text file with CRLF line ends turned into LF; UserError if it cannot be read."""
    try:
        return Path(path).read_bytes().decode("utf-8").replace("\r\n", "\n")
    except FileNotFoundError:
        raise UserError(f"text file {path} not found: check the path (data sets live in {DATA_DIR})") from None
    except UnicodeDecodeError as err:
        raise UserError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start})") from None


def load_dataset(name: str) -> str:
    """The evaluation text of data set `name`."""
    if name not in DATASETS:
        raise UserError(f"unknown data set {name!r}: choose one of {', '.join(DATASETS)}")
    return read_text(DATASETS[name])
