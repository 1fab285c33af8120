"""Models and WikiText from the Hugging Face Hub, through the real huggingface_hub code, against a fake Hub.

tests/fake_hub.py serves a tiny random OPT and a tiny Llama saved with
transformers on 127.0.0.1; HF_ENDPOINT points there, HF_HOME and
QLLM_MODELS_DIR at temporary directories, so nothing reaches the network,
the real cache or models/. Each CLI runs in its own process (huggingface_hub
reads its settings when imported).
"""
import json
import os
import shutil

import pytest

from conftest import DATA, assert_fails_with, run_script, save_tiny_llama
from fake_hub import FakeHub

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pyarrow = pytest.importorskip("pyarrow")
import pyarrow.parquet  # noqa: E402  (after the skip above)

DECOYS = {"flax_model.msgpack": b"flax", "tf_model.h5": b"tf", "model.onnx": b"onnx", "onnx/decoder.onnx": b"onnx",
          "pytorch_model.bin": b"not read when safetensors exist", "README.md": b"# tiny", ".gitattributes": b""}
PROMPT = ("--temperature", "0", "--max-new-tokens", "6", "Hello there")


def save_tiny_opt(path):
    """A random tiny HF OPT with the GPT-2 byte-level BPE files (as vocab.json + merges.txt)."""
    torch.manual_seed(0)
    config = transformers.OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=2,
                                    vocab_size=50272, max_position_embeddings=64, word_embed_proj_dim=32,
                                    bos_token_id=2, eos_token_id=2, pad_token_id=1, init_std=0.2)
    transformers.OPTForCausalLM(config).eval().save_pretrained(path)
    shutil.copy(DATA / "tokenizers" / "gpt2" / "encoder.json", path / "vocab.json")
    shutil.copy(DATA / "tokenizers" / "gpt2" / "vocab.bpe", path / "merges.txt")


