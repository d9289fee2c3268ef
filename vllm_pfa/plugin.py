"""vLLM plugin entry points (setup.cfg): the backend name at platform detection, the patches in every process.

- `vllm.platform_plugins: pfa` runs during platform detection, which `from vllm import LLM` already triggers, so
  `LLM(..., attention_config={"backend": "PFA"})` parses the name with no import of vllm_pfa. It returns None: it
  activates no platform and never competes with the platform that is detected (CPU, or vllm-ascend's NPU).
- `vllm.general_plugins: pfa` runs in every vLLM process (API server, engine core, workers), possibly more than once,
  and applies the platform patches.
Both are idempotent, and both are named "pfa", so `VLLM_PLUGINS` turns them on and off together. Neither raises:
this package runs inside every vLLM process of the machine, and vLLM does not catch a general plugin's exception.
Where the plugin cannot serve, it says so once and steps aside; an explicit PFA selection it cannot honour is
refused at start-up by the selection patches (vllm_pfa_patches.platform.selection), never run on another backend.
"""

from collections.abc import Callable

from vllm_pfa.log import init_logger


def _logger():
    # Not a module-level logger: this module can be imported by platform detection while `import vllm` is still
    # running (vLLM 0.30), and creating vLLM's logger then would need vllm complete.
    return init_logger(__name__)

BACKEND_NAME = "PFA"
CPU_BACKEND_CLASS_PATH = "vllm_pfa.backend.pfa_attn.PFAAttentionBackend"
ASCEND_BACKEND_CLASS_PATH = "vllm_pfa.backend.ascend_attn.PFAAscendAttentionBackend"


def backend_class_path() -> str:
    """The member's value: the backend this installation's platform runs (vLLM's generic code may resolve it)."""
    from vllm_pfa_patches.versions import vllm_ascend_installed

    return ASCEND_BACKEND_CLASS_PATH if vllm_ascend_installed() else CPU_BACKEND_CLASS_PATH


def register_backend_name() -> None:
    """Makes "PFA" a member of vLLM's AttentionBackendEnum (what `--attention-backend pfa` parses to), one that
    survives pickling into spawned engine processes."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    from vllm_pfa_patches.platform import backend_enum_pickling, backend_enum_register

    if BACKEND_NAME not in AttentionBackendEnum.__members__:
        if hasattr(AttentionBackendEnum, "register"):  # vLLM >= 0.32
            AttentionBackendEnum.register(BACKEND_NAME, backend_class_path())
        else:
            backend_enum_register.apply(BACKEND_NAME, backend_class_path())
    backend_enum_pickling.apply()


def backend_member(name: str):
    """The registered member `name`, registering PFA first in a process that has not loaded the plugin yet (the
    unpickling of a config that selects PFA: it must not fall back, so this one raises)."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    register_backend_name()
    return AttentionBackendEnum[name]


_stepped_aside = False


def _step_aside() -> None:
    """Withdraws the name, so that selecting PFA fails in vLLM's parsing instead of running another backend."""
    from vllm_pfa_patches.platform import backend_enum_register

    backend_enum_register.withdraw(BACKEND_NAME)


def _never_raise(what: str, entry: Callable[[], object]) -> None:
    global _stepped_aside
    if _stepped_aside:
        return
    try:
        entry()
    except Exception:  # noqa: BLE001 - an entry point must not take the vLLM process down
        _stepped_aside = True
        _logger().warning("vllm-pfa: %s failed on this stack; the PFA attention backend is disabled in this process.",
                       what, exc_info=True)
        try:
            _step_aside()
        except Exception:  # noqa: BLE001
            _logger().debug("vllm-pfa: could not withdraw the backend name", exc_info=True)


def register_backend_name_at_platform_detection() -> None:
    """The `vllm.platform_plugins` entry point: registers the name, activates no platform (returns None)."""
    _never_raise("registering the backend name", register_backend_name)


def _register() -> None:
    from vllm_pfa_patches import apply_kv_cache_patches, apply_platform_patches

    register_backend_name()
    applied = apply_platform_patches() | apply_kv_cache_patches()
    _logger().debug("vllm-pfa registered; patches in effect: %s", applied)


def register() -> None:
    """The `vllm.general_plugins` entry point: adds backend PFA to vLLM's AttentionBackendEnum and applies the
    platform patches."""
    _never_raise("loading the plugin", _register)
