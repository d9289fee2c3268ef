"""vLLM plugin entry points (setup.cfg): the backend name at platform detection, the patches in every process.

- `vllm.platform_plugins: pfa` runs during platform detection, which `from vllm import LLM` already triggers, so
  `LLM(..., attention_config={"backend": "PFA"})` parses the name with no import of vllm_pfa. It returns None: it
  activates no platform and never competes with the platform that is detected (CPU, or vllm-ascend's NPU).
- `vllm.general_plugins: pfa` runs in every vLLM process (API server, engine core, workers), possibly more than once,
  and applies the platform patches.
Both are idempotent, and both are named "pfa", so `VLLM_PLUGINS` turns them on and off together.
"""

from vllm_pfa.log import init_logger
from vllm.v1.attention.backends.registry import AttentionBackendEnum

from vllm_pfa_patches import apply_platform_patches
from vllm_pfa_patches.platform import backend_enum_pickling

logger = init_logger(__name__)

BACKEND_NAME = "PFA"
BACKEND_CLASS_PATH = "vllm_pfa.backend.pfa_attn.PFAAttentionBackend"


def register_backend_name() -> None:
    """Makes "PFA" a member of vLLM's AttentionBackendEnum (what `--attention-backend pfa` parses to), one that
    survives pickling into spawned engine processes."""
    if BACKEND_NAME not in AttentionBackendEnum.__members__:
        AttentionBackendEnum.register(BACKEND_NAME, BACKEND_CLASS_PATH)
    backend_enum_pickling.apply()


def backend_member(name: str) -> AttentionBackendEnum:
    """The registered member `name`, registering PFA first in a process that has not loaded the plugin yet."""
    register_backend_name()
    return AttentionBackendEnum[name]


def register_backend_name_at_platform_detection() -> None:
    """The `vllm.platform_plugins` entry point: registers the name, activates no platform (returns None)."""
    register_backend_name()


def register() -> None:
    """Adds backend PFA to vLLM's AttentionBackendEnum and applies the platform patches."""
    register_backend_name()
    applied = apply_platform_patches()
    logger.debug("vllm-pfa registered; patches in effect: %s", applied)
