"""Selection on vllm-ascend's NPU platform, through its whole config path: `NPUPlatform.check_and_update_config`
(with `_fix_incompatible_config`, which resets a user-selected backend), then vLLM's own selector
(`get_attn_backend`) with the NPU platform as the current platform."""

import importlib
import importlib.metadata
from types import SimpleNamespace

import pytest
import torch
import vllm
import vllm.platforms
from vllm.config import AttentionConfig, ModelConfig, VllmConfig, set_current_vllm_config
from vllm.v1.attention import selector
from vllm.v1.attention.backends.registry import AttentionBackendEnum
from vllm_ascend.device.hardware import AscendDeviceType
from vllm_ascend.platform import NPUPlatform

from conftest import vllm_030_names
from vllm_pfa.model_builder import build_model
from vllm_pfa_patches.platform import ascend_attn_backend_selection as patch
from vllm_pfa_patches.versions import ALLOW_UNVERIFIED_ENV

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


@pytest.mark.parametrize("vllm_version,override,vllm_ascend_version,verified", [
    ("0.30.0", None, "0.30.0rc2", True),
    ("0.30.0+empty", None, "0.30.0rc2", True),  # vllm-ascend's images and source install (VLLM_TARGET_DEVICE=empty)
    ("0.30.1.dev12+g0123abc.empty", None, "0.30.0rc2", False),  # a dev build is its own release...
    ("0.30.1.dev12+g0123abc.empty", "0.30.0", "0.30.0rc2", True),  # ...unless VLLM_VERSION says which
    ("0.32.0", None, "0.30.0rc2", False),  # the CPU stack's vLLM: no vllm-ascend release pairs with it
    ("0.30.0", None, "0.23.0.post1", False),
    ("0.30.0", None, "0.30.0rc2+local", True),
])
def test_stack_is_compared_by_release_as_vllm_ascend_compares_it(monkeypatch, vllm_version, override,
                                                                  vllm_ascend_version, verified):
    monkeypatch.setattr(vllm, "__version__", vllm_version)
    monkeypatch.setattr(importlib.metadata, "version",
                        lambda name: vllm_ascend_version if name == "vllm-ascend" else None)
    if override:
        monkeypatch.setenv("VLLM_VERSION", override)
    else:
        monkeypatch.delenv("VLLM_VERSION", raising=False)
    assert patch.stack().is_verified is verified


def test_unverified_stack_refuses_pfa_at_start_up_naming_the_versions(npu_platform, monkeypatch):
    """The wrapped config path reads the stack when PFA is selected: without the opt-in, an error naming what is
    installed and what is verified, not vllm-ascend's own backend."""
    config, config_again = _npu_config("PFA"), _npu_config("PFA")  # built on CPU first, by the real version
    monkeypatch.setattr(vllm, "__version__", "0.31.0")
    monkeypatch.delenv("VLLM_VERSION", raising=False)
    monkeypatch.delenv(ALLOW_UNVERIFIED_ENV, raising=False)
    with pytest.raises(ValueError, match=r"not verified on this Ascend NPU stack \(vLLM 0\.31\.0, vllm-ascend "
                                         r"0\.30\.0rc2; verified: vLLM 0\.30\.0, vllm-ascend 0\.30\.0rc2\)"):
        NPUPlatform.check_and_update_config(config)
    monkeypatch.setenv(ALLOW_UNVERIFIED_ENV, "1")
    assert _selected(config_again, npu_platform).get_name() == "PFA"


@pytest.mark.parametrize("quantized,message", [
    ("c8", r"cannot run with the checkpoint's C8 \(int8\) KV-cache quantization"),
    ("mxfp8", r"cannot run with --kv-cache-dtype mxfp8"),
])
def test_quantized_kv_caches_are_refused_at_start_up(quantized, message):
    """vllm-ascend's C8 and MXFP8 KV caches swap each layer's impl class when its weights are created: PFA would
    silently leave the layers while its builder planned PFA. Refused in the config path, by name."""
    config = _npu_config("PFA")
    if quantized == "c8":
        object.__setattr__(config, "quant_config", SimpleNamespace(enable_c8_quant=True))
    else:
        object.__setattr__(config.cache_config, "cache_dtype", "mxfp8")
    with pytest.raises(ValueError, match=message):
        NPUPlatform.check_and_update_config(config)


def test_unquantized_kv_cache_dtypes_keep_pfa():
    config = _npu_config("PFA")
    object.__setattr__(config.cache_config, "cache_dtype", "bfloat16")
    NPUPlatform.check_and_update_config(config)
    assert config.attention_config.backend.name == "PFA"
