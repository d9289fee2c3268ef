"""vLLM general plugin entry point (`vllm.general_plugins`: `pfa = vllm_pfa.plugin:register`).

vLLM loads general plugins in every process (API server, engine core, workers), possibly more than once, so
`register` is idempotent.
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


def register() -> None:
    """Adds backend PFA to vLLM's AttentionBackendEnum and applies the platform patches."""
    register_backend_name()
    applied = apply_platform_patches()
    logger.debug("vllm-pfa registered; patches in effect: %s", applied)
