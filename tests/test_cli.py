"""`msa demo` and `msa bench` run on CPU at tiny sizes (they must work, not be fast)."""
import json

import pytest

pytest.importorskip("torch")

from msa_py import cli  # noqa: E402

# the torch tests' shape (test_torch_ops, test_backward): the CLI's graphs are theirs, compiled once per suite
TINY = ["--device", "cpu", "--heads", "8", "--kv-heads", "2", "--head-dim", "64", "--idx-dim", "32", "--topk", "4",
        "--block-size", "16", "--dtype", "float32"]


def test_demo_tiny(capsys):
    assert cli.main(["demo", "--tokens", "300", *TINY]) == 0
    out = capsys.readouterr().out
    for needle in ("MSA demo on CPU", "select (indexer, top-k)", "block attention", "MSA total",
                   "keys attended per query", "check vs float64 reference", "-> OK", "dense causal attention"):
        assert needle in out, needle


def test_bench_tiny(tmp_path, capsys):
    stem = tmp_path / "bench"
    assert cli.main(["bench", "--lengths", "128,200", "--repeats", "2", "--chunk", "64", "--scenario", "hot",
                     "--out", str(stem), *TINY]) == 0
    out = capsys.readouterr().out
    assert "x dense" in out and "wrote" in out
    res = json.loads(stem.with_suffix(".json").read_text())
    assert res["scenario"] == "hot" and res["config"]["topk"] == 4 and res["device"] == "cpu"
    assert [r["T"] for r in res["rows"]] == [128, 200]
    for r in res["rows"]:
        for key in ("select_ms", "invert_ms", "block_attention_ms", "combine_ms", "msa_ms", "msa_chunked_ms",
                    "dense_ms", "gather_ms", "select_tflops", "attention_tflops", "speedup_vs_dense",
                    "speedup_vs_gather", "keys_per_query", "invert_combine_pct"):
            assert key in r and r[key] > 0, key
        assert r["invert_combine_pct"] == pytest.approx(100 * (r["invert_ms"] + r["combine_ms"]) / r["msa_ms"])
        assert r["forced_pass"]  # topk 4 >= 1 sink + 2 local: the layer's stages are the forced pass's
    assert stem.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(res["model_load_s"]) >= {"select", "invert_skip_forced", "block_attention", "forced_combine", "msa"}


def test_bench_decode_tiny(tmp_path, capsys):
    stem = tmp_path / "decode"
    assert cli.main(["bench", "--decode", "--batches", "2", "--contexts", "96,160", "--n-new", "2", "--repeats", "2",
                     "--paged", "--kv-dtype", "fp8", "--index-dtype", "fp8", "--out", str(stem), *TINY]) == 0
    text = capsys.readouterr().out
    assert "x dense" in text and "e4m3 caches" in text and "FP8 indexer" in text
    res = json.loads(stem.with_suffix(".json").read_text())
    assert res["mode"] == "decode" and res["n_new"] == 2 and res["kv_fp8"]
    for r in res["rows"]:
        for key in ("msa_ms", "dense_ms", "speedup_vs_dense", "gbps", "gbytes_moved", "paged_ms", "fp8_ms",
                    "fp8_gbytes_moved"):
            assert key in r and r[key] > 0, key
        for key in ("fp8q_ms", "fp8q_speedup_vs_dense", "fp8q_plan_eager_ms"):  # the FP8 indexer's row and plan
            assert key in r and r[key] > 0, key
        assert r["paged_same_selection"] and 0.5 <= r["fp8_selection_overlap"] <= 1.0
        assert 0.5 <= r["fp8q_selection_overlap"] <= 1.0
        assert r["fp8_gbytes_moved"] < r["gbytes_moved"]
    assert stem.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_options_are_usage_errors(capsys):
    """A bad configuration stops before any compile, as argparse's usage error (exit 2) naming the option."""
    with pytest.raises(SystemExit) as e:
        cli.main(["demo", "--tokens", "64", *TINY[:-4], "--block-size", "24", "--dtype", "float32"])
    assert e.value.code == 2
    assert "block_size" in capsys.readouterr().err


def test_bench_backward_tiny(tmp_path, capsys):
    stem = tmp_path / "backward"
    assert cli.main(["bench", "--backward", "--lengths", "96", "--repeats", "2", "--out", str(stem), *TINY]) == 0
    assert "x dense f+b" in capsys.readouterr().out
    res = json.loads(stem.with_suffix(".json").read_text())
    assert res["mode"] == "backward"
    for key in ("fwd_ms", "bwd_ms", "fwd_bwd_ms", "dense_fwd_bwd_ms", "speedup_fwd_bwd", "bwd_tflops"):
        assert res["rows"][0][key] > 0, key


def test_bench_world_size_under_torchrun(tmp_path):
    """`msa bench --world-size 2` launched by torchrun (gloo on the CPU): the
    context- and tensor-parallel rows with the one-device baseline."""
    import subprocess
    import sys

    stem = tmp_path / "dist"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "msa_py", "bench",
           "--world-size", "2", "--lengths", "256", "--repeats", "1", "--out", str(stem), *TINY]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(stem.with_suffix(".json").read_text())
    row = res["rows"][0]
    assert res["world"] == 2 and row["T"] == 256
    for key in ("cp_ms", "dense_cp_ms", "tp_ms", "one_device_ms", "cp_speedup", "tp_over_ideal"):
        assert row[key] > 0, key


def test_length_lists_take_k_and_m():
    assert cli._lengths("4096, 32k,1M") == [4096, 32768, 1 << 20]
