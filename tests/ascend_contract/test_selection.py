"""Selection on vllm-ascend's NPU platform, through its whole config path: `NPUPlatform.check_and_update_config`
(with `_fix_incompatible_config`, which resets a user-selected backend), then vLLM's own selector
(`get_attn_backend`) with the NPU platform as the current platform."""

import importlib
import logging

import pytest
import torch
import vllm.platforms
from vllm.config import AttentionConfig, ModelConfig, VllmConfig, set_current_vllm_config
from vllm.v1.attention import selector
from vllm.v1.attention.backends.registry import AttentionBackendEnum
from vllm_ascend.device.hardware import AscendDeviceType
from vllm_ascend.platform import NPUPlatform

from conftest import vllm_030_names
from vllm_pfa.model_builder import build_model
from vllm_pfa_patches.platform import ascend_attn_backend_selection as patch

ASCEND_BACKEND = "vllm_ascend.attention.attention_v1.AscendAttentionBackend"


def _npu_config(backend: str | None, **model) -> VllmConfig:
    model_config = ModelConfig(model=str(build_model("tiny")), dtype="float16", max_model_len=1024, **model)
    config = VllmConfig(model_config=model_config, attention_config=AttentionConfig(backend=backend))
    config.device_config.device_type = "npu"  # built on CPU; vllm-ascend's fix-ups run only for NPU configs
    vllm_030_names(config)
    return config


@pytest.fixture
def npu_platform(monkeypatch):
    """Makes the NPU platform vLLM's current platform for selection (configs are built before, on CPU: torch here
    has no "npu" device)."""
    selector._cached_get_attn_backend.cache_clear()
    yield lambda: monkeypatch.setattr(vllm.platforms, "_current_platform", NPUPlatform())
    selector._cached_get_attn_backend.cache_clear()


def _selected(config: VllmConfig, npu_platform, **layer) -> type:
    NPUPlatform.check_and_update_config(config)
    npu_platform()
    with set_current_vllm_config(config):
        return selector.get_attn_backend(head_size=64, dtype=torch.float16, kv_cache_dtype="auto", **layer)


def test_patch_applies_to_the_verified_stack():
    assert patch.apply() is True  # idempotent: already applied by the plugin in conftest
    assert getattr(NPUPlatform.check_and_update_config.__func__, "__wrapped__", None) is not None
    assert getattr(NPUPlatform.get_attn_backend_cls.__func__, "__wrapped__", None) is not None


def test_vllm_ascend_alone_resets_the_selection():
    """Why the patch exists: vllm-ascend's own config path drops a user-selected backend."""
    config = _npu_config("PFA")
    NPUPlatform.check_and_update_config.__func__.__wrapped__(NPUPlatform, config)
    assert config.attention_config.backend is None


def test_pfa_survives_the_config_path_and_is_selected(npu_platform):
    backend = _selected(_npu_config("PFA"), npu_platform)
    assert f"{backend.__module__}.{backend.__qualname__}" == patch.PFA_ASCEND_BACKEND
    assert backend.get_name() == "PFA"


@pytest.mark.parametrize("backend", [None, "FLASH_ATTN"])
def test_without_pfa_vllm_ascend_selects_its_own(npu_platform, backend):
    selected = _selected(_npu_config(backend), npu_platform)
    assert f"{selected.__module__}.{selected.__qualname__}" == ASCEND_BACKEND


@pytest.mark.parametrize("layer", [dict(has_sliding_window=True), dict(attn_type="encoder_only")])
def test_sliding_window_and_encoder_only_are_selected(npu_platform, layer):
    assert _selected(_npu_config("PFA"), npu_platform, **layer).get_name() == "PFA"


def test_block_size_off_the_kernel_grid_is_refused_precisely():
    config = _npu_config("PFA")
    config.cache_config.block_size, config.cache_config.user_specified_block_size = 64, True
    NPUPlatform.check_and_update_config(config)
    assert config.cache_config.block_size == 128  # vllm-ascend moves every block size onto its kernel grid...
    selector_config = selector.AttentionSelectorConfig(head_size=64, dtype=torch.float16, kv_cache_dtype="auto",
                                                       block_size=64)
    with pytest.raises(ValueError, match=r"block_size not supported \(block_size 64; kernel block sizes \[128\]\)"):
        NPUPlatform.get_attn_backend_cls(AttentionBackendEnum["PFA"], selector_config)  # ...and PFA refuses others


@pytest.mark.parametrize("device,message", [
    (AscendDeviceType._310P, "cannot run on Atlas inference series \\(310P\\): the PFA spec allows only float16, "
                             "actual_seq_lengths=None"),
    (AscendDeviceType.A5, "cannot run on Ascend 950 \\(A5\\): the PFA spec does not list this product"),
])
def test_devices_outside_the_spec_are_refused_at_start_up(npu_platform, monkeypatch, device, message):
    device_config = importlib.import_module("vllm_ascend.device.device_config")
    monkeypatch.setattr(device_config, "get_ascend_device_type", lambda: device)
    with pytest.raises(ValueError, match=message):
        _selected(_npu_config("PFA"), npu_platform)


@pytest.mark.parametrize("vllm_version,vllm_ascend_version,ok", [
    ("0.32.0", "0.30.0rc2", True), ("0.30.0", "0.30.0rc2", True),
    ("0.31.0", "0.30.0rc2", False), ("0.30.0", "0.23.0.post1", False),
])
def test_version_guard(caplog, vllm_version, vllm_ascend_version, ok):
    patch.logger.addHandler(caplog.handler)  # vLLM's logger tree does not propagate to the root logger
    try:
        with caplog.at_level(logging.WARNING, logger=patch.logger.name):
            assert patch.stack_supported(vllm_version, vllm_ascend_version) is ok
    finally:
        patch.logger.removeHandler(caplog.handler)
    assert (f"not patching vllm-ascend {vllm_ascend_version} with vLLM {vllm_version}" in caplog.text) is not ok
