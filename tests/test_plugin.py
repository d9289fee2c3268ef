"""Plugin registration and the backend-selection patch."""

from importlib.metadata import entry_points

import pytest
import torch

from vllm.platforms.cpu import CpuPlatform
from vllm.v1.attention.backends.registry import AttentionBackendEnum
from vllm.v1.attention.selector import AttentionSelectorConfig

from vllm_pfa import plugin


def _selector(**overrides):
    config = dict(head_size=64, dtype=torch.float32, kv_cache_dtype="auto", block_size=32)
    config.update(overrides)
    return AttentionSelectorConfig(**config)


def test_entry_points_are_declared():
    general = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    platform = {ep.name: ep.value for ep in entry_points(group="vllm.platform_plugins")}
    assert general.get("pfa") == "vllm_pfa.plugin:register"
    assert platform.get("pfa") == "vllm_pfa.plugin:register_backend_name_at_platform_detection"


def test_platform_plugin_activates_no_platform():
    assert plugin.register_backend_name_at_platform_detection() is None
    assert "PFA" in AttentionBackendEnum.__members__


def test_register_twice_is_harmless():
    plugin.register()
    member = AttentionBackendEnum["PFA"]
    wrapped = CpuPlatform.get_attn_backend_cls
    plugin.register()
    assert AttentionBackendEnum["PFA"] is member
    assert member.get_class().get_name() == "PFA"
    assert CpuPlatform.get_attn_backend_cls.__func__ is wrapped.__func__  # not wrapped a second time


def test_unknown_backend_still_gets_vllms_error():
    plugin.register()
    with pytest.raises(ValueError, match="Unknown attention backend: 'NO_SUCH'"):
        AttentionBackendEnum["NO_SUCH"]


def test_cpu_platform_honours_pfa_and_nothing_else():
    plugin.register()
    pfa = CpuPlatform.get_attn_backend_cls(AttentionBackendEnum["PFA"], _selector())
    assert pfa == "vllm_pfa.backend.pfa_attn.PFAAttentionBackend"
    cpu = "vllm.v1.attention.backends.cpu_attn.CPUAttentionBackend"
    assert CpuPlatform.get_attn_backend_cls(None, _selector()) == cpu
    assert CpuPlatform.get_attn_backend_cls(AttentionBackendEnum.CPU_ATTN, _selector()) == cpu
    assert CpuPlatform.get_attn_backend_cls(AttentionBackendEnum.FLASH_ATTN, _selector()) == cpu


@pytest.mark.parametrize("overrides,reason", [
    (dict(kv_cache_dtype="fp8"), "kv_cache_dtype not supported"),
    (dict(head_size=48), "head_size not supported"),
    (dict(attn_type="encoder_decoder"), "attention type encoder_decoder not supported"),  # cross-attention
    (dict(attn_type="encoder"), "attention type encoder not supported"),
    (dict(use_mla=True), "MLA not supported"),
    (dict(has_sink=True), "attention sinks not supported"),
    (dict(use_mm_prefix=True), "partial multimodal token full attention not supported"),
])
def test_unsupported_models_are_refused_clearly(overrides, reason):
    plugin.register()
    with pytest.raises(ValueError, match=f"The PFA attention backend cannot run this model.*{reason}"):
        CpuPlatform.get_attn_backend_cls(AttentionBackendEnum["PFA"], _selector(**overrides))


@pytest.mark.parametrize("overrides", [dict(has_sliding_window=True), dict(use_non_causal=True),
                                       dict(attn_type="encoder_only")])
def test_windows_bidirectional_and_encoder_only_layers_are_supported(overrides):
    plugin.register()
    assert CpuPlatform.get_attn_backend_cls(AttentionBackendEnum["PFA"], _selector(**overrides))
