"""Models and data files from the Hugging Face Hub, downloaded with `huggingface_hub`.

`download_model(repo_id, revision)` fetches only what the runtime reads, in
two steps: first `config.json`, whose architecture is checked against the
ones this project runs (runtime/checkpoints/config_schema.py) before any weights are
fetched; then the weights in one format (the safetensors file or shards with
their index; `pytorch_model.bin` or its shards only when the repository has
no safetensors), the tokenizer files and `generation_config.json`. Other
weight formats (`*.msgpack`, `*.h5`, `*.onnx`, GGUF, ...) are never requested.

Everything goes through `huggingface_hub.snapshot_download` /
`hf_hub_download`, so the usual Hugging Face settings apply: the shared cache
(`HF_HOME`, `HF_HUB_CACHE`), `HF_TOKEN` or `hf auth login` for gated and
private repositories, `HF_HUB_OFFLINE=1` (only the cache is read),
`HF_ENDPOINT` (a mirror), its progress bars (`HF_HUB_DISABLE_PROGRESS_BARS`),
and its retries: a connection that breaks mid-file is resumed from where it
stopped, a few times, within the same run. A later call finds the files in the
cache and downloads nothing again.

Whatever goes wrong (offline with a cold cache, a rate limit, a gated
repository without a token, a repository or revision that does not exist, an
unsupported architecture, a download that broke off) becomes one UserError
line saying what to do.
"""
from __future__ import annotations

import contextlib
import fnmatch
import json
from pathlib import Path

from runtime.checkpoints.config_schema import check_config
from runtime.errors import UserError

SAFETENSORS_FILES = ("model.safetensors", "model.safetensors.index.json", "model-*-of-*.safetensors")
TORCH_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "pytorch_model-*-of-*.bin")
OTHER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "merges.txt",
               "special_tokens_map.json", "chat_template.jinja", "generation_config.json")


def matches(names, patterns) -> list[str]:
    """The names that match one of the glob `patterns`."""
    return [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]


def weight_patterns(repo_files: list[str] | None) -> tuple[str, ...]:
    """The weight files to fetch: safetensors when the repository has them, else pytorch_model.bin
    (both patterns when the file list is not known, as offline with a cache written by another tool)."""
    if repo_files is None:
        return SAFETENSORS_FILES + TORCH_FILES
    return SAFETENSORS_FILES if matches(repo_files, SAFETENSORS_FILES) else TORCH_FILES


def check_architecture(config_path: Path, repo_id: str) -> None:
    """UserError unless the downloaded config.json describes a model this project runs."""
    if not config_path.is_file():
        raise UserError(f"{repo_id} on the Hub has no config.json, so it is not a transformers model this "
                        f"project can run: give an OPT or Llama-architecture model")
    try:
        hf = json.loads(config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise UserError(f"{repo_id}/config.json is not valid JSON ({err}): the repository is broken") from None
    check_config(hf, f"{repo_id}/config.json (nothing else was downloaded)")


def cached_file_list(repo_id: str, commit: str, repo_type: str = "model") -> list[str] | None:
    """The file list of the repository at `commit` that snapshot_download cached, or None."""
    from huggingface_hub import get_cached_repo_tree
    from huggingface_hub.errors import CachedRepoTreeNotFoundError
    try:
        return [f.path for f in get_cached_repo_tree(repo_id, revision=commit, repo_type=repo_type)]
    except CachedRepoTreeNotFoundError:
        return None


def download_model(repo_id: str, revision: str | None = None) -> Path:
    """The local directory (a snapshot in the Hugging Face cache) of Hub model `repo_id` at `revision`
    (None: the default branch), with the files the runtime reads; downloaded once."""
    from huggingface_hub import snapshot_download
    with hub_errors(repo_id, revision):
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=["config.json"]))
        check_architecture(folder / "config.json", repo_id)
        commit = folder.name  # snapshots/<commit>: pin the second step to what the first one saw
        weights = weight_patterns(cached_file_list(repo_id, commit))
        folder = Path(snapshot_download(repo_id, revision=commit, allow_patterns=[*weights, *OTHER_FILES]))
    if not matches((p.name for p in folder.iterdir()), SAFETENSORS_FILES + TORCH_FILES):
        raise UserError(f"{repo_id} on the Hub has no model.safetensors or pytorch_model.bin weights (other "
                        f"formats are not read): give a repository with transformers weights")
    return folder


