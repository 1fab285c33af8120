"""The text data sets: where they live and how they are read.

`../shared/data` beside the project (or the directory in the environment
variable QLLM_DATA_DIR) holds the real data (see its README): the WikiText-2
raw test split for perplexity (Merity et al. 2016), read with CRLF turned into
LF as that README prescribes, and the tokenized validation split that
calibration uses by default.

Without that directory (a clone on its own), the same two texts come from the
Hugging Face Hub dataset `Salesforce/wikitext` (runtime/hub/download.py; the parquet
files stay in the Hugging Face cache): the perplexity text is the
`wikitext-2-raw-v1` test split, the calibration text the `wikitext-2-v1`
validation split (the tokenized form, as ../shared's file), each with its rows
joined by "\\n\\n" as the GPTQ paper's code joins the test split. That text is
not byte for byte ../shared's: there the empty rows are dropped and lines end
in a single (CRLF) line break.

Any other UTF-8 text file can be given instead (`eval.py --dataset FILE`,
`quantize.py --calib FILE`); `read_text` refuses, in one line each, a file
that is missing, not a regular file, not UTF-8 (or binary), or empty.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from runtime.errors import UserError
from runtime.hub.resolve import PROJECT_ROOT

DATA_DIR = Path(os.environ.get("QLLM_DATA_DIR") or PROJECT_ROOT.parent / "shared" / "data").expanduser()
WIKITEXT2_TEST = DATA_DIR / "wikitext-2-raw" / "wiki.test.raw"
CALIBRATION_TEXT = DATA_DIR / "wikitext-2" / "wiki.valid.tokens"
DATASETS = {"wikitext2": WIKITEXT2_TEST}
HUB_DATASET = "Salesforce/wikitext"


@dataclass(frozen=True)
class HubText:
    """One split of one configuration of the Hub's WikiText, standing in for a file of ../shared."""
    config: str
    split: str
    what: str

    @property
    def filename(self) -> str:
        return f"{self.config}/{self.split}-00000-of-00001.parquet"


HUB_COPIES = {WIKITEXT2_TEST: HubText("wikitext-2-raw-v1", "test", "the perplexity text (WikiText-2 test)"),
              CALIBRATION_TEXT: HubText("wikitext-2-v1", "validation",
                                        "the calibration text (WikiText-2 validation)")}


def hub_text(source: HubText) -> str:
    """The rows of `source`, downloaded once into the Hugging Face cache, joined by "\\n\\n" (GPTQ's join)."""
    from runtime.hub.download import download_dataset_file
    try:
        path = download_dataset_file(HUB_DATASET, source.filename)
    except UserError as err:
        raise UserError(f"{source.what} is not in {DATA_DIR} and could not be fetched from the Hub dataset "
                        f"{HUB_DATASET} ({err}); or give a UTF-8 text file instead: eval.py --dataset FILE, "
                        f"quantize.py --calib FILE") from None
    try:
        import pyarrow.parquet
    except ImportError:
        raise UserError(f"reading {path} needs pyarrow: pip install -r requirements.txt") from None
    try:
        rows = pyarrow.parquet.read_table(path, columns=["text"]).column("text").to_pylist()
    except (OSError, KeyError, ValueError) as err:
        raise UserError(f"{path} is not the parquet file of {HUB_DATASET} it should be ({err}); "
                        f"delete it and run again") from None
    return "\n\n".join(row or "" for row in rows)


def read_text(path: Path, what: str = "text file",
              fix: str = "give the path of a UTF-8 text file") -> str:
    """The text of a UTF-8 file with CRLF line ends turned into LF; for a missing data file of ../shared,
    its copy from the Hub. UserError naming `what` and ending in `fix` if there is no text to read."""
    path = Path(path)
    if not path.exists() and path in HUB_COPIES:
        return hub_text(HUB_COPIES[path])
    if not path.exists():
        raise UserError(f"{what} {path} does not exist: {fix}")
    if not path.is_file():
        problem = "is a directory" if path.is_dir() else "is not a regular file"
        raise UserError(f"{what} {path} {problem}: {fix}")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"{what} {path} is not UTF-8 text ({err.reason} at byte {err.start}): {fix}") from None
    if "\0" in text:
        raise UserError(f"{what} {path} is binary (it holds NUL bytes), not text: {fix}")
    if not text.strip():
        raise UserError(f"{what} {path} is empty: {fix}")
    return text.replace("\r\n", "\n")


def load_dataset(name: str) -> str:
    """The evaluation text of data set `name` (a key of DATASETS) or of the text file at path `name`."""
    if name in DATASETS:
        return read_text(DATASETS[name], f"data set {name}")
    path = Path(name).expanduser()
    if not path.exists() and not path.suffix and os.sep not in name:
        raise UserError(f"--dataset {name}: not a data set ({', '.join(DATASETS)}) and no such file: give "
                        f"wikitext2 or the path of a UTF-8 text file")
    return read_text(path, "--dataset", "give wikitext2 or the path of a UTF-8 text file")
