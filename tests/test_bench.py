"""Tests for the benchmark's logic (bench.py, bench_llamacpp.py, bench_models' model files), not its timings:
each engine's environment, the interleaved rounds, the rows and their llama.cpp anchors, the table's ratios,
the README update, llama.cpp's build flags, and the random models and GGUF the benchmark writes."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest

import bench
import bench_llamacpp
import bench_models
from bench import FLOAT, LLAMA_1B, LLAMA_CPP, OPT_1B, OURS, SMOLLM, Row
from runtime.errors import UserError
from runtime.checkpoints.gguf_io import load_gguf
from runtime.text.tokenizer import Tokenizer


def tiny_config(model_type: str = "llama") -> dict:
    """A config of one of the benchmark's shapes, made tiny (the vocabulary stays the tokenizer's)."""
    if model_type == "opt":
        return dict(bench_models.hf_config(OPT_1B), hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                    num_attention_heads=4, word_embed_proj_dim=64, max_position_embeddings=256)
    return dict(bench_models.hf_config(LLAMA_1B), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)


def stats(decode, prefill=100.0, rss=500.0, bits=4.0):
    return {"decode": decode, "prefill": prefill, "rss": rss, "import_rss": 80.0, "bits": bits, "file_mb": 1.0,
            "decode_range": (decode - 1, decode + 1)}


def test_llama_cpp_environment_lacks_our_variables():
    environ = {"OMP_WAIT_POLICY": "PASSIVE", "OPENBLAS_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "7",
               "NUMBA_CACHE_DIR": "/x", "PATH": "/usr/bin", "HOME": "/root"}
    env = bench.engine_environment(LLAMA_CPP, 2, environ)
    assert env == {"PATH": "/usr/bin", "HOME": "/root"}
    ours = bench.engine_environment(OURS, 2, environ)
    assert ours == {"PATH": "/usr/bin", "HOME": "/root", "NUMBA_NUM_THREADS": "2"}  # runtime sets the rest itself
    assert environ["OMP_WAIT_POLICY"] == "PASSIVE"  # the caller's environment is left alone


def test_measurement_processes_get_their_engines_environment(monkeypatch):
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "1")
    monkeypatch.setenv("NUMBA_OPT", "0")
    show = [sys.executable, "-c", "import json, os; print('noise'); print(json.dumps(dict(os.environ)))"]
    llama_env = bench.run_json(show, LLAMA_CPP, 2)
    assert not {"OMP_WAIT_POLICY", "OPENBLAS_NUM_THREADS", "NUMBA_OPT", "NUMBA_NUM_THREADS"} & set(llama_env)
    ours_env = bench.run_json(show, OURS, 3)
    assert ours_env["NUMBA_NUM_THREADS"] == "3" and "OMP_WAIT_POLICY" not in ours_env


def test_a_failed_measurement_says_why():
    with pytest.raises(RuntimeError, match="boom"):
        bench.run_json([sys.executable, "-c", "import sys; sys.exit('boom')"], OURS, 2)


def test_rounds_interleave_the_rows():
    rows = [Row(OURS, SMOLLM, FLOAT), Row(LLAMA_CPP, SMOLLM, "Q4_1"), Row(OURS, SMOLLM, "rtn4g128")]
    order = bench.schedule(rows, 5)
    assert [row for _, row in order] == rows * 5
    assert [r for r, _ in order] == [r for r in range(5) for _ in rows]


def test_measure_commands_run_each_engine_in_its_own_file():
    ids = [1, 2, 3]
    ours = bench.measure_command(Row(OURS, LLAMA_1B, "rtn4g128"), Path("/m"), ids, 64, 2)
    llama = bench.measure_command(Row(LLAMA_CPP, LLAMA_1B, "Q4_0"), Path("/m.gguf"), ids, 64, 2)
    assert ours[1].endswith("bench.py") and ours[2:4] == ["--child", "/m"] and "1,2,3" in ours
    assert llama[1].endswith("bench_llamacpp.py") and llama[2:4] == ["measure", "/m.gguf"]
    assert llama[llama.index("--threads") + 1] == "2" and llama[llama.index("--steps") + 1] == "64"


def test_rows_cover_both_1b_shapes_and_label_random_codes():
    rows = bench.default_rows()
    names = [row.name for row in rows]
    assert len(set(rows)) == len(rows)
    for name in ("smollm2-135m.rtn4g128", "llama.cpp smollm2-135m.Q4_1", "tinyllama-1.1b", "tinyllama-1.1b.rtn4g128",
                 "llama.cpp tinyllama-1.1b.Q4_0", "llama.cpp tinyllama-1.1b.Q2_K", "llama.cpp tinyllama-1.1b.F16",
                 "opt-1.3b.rtn4g128"):
        assert name in names
    labels = {row.name: row.label for row in rows}
    assert labels["tinyllama-1.1b.quipsharp2"] == "tinyllama-1.1b.quipsharp2 (random codes)"
    assert labels["tinyllama-1.1b.gptq4g128"].endswith("(random codes)")
    assert labels["tinyllama-1.1b.rtn4g128"] == "tinyllama-1.1b.rtn4g128"  # RTN is quantized for real
    assert labels["smollm2-135m.gptq4g128"] == "smollm2-135m.gptq4g128"  # real models at 135M
    for row in rows:  # every anchor is a row of the benchmark
        assert bench.reference(row) is None or bench.reference(row) in rows


def test_each_row_is_compared_with_llama_cpp_at_its_size():
    ref = lambda base, kind: bench.reference(Row(OURS, base, kind))
    assert ref(SMOLLM, "quipsharp2") == Row(LLAMA_CPP, SMOLLM, "Q4_1")
    assert ref(LLAMA_1B, FLOAT) == Row(LLAMA_CPP, LLAMA_1B, "F16")
    assert ref(LLAMA_1B, "int8") == Row(LLAMA_CPP, LLAMA_1B, "Q8_0")
    assert ref(LLAMA_1B, "rtn4g128") == ref(LLAMA_1B, "nf4") == ref(LLAMA_1B, "spqr3") == Row(LLAMA_CPP, LLAMA_1B, "Q4_0")
    assert ref(LLAMA_1B, "rtn2g64") == ref(LLAMA_1B, "quipsharp2") == Row(LLAMA_CPP, LLAMA_1B, "Q2_K")
    assert ref(OPT_1B, "rtn4g128") is None  # llama.cpp runs no OPT
    assert bench.reference(Row(LLAMA_CPP, LLAMA_1B, "Q4_0")) is None


def test_selected_rows_bring_their_anchor():
    rows = bench.default_rows()
    chosen = bench.select(rows, "tinyllama-1.1b.rtn4g128, smollm2-135m")
    assert chosen == [Row(OURS, SMOLLM, FLOAT), Row(LLAMA_CPP, SMOLLM, "Q4_1"), Row(OURS, LLAMA_1B, "rtn4g128"),
                      Row(LLAMA_CPP, LLAMA_1B, "Q4_0")]
    assert bench.select(rows, None) == rows
    assert [row.name for row in bench.select(rows, "opt*")] == ["opt-1.3b"] + [f"opt-1.3b.{t}" for t in bench.OPT_1B_TAGS]
    with pytest.raises(UserError, match="matches no row"):
        bench.select(rows, "nothing*")


def parse_table(text: str) -> list[dict]:
    lines = [line.strip("|").split("|") for line in text.splitlines()]
    headers = [h.strip() for h in lines[0]]
    return [dict(zip(headers, (c.strip() for c in cells))) for cells in lines[2:]]


def test_table_ratios_come_from_the_measured_rows():
    measured = {Row(OURS, LLAMA_1B, FLOAT): stats(2.0, 30.0, 4500.0, 32.0),
                Row(OURS, LLAMA_1B, "rtn4g128"): stats(5.5, 38.0, 900.0, 4.2),
                Row(OURS, LLAMA_1B, "quipsharp2"): stats(3.0, 20.0, 700.0, 2.0),
                Row(LLAMA_CPP, LLAMA_1B, "Q4_0"): stats(19.2, 105.0, 800.0, 4.5),
                Row(LLAMA_CPP, LLAMA_1B, "Q2_K"): stats(22.8, 90.0, 600.0, 2.6)}
    rows = list(measured)
    table = {r["model"]: r for r in parse_table(bench.table(rows, measured))}
    rtn = table["tinyllama-1.1b.rtn4g128"]
    assert rtn["decode vs llama.cpp"] == f"{5.5 / 19.2:.2f}x" and rtn["llama.cpp row"] == "Q4_0"
    assert rtn["prefill vs llama.cpp"] == f"{38 / 105:.2f}x" and rtn["RSS vs llama.cpp"] == f"{900 / 800:.2f}"
    assert rtn["decode vs our float"] == f"{5.5 / 2.0:.2f}x" and rtn["decode tok/s"] == "5.5"
    assert rtn["RSS after import MB"] == "80" and rtn["decode min-max"] == "4.5-6.5"
    q2 = table["tinyllama-1.1b.quipsharp2 (random codes)"]
    assert q2["decode vs llama.cpp"] == f"{3.0 / 22.8:.2f}x" and q2["llama.cpp row"] == "Q2_K"
    assert table["llama.cpp tinyllama-1.1b.Q4_0"]["decode vs llama.cpp"] == ""
    assert table["tinyllama-1.1b"]["llama.cpp row"] == ""  # F16 not measured: no ratio
    assert "WikiText-2 ppl" not in rtn and "quantize s" not in rtn  # empty columns are left out


def test_medians_over_rounds():
    runs = [{"decode": d, "prefill": p, "rss": 100.0 + d} for d, p in ((5, 50), (1, 70), (3, 60), (9, 10), (4, 40))]
    m = bench.medians(runs)
    assert (m["decode"], m["prefill"], m["rss"], m["decode_range"]) == (4, 50, 104.0, (1, 9))


RUN = {"command": "python bench.py", "date": "2026-12-01", "machine": "AMD EPYC, 2 cores (avx512f)",
       "load": "0.10/0.20/0.30 when the run started and 0.40/0.30/0.20 when it ended", "threads": 2, "steps": 64,
       "rounds": 5, "cmake_args": "-DGGML_AMX_INT8=OFF",
       "llama_cpp": {"version": "0.3.36", "system_info": "CPU : AVX2 = 1 | AVX512 = 1"}}


def smollm_measured() -> dict:
    return {Row(OURS, SMOLLM, FLOAT): dict(stats(20.0, bits=32.0), ppl=20.8),
            Row(LLAMA_CPP, SMOLLM, "Q4_1"): dict(stats(70.0, bits=5.0), ppl=20.9, perf_prefill=280.0, perf_decode=72.0)}


def test_document_names_the_machine_and_llama_cpp_build():
    measured = smollm_measured()
    text = bench.document({SMOLLM: bench.section_record(SMOLLM, list(measured), measured, dict(RUN, note="Noted."))})
    assert "AMD EPYC, 2 cores" in text and "0.40/0.30/0.20 when it ended" in text and "0.3.36" in text
    assert "AVX512 = 1" in text and "-DGGML_AMX_INT8=OFF" in text and "5 rounds, 2 threads, 64 decode steps" in text
    assert "`llama_print_system_info()`: `CPU : AVX2 = 1 | AVX512 = 1`. Noted." in text
    assert "| llama.cpp smollm2-135m.Q4_1 | 100.0 | 280.0 | 70.0 | 72.0 |" in text
    assert "| smollm2-135m | 32.000 | 1.0 | 20.800 |" in text and f"{20 / 70:.2f}x" in text


def test_a_written_run_keeps_the_families_it_did_not_measure(tmp_path):
    old = smollm_measured()
    bench.save_records(bench.run_records(list(old), old, RUN), tmp_path)
    new = {Row(OURS, LLAMA_1B, FLOAT): stats(2.0, bits=32.0), Row(OURS, LLAMA_1B, "rtn4g128"): stats(5.5),
           Row(LLAMA_CPP, LLAMA_1B, "Q4_0"): dict(stats(19.2), perf_prefill=101.0, perf_decode=19.0)}
    bench.save_records(bench.run_records(list(new), new, dict(RUN, date="2026-12-02",
                                                              command="python bench.py --rows 'tinyllama*'")), tmp_path)
    assert list(bench.run_records(list(new), new, RUN)) == [LLAMA_1B]  # only the families measured
    records = bench.load_records(tmp_path)
    assert list(records) == [SMOLLM, LLAMA_1B] and records[SMOLLM]["date"] == "2026-12-01"
    for base, measured in ((SMOLLM, old), (LLAMA_1B, new)):  # saved and read back: the same table
        assert bench.table(*bench.record_rows(records[base])) == bench.table(list(measured), measured)
    text = bench.document(records)
    smollm, tinyllama = text.index("### SmolLM2"), text.index("### Llama with TinyLlama")
    assert smollm < text.index("on 2026-12-01:") < tinyllama < text.index("--rows 'tinyllama*'` on 2026-12-02")
    assert "| llama.cpp tinyllama-1.1b.Q4_0 | 100.0 | 101.0 | 19.2 | 19.0 |" in text
    readme = bench.readme_tables(records)
    assert readme.count("### ") == 2 and "on 2026-12-02" in readme and f"{5.5 / 19.2:.2f}x" in readme


def test_written_runs_measure_whole_families():
    rows = bench.default_rows()
    bench.check_whole_sections(rows, True)
    bench.check_whole_sections(bench.select(rows, "tinyllama*,opt*"), True)
    bench.check_whole_sections([row for row in bench.select(rows, "smollm2*") if row.engine == OURS], False)
    with pytest.raises(UserError, match="part of the tinyllama-1.1b rows .*--no-write"):
        bench.check_whole_sections(bench.select(rows, "tinyllama-1.1b.rtn*"), True)
    with pytest.raises(UserError, match="part of the smollm2-135m rows"):  # llama.cpp's row left out
        bench.check_whole_sections([row for row in bench.select(rows, "smollm2*") if row.engine == OURS], True)


def test_readme_tables_are_replaced_between_the_markers(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\nbefore\n{bench.README_START}\nold table\n{bench.README_END}\nafter\n")
    bench.update_readme(readme, "| new |\n")
    assert readme.read_text() == f"# x\n\nbefore\n{bench.README_START}\n\n| new |\n\n{bench.README_END}\nafter\n"
    readme.write_text("no markers\n")
    with pytest.raises(UserError, match="markers"):
        bench.update_readme(readme, "| new |\n")


def test_bad_options_are_one_line_errors():
    for option in ("--rounds", "--steps", "--threads"):
        with pytest.raises(UserError, match=f"{option} must be at least 1"):
            bench.main([option, "0", "--no-write"])


def test_cmake_args_keep_amx_off_and_name_the_cpu_features():
    avx512 = {"sse4_2", "avx", "avx2", "fma", "f16c", "bmi2", "avx512f", "avx512cd", "avx512vl", "avx512dq",
              "avx512bw", "avx512_vnni", "amx_tile", "amx_int8", "amx_bf16"}
    args = bench_llamacpp.cmake_args(avx512, "x86_64").split()
    assert "-DGGML_NATIVE=OFF" in args and "-DGGML_AVX512=ON" in args and "-DGGML_AVX512_VNNI=ON" in args
    assert {"-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF"} <= set(args)
    assert "-DGGML_AVX512_BF16=OFF" in args
    avx2 = bench_llamacpp.cmake_args({"avx", "avx2", "fma", "f16c", "avx512f"}, "x86_64").split()
    assert "-DGGML_AVX2=ON" in avx2 and "-DGGML_AVX512=OFF" in avx2  # AVX-512 needs all five base flags
    assert "-DGGML_NATIVE=ON" in bench_llamacpp.cmake_args(set(), "aarch64").split()


def test_random_gguf_loads_with_its_weights_and_vocabulary(tmp_path):
    config = tiny_config()
    tensors = bench_models.float_tensors(config)
    tokenizer_model = bench_models.tokenizer_files(config)[0]
    path = tmp_path / "tiny.F16.gguf"
    bench_models.write_llama_gguf(path, config, tensors, tokenizer_model)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary left
    read_config, read = load_gguf(path)
    assert set(read) == set(tensors)
    for name, value in tensors.items():
        np.testing.assert_allclose(read[name], value, atol=1e-4, rtol=1e-3, err_msg=name)  # float16 storage
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size"):
        assert read_config[key] == config[key]
    text = "The game began development in 2010, carrying over a large portion of the work."
    assert Tokenizer.load(path).encode(text) == Tokenizer.load(tokenizer_model).encode(text)


def test_random_models_are_saved_with_tokenizer_and_label(tmp_path):
    from pipeline.api import load_model
    for model_type in ("llama", "opt"):
        config = tiny_config(model_type)
        float_dir, packed_dir = tmp_path / f"{model_type}-float", tmp_path / f"{model_type}-q2"
        bench_models.save_random_model(float_dir, config)
        bench_models.save_random_model(packed_dir, config, "quipsharp2" if model_type == "llama" else "rtn2g64")
        quantization = json.loads((packed_dir / "config.json").read_text())["quantization"]
        assert quantization["random_codes"] is True and quantization["bits_per_weight"] > 2
        info = bench.size_info(Row(OURS, LLAMA_1B, "quipsharp2"), packed_dir)
        assert info["quant_s"] is None and info["bits"] == quantization["bits_per_weight"]
        assert bench.size_info(Row(OURS, LLAMA_1B, FLOAT), float_dir)["bits"] == 32.0
        for directory in (float_dir, packed_dir):
            ids = bench.prompt_ids(directory)
            assert len(ids) == bench.PREFILL_TOKENS and max(ids) < config["vocab_size"]
            model = load_model(directory)
            logits = model.prefill(ids[:8], model.new_cache(16))
            assert logits.shape == (config["vocab_size"],) and np.isfinite(logits).all()


@pytest.mark.slow
def test_our_measurement_process_reports_speed_and_memory(tmp_path):
    config = tiny_config()
    bench_models.save_random_model(tmp_path / "m", config, "rtn4g128")
    ids = bench.prompt_ids(tmp_path / "m")
    result = bench.run_json(bench.measure_command(Row(OURS, LLAMA_1B, "rtn4g128"), tmp_path / "m", ids, 3, 2), OURS, 2)
    assert result["decode"] > 0 and result["prefill"] > 0 and result["sampled"] > 0
    assert 0 < result["import_rss"] < result["jit_rss"] <= result["rss"]


@pytest.mark.slow
def test_llama_cpp_loads_quantizes_and_runs_the_random_gguf(tmp_path):
    pytest.importorskip("llama_cpp")
    config = tiny_config()
    f16 = tmp_path / "tiny.F16.gguf"
    bench_models.write_llama_gguf(f16, config, bench_models.float_tensors(config),
                                  bench_models.tokenizer_files(config)[0])
    q4 = tmp_path / "tiny.Q4_0.gguf"
    script = str(Path(bench.__file__).parent / "bench_llamacpp.py")
    bench.run_json([sys.executable, script, "quantize", str(f16), str(q4), "Q4_0"], LLAMA_CPP, 2)
    assert 0 < q4.stat().st_size < f16.stat().st_size
    ids = Tokenizer.load(f16).encode("The game began development in 2010")
    for path in (f16, q4):
        result = bench.run_json(bench.measure_command(Row(LLAMA_CPP, LLAMA_1B, "Q4_0"), path, ids, 3, 2), LLAMA_CPP, 2)
        assert result["decode"] > 0 and result["perf_decode"] > 0 and result["rss"] > result["import_rss"] > 0
    info = bench.llama_cpp_settings(2)
    assert info["version"] and "AMX_INT8 = 1" not in info["system_info"]


def test_prepare_builds_each_1b_row_once(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "CACHE", tmp_path)
    monkeypatch.setitem(bench_models.SHAPES, LLAMA_1B, tiny_config())
    monkeypatch.setitem(bench_models.SHAPES, OPT_1B, tiny_config("opt"))
    for row in (Row(OURS, LLAMA_1B, "rtn4g128"), Row(OURS, LLAMA_1B, "spqr3"), Row(OURS, OPT_1B, "nf4")):
        path = bench.prepare(row, 2)
        quantization = json.loads((path / "config.json").read_text())["quantization"]
        assert quantization.get("random_codes", False) == row.random_codes == (row.kind == "spqr3")
        assert path.name == (f"{row.name}-random" if row.random_codes else row.name)
        assert (tmp_path / row.base / "config.json").is_file()  # the float model they come from
    stamp = (tmp_path / f"{LLAMA_1B}.rtn4g128" / "model.safetensors").stat().st_mtime_ns
    assert bench.prepare(Row(OURS, LLAMA_1B, "rtn4g128"), 2).name == f"{LLAMA_1B}.rtn4g128"
    assert (tmp_path / f"{LLAMA_1B}.rtn4g128" / "model.safetensors").stat().st_mtime_ns == stamp  # reused
    gguf_path = bench.prepare(Row(LLAMA_CPP, LLAMA_1B, "F16"), 2)
    assert gguf_path == tmp_path / f"{LLAMA_1B}.F16.gguf" and load_gguf(gguf_path)[0]["vocab_size"] == 32000
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]


@pytest.mark.slow
def test_llama_cpp_reads_the_gguf_as_the_same_model(tmp_path):
    """llama.cpp's perplexity of the F16 GGUF equals ours on the same weights (scaled up so that attention, and so
    the RoPE order of Q and K rows, matters: writing them unpermuted moves llama.cpp's perplexity by 13%)."""
    pytest.importorskip("llama_cpp")
    from model import Config, Model
    from pipeline.perplexity import perplexity
    config = tiny_config()
    tensors = {k: v * 8 if v.ndim == 2 else v for k, v in bench_models.float_tensors(config).items()}
    windows = np.random.default_rng(0).integers(3, config["vocab_size"], size=(2, 128)).astype(np.int32)
    np.save(tmp_path / "windows.npy", windows)
    gguf_path = tmp_path / "tiny.F16.gguf"
    bench_models.write_llama_gguf(gguf_path, config, tensors, bench_models.tokenizer_files(config)[0])
    script = str(Path(bench.__file__).parent / "bench_llamacpp.py")
    theirs = bench.run_json([sys.executable, script, "perplexity", str(gguf_path), "--windows",
                             str(tmp_path / "windows.npy"), "--threads", "2"], LLAMA_CPP, 2)
    ours = perplexity(Model(Config.from_hf(config), tensors, np), windows.reshape(-1).tolist(), 128, 2, None,
                      progress=False)
    assert theirs["count"] == ours["tokens"] == 2 * 127
    assert theirs["ppl"] == pytest.approx(ours["ppl"], rel=2e-3)  # float16 weights on llama.cpp's side


def test_prepare_only_builds_and_measures_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench, "CACHE", tmp_path)
    monkeypatch.setitem(bench_models.SHAPES, LLAMA_1B, tiny_config())
    monkeypatch.setattr(bench, "llama_cpp_settings", lambda threads: None)  # as without llama-cpp-python
    monkeypatch.setattr(bench, "run_json", lambda command, engine, threads: pytest.fail(f"ran {command[1:3]}"))
    bench.main(["--rows", "tinyllama-1.1b.rtn4g128", "--prepare-only"])
    assert (tmp_path / f"{LLAMA_1B}.rtn4g128" / "config.json").is_file()
    assert "prepared 1 rows" in capsys.readouterr().out


def test_benchmarks_md_links_every_committed_gpu_run():
    lines = bench.gpu_section()
    runs = sorted((bench.PROJECT / "benchmarks").glob("gpu-*.md"))
    assert runs and lines[0] == "## GPU"
    for run in runs:
        assert any(f"(benchmarks/{run.name})" in line for line in lines)
