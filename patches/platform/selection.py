"""The shared mechanism of the backend-selection patches: wrap a platform's `get_attn_backend_cls` so that
selecting PFA returns PFA's class (after checking the model against what the backend supports), and every other
selection reaches the original method unchanged."""

from collections.abc import Callable

from vllm_pfa.log import init_logger
from vllm.utils.import_utils import resolve_obj_by_qualname

logger = init_logger(__name__)

BACKEND_NAME = "PFA"
_PATCHED = "_vllm_pfa_patched"


def version_supported(package: str, installed: str, supported: tuple[str, ...]) -> bool:
    if installed in supported:
        return True
    logger.warning(
        "vllm-pfa: not patching %s %s (the patch was written for %s); --attention-backend pfa will not be honoured "
        "on this platform.", package, installed, ", ".join(supported))
    return False


def patch_backend_selection(platform_cls: type, backend_class_path: str) -> bool:
    """Idempotently wraps `platform_cls.get_attn_backend_cls`; True once the wrapper is in place."""
    original: Callable = platform_cls.get_attn_backend_cls.__func__
    if getattr(original, _PATCHED, False):
        return True

    def get_attn_backend_cls(cls, selected_backend, attn_selector_config, num_heads=None):
        if selected_backend is None or selected_backend.name != BACKEND_NAME:
            return original(cls, selected_backend, attn_selector_config, num_heads)
        backend = resolve_obj_by_qualname(backend_class_path)
        reasons = backend.validate_configuration(**attn_selector_config._asdict(), device_capability=None)
        if reasons:
            raise ValueError(
                f"The PFA attention backend cannot run this model ({attn_selector_config}): {', '.join(reasons)}")
        logger.info_once("Using the PFA attention backend (%s).", backend_class_path)
        return backend_class_path

    setattr(get_attn_backend_cls, _PATCHED, True)
    get_attn_backend_cls.__wrapped__ = original
    platform_cls.get_attn_backend_cls = classmethod(get_attn_backend_cls)
    return True