def files_of(path) -> dict:
    return {str(p.relative_to(path)): p.read_bytes() for p in path.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def tiny_opt(tmp_path_factory):
    path = tmp_path_factory.mktemp("hub") / "tiny-opt"
    save_tiny_opt(path)
    return path


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("hub") / "tiny-llama"
    save_tiny_llama(path)
    return path


@pytest.fixture
def hub(tiny_opt, tiny_llama):
    with FakeHub(lifetime=300) as server:
        server.add("org/tiny-opt", {**files_of(tiny_opt), **DECOYS})
        server.add("org/tiny-llama", files_of(tiny_llama))
        yield server


def environment(hub, tmp_path, **extra) -> dict:
    """The environment of a CLI run against the fake Hub, with its own HF cache and models directory."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "QLLM_"))}
    env.update(HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf"), QLLM_MODELS_DIR=str(tmp_path / "models"),
               HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_PROGRESS_BARS="1", HF_HUB_VERBOSITY="error",
               NO_PROXY="127.0.0.1", no_proxy="127.0.0.1")
    env.update(extra)
    return env




def test_hub_name_builds_the_same_model_as_a_local_directory(hub, tiny_opt, tmp_path):
    env = environment(hub, tmp_path)
    from_hub = run_script("run.py", "--model", "org/tiny-opt.rtn4g32", *PROMPT, env=env)
    assert from_hub.returncode == 0, from_hub.stderr
    assert (tmp_path / "models" / "org--tiny-opt.rtn4g32" / "config.json").is_file()
    local = run_script("run.py", "--model", f"{tiny_opt}.rtn4g32", *PROMPT, env=env)
    assert local.returncode == 0, local.stderr
    assert from_hub.stdout.strip() and from_hub.stdout == local.stdout
    downloaded = hub.downloads()
    assert downloaded[0].endswith("/config.json")  # the architecture is checked before any weights
    assert sorted(p.rsplit("/", 1)[1] for p in downloaded) == sorted(
        ["config.json", "generation_config.json", "model.safetensors", "vocab.json", "merges.txt"])
    assert not [p for m, p in hub.requests if p.endswith((".msgpack", ".h5", ".onnx", ".bin", ".md"))]
    before = len(hub.requests)
    again = run_script("run.py", "--model", "org/tiny-opt.rtn4g32", *PROMPT, env=env)
    assert again.returncode == 0 and again.stdout == from_hub.stdout
    assert len(hub.requests) == before  # built once: the second call needs no Hub at all


def test_float_model_is_downloaded_once_then_runs_offline(hub, tiny_llama, tmp_path):
    env = environment(hub, tmp_path)
    first = run_script("run.py", "--model", "org/tiny-llama", *PROMPT, env=env)
    assert first.returncode == 0, first.stderr
    count = len(hub.downloads())
    second = run_script("run.py", "--model", "org/tiny-llama", *PROMPT, env=env)
    assert second.returncode == 0 and second.stdout == first.stdout
    assert len(hub.downloads()) == count  # nothing downloaded again
    local = run_script("run.py", "--model", str(tiny_llama), *PROMPT, env=env)
    assert local.stdout == first.stdout
    before = len(hub.requests)
    offline = run_script("run.py", "--model", "org/tiny-llama", *PROMPT, env=dict(env, HF_HUB_OFFLINE="1"))
    assert offline.returncode == 0 and offline.stdout == first.stdout, offline.stderr
    assert len(hub.requests) == before
    cold = run_script("run.py", "--model", "org/tiny-llama", "hi", env=environment(hub, tmp_path / "cold", HF_HUB_OFFLINE="1"))
    assert_fails_with(cold, "HF_HUB_OFFLINE=1 forbids downloading it")
    assert len(hub.requests) == before


def test_revision_is_honoured(hub, tmp_path):
    env = environment(hub, tmp_path)
    sha = hub.repos[("models", "org/tiny-llama")].sha
    assert run_script("run.py", "--model", f"org/tiny-llama@{sha}", *PROMPT, env=env).returncode == 0
    assert_fails_with(run_script("run.py", "--model", "org/tiny-llama@nope", "hi", env=env), "has no revision 'nope'")


def test_repository_that_does_not_exist(hub, tmp_path):
    assert_fails_with(run_script("run.py", "--model", "org/no-such-model", "hi", env=environment(hub, tmp_path)),
                      "is neither a local path, a name under models/ or a repository on the Hub")


def test_gated_repository_needs_a_token(hub, tiny_llama, tmp_path):
    hub.add("org/gated", files_of(tiny_llama), token="hf_secret")
    assert_fails_with(run_script("run.py", "--model", "org/gated", "hi", env=environment(hub, tmp_path)),
                      "is a gated repository")
    with_token = run_script("run.py", "--model", "org/gated", *PROMPT, env=environment(hub, tmp_path, HF_TOKEN="hf_secret"))
    assert with_token.returncode == 0, with_token.stderr


def test_rate_limit(hub, tiny_llama, tmp_path):
    hub.add("org/busy", files_of(tiny_llama), status=429)
    assert_fails_with(run_script("run.py", "--model", "org/busy", "hi", env=environment(hub, tmp_path)), "rate-limiting")


def test_unsupported_architecture_is_refused_before_the_weights(hub, tiny_llama, tmp_path):
    files = files_of(tiny_llama)
    config = json.loads(files["config.json"])
    files["config.json"] = json.dumps(dict(config, architectures=["BloomForCausalLM"], model_type="bloom")).encode()
    hub.add("org/bloom", files)
    assert_fails_with(run_script("run.py", "--model", "org/bloom", "hi", env=environment(hub, tmp_path)),
                      "unsupported architecture")
    assert [p.rsplit("/", 1)[1] for p in hub.downloads()] == ["config.json"]


def test_broken_download_is_reported_then_completed(hub, tiny_llama, tmp_path):
    repo = hub.add("org/flaky", files_of(tiny_llama), broken={"model.safetensors"})
    env = environment(hub, tmp_path)
    assert_fails_with(run_script("run.py", "--model", "org/flaky", "hi", env=env), "broke off midway")
    ranges = [p for m, p in hub.requests if m == "GET" and p.endswith("model.safetensors")]
    assert len(ranges) > 1  # huggingface_hub tried to resume before giving up
    repo.broken.clear()
    retry = run_script("run.py", "--model", "org/flaky", *PROMPT, env=env)
    assert retry.returncode == 0, retry.stderr
    assert retry.stdout == run_script("run.py", "--model", "org/tiny-llama", *PROMPT, env=env).stdout


def test_no_network_says_so(tmp_path):
    """An endpoint where nothing listens: the connection error, not a traceback."""
    with FakeHub(lifetime=30) as hub:
        env = environment(hub, tmp_path)
    assert_fails_with(run_script("run.py", "--model", "org/tiny-llama", "hi", env=env), "cannot reach the Hub")


def parquet_of(rows) -> bytes:
    sink = pyarrow.BufferOutputStream()
    pyarrow.parquet.write_table(pyarrow.table({"text": rows}), sink)
    return sink.getvalue().to_pybytes()


def test_wikitext_from_the_hub_when_shared_data_is_missing(hub, tiny_llama, tmp_path):
    test_rows = ["", " = Robert Boulter = \n", "", " Robert Boulter is an English film actor . \n"] * 40
    valid_rows = ["", " = Homarus gammarus = \n", " It is a <unk> lobster . \n"] * 30
    hub.add("Salesforce/wikitext", {"wikitext-2-raw-v1/test-00000-of-00001.parquet": parquet_of(test_rows),
                                    "wikitext-2-v1/validation-00000-of-00001.parquet": parquet_of(valid_rows)},
            kind="datasets")
    env = environment(hub, tmp_path, QLLM_DATA_DIR=str(tmp_path / "no-data"))
    joined = tmp_path / "joined.txt"
    joined.write_text("\n\n".join(test_rows), encoding="utf-8")
    args = ("--model", str(tiny_llama), "--seqlen", "16", "--json", "--no-resume")
    from_hub = run_script("eval.py", "--dataset", "wikitext2", *args, env=env)
    assert from_hub.returncode == 0, from_hub.stderr
    from_file = run_script("eval.py", "--dataset", str(joined), *args, env=env)
    assert json.loads(from_hub.stdout)["ppl"] == json.loads(from_file.stdout)["ppl"]
    calibration = run_script("-c", "from runtime.text.datasets import CALIBRATION_TEXT, read_text; "
                                 "print(repr(read_text(CALIBRATION_TEXT)))", env=env)
    assert calibration.returncode == 0, calibration.stderr
    assert calibration.stdout.strip() == repr("\n\n".join(valid_rows))
    assert not [p for m, p in hub.requests if "/resolve/" in p and "wikitext-2-raw-v1/test" not in p
                and "wikitext-2-v1/validation" not in p and "/datasets/" in p]
    nowhere = run_script("eval.py", "--dataset", "wikitext2", *args, env=environment(hub, tmp_path / "cold", QLLM_DATA_DIR=str(tmp_path / "no-data"), HF_HUB_OFFLINE="1"))
    assert_fails_with(nowhere, "could not be fetched from the Hub dataset Salesforce/wikitext")
    assert "--dataset FILE" in nowhere.stderr


@pytest.mark.parametrize("name,repo,revision,dir_name", [
    ("opt-1.3b", "facebook/opt-1.3b", None, "opt-1.3b"),
    ("facebook/opt-1.3b", "facebook/opt-1.3b", None, "opt-1.3b"),
    ("opt-1.3b@refs/pr/1", "facebook/opt-1.3b", "refs/pr/1", "opt-1.3b@refs--pr--1"),
    ("tinyllama-1.1b", "TinyLlama/TinyLlama-1.1B-Chat-v1.0", None, "tinyllama-1.1b"),
    ("org/name@v1.0", "org/name", "v1.0", "org--name@v1.0"),
    ("smollm2-135m", None, None, None), ("a/b/c", None, None, None), ("/abs/dir", None, None, None),
    ("org/name.", None, None, None), ("opt-1.3b@", None, None, None), ("org/..", None, None, None),
])
def test_hub_names(name, repo, revision, dir_name):
    from runtime.hub.resolve import hub_model
    ref = hub_model(name)
    assert (ref and (ref.repo_id, ref.revision, ref.dir_name)) == (repo and (repo, revision, dir_name))


def test_quantize_cli_takes_a_hub_base(hub, tmp_path):
    result = run_script("quantize.py", "--model", "org/tiny-llama", "--method", "rtn",
                 "--bits", "4", env=environment(hub, tmp_path))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "models" / "org--tiny-llama.rtn4" / "config.json").is_file()
