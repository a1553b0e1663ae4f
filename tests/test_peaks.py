"""MFU's denominator: datasheet dense peaks by device name and precision, a labelled fallback elsewhere,
and `train.compile=auto` resolved by device."""

import logging

import pytest
import torch

from plait.train.config import ConfigError, compile_wanted, load_config, validate
from plait.train.peaks import datasheet_peak, matmul_precision, peak_flops

NAMES = [  # what torch.cuda.get_device_name returns on each board -> (pattern, bf16 TF, tf32 TF, fp32 TF)
    ("NVIDIA H100 80GB HBM3", "H100", 989.4, 494.7, 66.9),
    ("NVIDIA H100 PCIe", "H100 PCIe", 756.5, 378, 51.2),
    ("NVIDIA H100 NVL", "H100 NVL", 835.5, 417.5, 60),
    ("NVIDIA H200", "H200", 989.4, 494.7, 66.9),
    ("NVIDIA H200 NVL", "H200 NVL", 835.5, 417.5, 60),
    ("NVIDIA GH200 480GB", "GH200", 989.4, 494.7, 66.9),
    ("NVIDIA A100-SXM4-80GB", "A100", 312, 156, 19.5),
    ("NVIDIA A100 80GB PCIe", "A100", 312, 156, 19.5),
    ("NVIDIA L40S", "L40S", 362.05, 183, 91.6),
    ("NVIDIA B200", "B200", 2250, 1125, 75),
    ("NVIDIA GB200", "GB200", 2500, 1250, 90),
]


@pytest.mark.parametrize("name,pattern,bf16,tf32,fp32", NAMES, ids=[n[0] for n in NAMES])
def test_datasheet_peaks_by_device_name(name, pattern, bf16, tf32, fp32):
    for column, tera in (("bf16", bf16), ("tf32", tf32), ("fp32", fp32)):
        found, value = datasheet_peak(name, column)
        assert found == pattern and value == pytest.approx(tera * 1e12), (name, column)


def test_unlisted_devices_and_the_cpu_fall_back_to_a_labelled_measurement():
    assert datasheet_peak("NVIDIA GeForce GTX 1080", "bf16") is None
    value, source = peak_flops(torch.device("cpu"), "fp32")
    assert value > 0 and source.startswith("measured") and "train.peak_flops" in source
    assert peak_flops(torch.device("cpu"), "bf16", configured=5e12) == (5e12, "train.peak_flops")


def test_fp32_column_follows_torch_matmul_precision():
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert matmul_precision("fp32") == "fp32" and matmul_precision("bf16") == "bf16"
        assert matmul_precision("fp16") == "bf16"  # NVIDIA's dense fp16 and bf16 tensor-core peaks are one figure
        torch.set_float32_matmul_precision("high")
        assert matmul_precision("fp32") == "tf32"
    finally:
        torch.set_float32_matmul_precision(before)


def test_compile_auto_is_on_for_cuda_only_and_never_with_offload():
    assert compile_wanted("auto", "cuda", "none") == (True, "auto: on on cuda")
    assert compile_wanted("auto", "cpu", "none")[0] is False
    assert compile_wanted("auto", "cuda", "host")[0] is False
    assert compile_wanted(True, "cpu", "none")[0] is True  # a YAML bool arrives as "True"
    assert compile_wanted("false", "cuda", "none")[0] is False


@pytest.mark.parametrize("override,words", [("train.peak_flops=-1", "train.peak_flops=-1"),
                                            ("train.compile=sometimes", "train.compile=sometimes")])
def test_bad_peak_and_compile_are_refused(override, words):
    with pytest.raises(ConfigError, match=words):
        validate(load_config([override]))


@pytest.mark.gpu
def test_the_trainer_logs_the_datasheet_peak_on_cuda(caplog, tmp_path, stdlib_tokens):
    from plait.train.trainer import Trainer

    cfg = load_config(["model=tiny", "train.device=cuda", "train.steps=1", f"train.run_dir={tmp_path}",
                       f"data.cache_dir={stdlib_tokens[0].parent.parent}", "train.progress=false"])
    with caplog.at_level(logging.INFO, logger="plait"):
        trainer = Trainer(cfg)
    line = next(line for line in caplog.text.splitlines() if line.startswith("mfu: against"))
    known = datasheet_peak(torch.cuda.get_device_name(), "tf32") is not None
    assert ("datasheet" in line) == known, line
    trainer.close()