def download_dataset_file(repo_id: str, filename: str, revision: str | None = None) -> Path:
    """The local path (in the Hugging Face cache) of file `filename` of Hub dataset `repo_id`."""
    from huggingface_hub import hf_hub_download
    with hub_errors(repo_id, revision, repo_type="dataset"):
        return Path(hf_hub_download(repo_id, filename, repo_type="dataset", revision=revision))


def error_chain(err: BaseException) -> list[BaseException]:
    """`err` and the exceptions it was raised from or during, innermost last."""
    chain = []
    while err is not None and err not in chain:
        chain.append(err)
        err = err.__cause__ or err.__context__
    return chain


def explain(err: BaseException, repo_id: str, revision: str | None, repo_type: str) -> str | None:
    """One line saying what went wrong while fetching from the Hub and what to do; None when `err`
    is not a Hub or network failure."""
    import httpx2
    from huggingface_hub import constants
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        OfflineModeIsEnabled, RemoteEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)
    chain = error_chain(err)
    url = f"{constants.ENDPOINT}/{'datasets/' if repo_type == 'dataset' else ''}{repo_id}"
    cache = constants.HF_HUB_CACHE
    kind = "dataset" if repo_type == "dataset" else "model"
    status = next((e.response.status_code for e in chain if isinstance(e, HfHubHTTPError)
                   and e.response is not None), None)
    if any(isinstance(e, GatedRepoError) for e in chain):
        return (f"{repo_id} is a gated repository: accept its conditions on {url} while logged in, then give "
                f"a token of that account (HF_TOKEN=hf_... or `hf auth login`)")
    if any(isinstance(e, RevisionNotFoundError) for e in chain):
        return f"{repo_id} has no revision {revision!r} on the Hub: give a branch, tag or commit that exists"
    if any(isinstance(e, RemoteEntryNotFoundError) for e in chain):
        return f"{repo_id} on the Hub lacks a file the runtime needs: check the file name and the revision"
    if any(isinstance(e, RepositoryNotFoundError) for e in chain):
        where = "a local path, a name under models/ or " if kind == "model" else ""
        return (f"{kind} {repo_id!r} is neither {where}a repository on the Hub ({constants.ENDPOINT}): check the "
                f"spelling (org/name, e.g. facebook/opt-1.3b); a private repository needs HF_TOKEN")
    if status == 429:
        return (f"the Hub is rate-limiting downloads (429 Too Many Requests) of {repo_id}: wait a few minutes "
                f"and run again, or log in (HF_TOKEN or `hf auth login`) for a higher limit")
    if status in (401, 403):
        return (f"the Hub refused access to {repo_id} ({status}): check that HF_TOKEN (or `hf auth login`) holds "
                f"a valid token with read access to it")
    if constants.is_offline_mode() or any(isinstance(e, OfflineModeIsEnabled) for e in chain):
        return (f"{repo_id} is not (completely) in the Hugging Face cache {cache}, and HF_HUB_OFFLINE=1 forbids "
                f"downloading it: run once without HF_HUB_OFFLINE, or give a local directory")
    broken = [e for e in chain if isinstance(e, (httpx2.RemoteProtocolError, httpx2.ReadError,
                                                 httpx2.ReadTimeout))
              or (isinstance(e, OSError) and "Consistency check failed" in str(e))]
    if broken:
        return (f"the download of {repo_id} from the Hub broke off midway ({type(broken[0]).__name__}): run the "
                f"same command again to finish it (the files already complete stay in {cache})")
    if status is not None:
        return f"the Hub answered {status} for {repo_id}: try again later (see https://status.huggingface.co)"
    if any(isinstance(e, (httpx2.TransportError, LocalEntryNotFoundError)) for e in chain):
        return (f"cannot reach the Hub ({constants.ENDPOINT}) to download {repo_id}, and it is not in the "
                f"Hugging Face cache {cache}: check the network connection (or HF_ENDPOINT), or give a local "
                f"directory")
    return None


@contextlib.contextmanager
def hub_errors(repo_id: str, revision: str | None, repo_type: str = "model"):
    """Turn the failures of a Hub download inside the block into a one-line UserError."""
    try:
        yield
    except UserError:
        raise
    except Exception as err:  # huggingface_hub raises many kinds; `explain` sorts them or lets them through
        message = explain(err, repo_id, revision, repo_type)
        if message is None:
            raise
        raise UserError(message) from None
