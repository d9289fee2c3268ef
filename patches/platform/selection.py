"""The shared mechanism of the backend-selection patches: wrap a platform's `get_attn_backend_cls` so that
selecting PFA returns PFA's class (after checking the model, and the device where the platform needs it, against
what the backend supports), and every other selection reaches the original method unchanged."""

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


def is_pfa(selected_backend) -> bool:
    """Whether a selected backend (an AttentionBackendEnum member, or None) is PFA."""
    return getattr(selected_backend, "name", None) == BACKEND_NAME


def wrap_classmethod(cls: type, name: str, wrapper: Callable) -> bool:
    """Idempotently replaces classmethod `name` of `cls` by `wrapper(original, cls, *args, **kwargs)`."""
    original: Callable = getattr(cls, name).__func__
    if getattr(original, _PATCHED, False):
        return True

    def patched(klass, *args, **kwargs):
        return wrapper(original, klass, *args, **kwargs)

    setattr(patched, _PATCHED, True)
    patched.__wrapped__ = original
    setattr(cls, name, classmethod(patched))
    return True


def patch_backend_selection(platform_cls: type, backend_class_path: str,
                            check: Callable[[], None] | None = None) -> bool:
    """Wraps `platform_cls.get_attn_backend_cls`; True once the wrapper is in place. `check` raises where the
    platform's device cannot run the backend."""

    def get_attn_backend_cls(original, cls, selected_backend, attn_selector_config, num_heads=None):
        if not is_pfa(selected_backend):
            return original(cls, selected_backend, attn_selector_config, num_heads)
        if check is not None:
            check()
        backend = resolve_obj_by_qualname(backend_class_path)
        reasons = backend.validate_configuration(**attn_selector_config._asdict(), device_capability=None)
        reasons = [f"{reason} (block_size {attn_selector_config.block_size}; kernel block sizes "
                   f"{backend.get_supported_kernel_block_sizes()})" if reason == "block_size not supported" else reason
                   for reason in reasons]
        if reasons:
            raise ValueError(
                f"The PFA attention backend cannot run this model ({attn_selector_config}): {', '.join(reasons)}")
        logger.info_once("Using the PFA attention backend (%s).", backend_class_path)
        return backend_class_path

    return wrap_classmethod(platform_cls, "get_attn_backend_cls", get_attn_backend_cls)
