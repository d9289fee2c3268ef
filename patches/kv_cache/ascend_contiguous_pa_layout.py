"""Give PFA's attention layers the KV-cache layout vllm-ascend gives its own layers for paged-attention decode.

What: `vllm_ascend.attention.utils.requires_contiguous_pa_kv_cache` answers for a layer whose impl is
    `PFAAscendAttentionImpl` what it answers for `AscendAttentionBackendImpl` with the same settings; its two callers,
    the V1 and V2 model runners' KV-cache allocation (`worker/model_runner_v1.py`, `worker/v2/attn_utils.py`), import
    it by name, so their module attribute is replaced too where they are already imported.
Why: vllm-ascend allocates K and V block-interleaved (two non-contiguous views) unless that function says the layer
    needs contiguous K/V for `_npu_paged_attention`, and it says so only when `type(impl) is
    AscendAttentionBackendImpl`. PFA's impl subclasses it and keeps decode on vllm-ascend's path, which sends decode
    rows to paged attention for head size 512 (Gemma-4) and under FULL_DECODE_ONLY with `pa_shape_list`: on a PFA
    layer those would read an interleaved cache that paged attention is never given by vllm-ascend itself.
How: wraps the function; for a PFA layer it asks the original about an `AscendAttentionBackendImpl` sharing the
    PFA impl's attributes, so vllm-ascend's own conditions (no window, not pooling, unpadded pages, paged attention
    in use) decide. Other layers reach the original unchanged. Idempotent.
For: vllm-ascend 0.30.0rc2. Other releases: not applied, with a log line (the selection patch refuses PFA there
    unless VLLM_PFA_ALLOW_UNVERIFIED=1).
Remove when: vllm-ascend decides the layout by capability (an impl attribute, or isinstance), not by exact type.
"""

import sys
import types

from vllm_pfa.log import init_logger
from vllm_pfa_patches.versions import vllm_ascend_installed, vllm_ascend_release

logger = init_logger(__name__)

VERIFIED_VLLM_ASCEND = ("0.30.0rc2",)
FUNCTION = "requires_contiguous_pa_kv_cache"
CALLERS = ("vllm_ascend.worker.model_runner_v1", "vllm_ascend.worker.v2.attn_utils")
_PATCHED = "_vllm_pfa_patched"


def _patched(original):
    def requires_contiguous_pa_kv_cache(layer, vllm_config, spec) -> bool:
        from vllm_ascend.attention.attention_v1 import AscendAttentionBackendImpl

        from vllm_pfa.backend.ascend_attn import PFAAscendAttentionImpl

        impl = getattr(layer, "impl", None)
        if type(impl) is PFAAscendAttentionImpl:
            as_vllm_ascend = object.__new__(AscendAttentionBackendImpl)
            as_vllm_ascend.__dict__ = impl.__dict__  # the same settings, read by the original
            layer = types.SimpleNamespace(impl=as_vllm_ascend)
        return original(layer, vllm_config, spec)

    setattr(requires_contiguous_pa_kv_cache, _PATCHED, True)
    requires_contiguous_pa_kv_cache.__wrapped__ = original
    return requires_contiguous_pa_kv_cache


def apply() -> bool:
    if not vllm_ascend_installed():
        return False  # not an Ascend installation: nothing to patch, nothing to say
    release = vllm_ascend_release()
    if release not in VERIFIED_VLLM_ASCEND:
        logger.info("vllm-pfa: not giving PFA layers vllm-ascend's paged-attention KV layout: written for "
                    "vllm-ascend %s, found %s.", ", ".join(VERIFIED_VLLM_ASCEND), release)
        return False
    from vllm_ascend.attention import utils

    current = getattr(utils, FUNCTION)
    patched = current if getattr(current, _PATCHED, False) else _patched(current)
    setattr(utils, FUNCTION, patched)
    for name in CALLERS:  # imported by name: a caller imported before this patch keeps its own reference
        module = sys.modules.get(name)
        if module is not None and not getattr(getattr(module, FUNCTION), _PATCHED, False):
            setattr(module, FUNCTION, patched)
    return True
