"""The shared mechanism of the backend-selection patches (`patch_platform`).

A platform's selection is patched in two places: `check_and_update_config` (runs wherever a VllmConfig is built, the
API server included, before any engine process starts) refuses a PFA selection on a stack PFA is not verified on, so
the user gets a start-up error instead of the platform's default backend; `get_attn_backend_cls` returns PFA's class
when PFA is selected (after checking the model, and the device where the platform needs it). Every other selection
reaches the platform's methods unchanged.
"""

import logging
from collections.abc import Callable
from dataclasses import dataclass

from vllm_pfa.log import init_logger, log_once
from vllm_pfa.plugin import BACKEND_NAME
from vllm_pfa_patches.versions import ALLOW_UNVERIFIED_ENV, allow_unverified, describe, describe_verified

logger = init_logger(__name__)

_PATCHED = "_vllm_pfa_patched"


@dataclass(frozen=True)
class Stack:
    """The installed releases of a platform's stack and the combinations PFA is verified on."""

    platform: str  # "CPU", "Ascend NPU"
    installed: dict[str, str | None]  # package -> release (versions.release)
    verified: tuple[dict[str, str], ...]

    @property
    def is_verified(self) -> bool:
        return any(all(self.installed.get(name) == version for name, version in stack.items())
                   for stack in self.verified)

    def refusal(self) -> str:
        return (f"The PFA attention backend is not verified on this {self.platform} stack ({describe(self.installed)}; "
                f"verified: {describe_verified(self.verified)}). Install a verified stack, start without "
                f"--attention-backend pfa, or set {ALLOW_UNVERIFIED_ENV}=1 to try PFA on this one.")


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


def _selected(vllm_config):
    return getattr(getattr(vllm_config, "attention_config", None), "backend", None)


def _refuse_unless_usable(stack: Callable[[], Stack]) -> None:
    installed = stack()
    if not (installed.is_verified or allow_unverified()):
        raise ValueError(installed.refusal())


def patch_platform(platform_cls: type, stack: Callable[[], Stack], backend_class_path: str, *,
                   check: Callable[[], None] | None = None, after_config: Callable | None = None,
                   announce: bool = True) -> bool:
    """The whole selection patch of one platform; True where PFA can be selected on it now.

    `check_and_update_config` (every process that builds a VllmConfig, the API server first) refuses a PFA
    selection on an unverified stack without the opt-in, naming the installed and the verified stacks, then runs
    the platform's own config path and `after_config(vllm_config, selected)`. `get_attn_backend_cls` returns PFA's
    class for a PFA selection after the same refusal, `check()` (the device) and the backend's own validation of
    the model. Other selections pass through untouched, on any stack. An unverified stack is said once, at INFO,
    since nobody may have asked for PFA, and only if `announce` (the platform is this installation's concern)."""
    from vllm.utils.import_utils import resolve_obj_by_qualname

    installed = stack()
    usable = installed.is_verified or allow_unverified()
    if announce and not installed.is_verified:
        said = (f"vllm-pfa: {installed.platform} stack {describe(installed.installed)} is not verified (verified: "
                f"{describe_verified(installed.verified)}); ")
        if usable:
            log_once(logger, logging.WARNING, "%sPFA may be selected on it because %s is set.", said,
                     ALLOW_UNVERIFIED_ENV)
        else:
            log_once(logger, logging.INFO, "%sselecting the PFA attention backend on it fails at start-up.", said)

    def check_and_update_config(original, cls, vllm_config) -> None:
        selected = _selected(vllm_config)
        if is_pfa(selected):
            _refuse_unless_usable(stack)
        original(cls, vllm_config)
        if after_config is not None:
            after_config(vllm_config, selected)

    def get_attn_backend_cls(original, cls, selected_backend, attn_selector_config, *args, **kwargs):
        if not is_pfa(selected_backend):
            return original(cls, selected_backend, attn_selector_config, *args, **kwargs)
        _refuse_unless_usable(stack)
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
        log_once(logger, logging.INFO, "Using the PFA attention backend (%s).", backend_class_path)
        return backend_class_path

    wrap_classmethod(platform_cls, "check_and_update_config", check_and_update_config)
    wrap_classmethod(platform_cls, "get_attn_backend_cls", get_attn_backend_cls)
    return usable
