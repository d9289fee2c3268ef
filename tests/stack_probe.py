"""What a fresh vLLM process does with vllm-pfa installed, from plugin loading to the config a spawned engine
unpickles: the start-up path of `vllm serve MODEL [--attention-backend pfa]` short of starting the engine.

Run as a script in a fresh interpreter (plugins load once per process); prints one JSON line, last:
  plugins_loaded  load_general_plugins() returned (vLLM does not catch a plugin's exception)
  member          AttentionBackendEnum["PFA"]'s class path, or null where the name is not registered
  platform        vLLM's current platform class
  error           the exception create_engine_config raised, as "Type: message", or null
  config_backend  the built VllmConfig's attention backend name (null: the platform chooses)
  child_backend   that backend name and class path as a fresh interpreter unpickles the config (the spawned
                  engine core does this before it loads any plugin), or null

Options (each simulates an installation this machine does not have):
  --report-vllm-version V  vLLM reports V (`0.30.0+empty` as vllm-ascend's images build it, a dev build, ...)
  --without-register       vLLM's AttentionBackendEnum has no `register` (as vLLM 0.30's has none)
  --break-registry         registering the name fails inside our entry points (a registry we cannot extend)
  --break-patches          applying the selection patches fails (a platform class we cannot patch)
  Everything after `--` is passed to the engine arguments (e.g. `--attention-backend pfa`).
"""

import argparse
import json
import subprocess
import sys
import types

UNPICKLE = ("import pickle, sys; c = pickle.loads(sys.stdin.buffer.read()); b = c.attention_config.backend; "
            "print(None if b is None else f'{b.name} {b.get_path()}')")


def _report_version(version: str) -> None:
    """vLLM reports `version` from its first import on (importing vLLM 0.30 already runs platform detection, and
    with it our platform plugin): its `_version` module, which `vllm.version` reads, is provided first."""
    reported = types.ModuleType("vllm._version")
    reported.__version__ = reported.version = version
    reported.__version_tuple__ = reported.version_tuple = tuple(version.split("+")[0].split("."))
    sys.modules["vllm._version"] = reported


def _simulate(options) -> None:
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    if options.without_register:
        delattr(AttentionBackendEnum, "register")
    if options.break_registry:
        import vllm_pfa_patches.platform.backend_enum_register as backport

        def unreadable(*args, **kwargs):
            raise AttributeError("simulated: this vLLM's registry cannot be read")

        backport.apply = unreadable
        AttentionBackendEnum.register = unreadable
    if options.break_patches:
        import vllm_pfa_patches

        def unpatchable():
            raise AttributeError("simulated: this vLLM's platform cannot be patched")

        vllm_pfa_patches.apply_platform_patches = unpatchable


def _configure_logging() -> None:
    """vLLM's logging as its processes set it up before they load plugins (vLLM 0.32 configures it lazily; 0.30
    at import)."""
    import vllm.logger

    if hasattr(vllm.logger, "configure_logging"):
        from vllm.config.logging import LoggingConfig

        vllm.logger.configure_logging(LoggingConfig())


def _member() -> str | None:
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    return AttentionBackendEnum.__members__["PFA"].value if "PFA" in AttentionBackendEnum.__members__ else None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--report-vllm-version")
    parser.add_argument("--without-register", action="store_true")
    parser.add_argument("--break-registry", action="store_true")
    parser.add_argument("--break-patches", action="store_true")
    parser.add_argument("--model", required=True)
    options, engine_args = parser.parse_known_args()
    engine_args = [a for a in engine_args if a != "--"]
    if options.report_vllm_version:
        _report_version(options.report_vllm_version)
    _simulate(options)
    _configure_logging()
    from vllm.plugins import load_general_plugins

    load_general_plugins()
    result = {"plugins_loaded": True, "member": _member()}
    import vllm.platforms
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    result["platform"] = type(vllm.platforms.current_platform).__name__
    cli = AsyncEngineArgs.add_cli_args(FlexibleArgumentParser())
    result.update(error=None, config_backend=None, child_backend=None)
    try:
        config = AsyncEngineArgs.from_cli_args(cli.parse_args(["--model", options.model, *engine_args])) \
            .create_engine_config()
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - reported to the test (argparse exits)
        result["error"] = f"{type(exc).__name__}: {exc}"
    else:
        from multiprocessing.reduction import ForkingPickler

        backend = config.attention_config.backend
        result["config_backend"] = None if backend is None else backend.name
        child = subprocess.run([sys.executable, "-c", UNPICKLE], input=bytes(ForkingPickler.dumps(config)),
                               capture_output=True, timeout=300)
        result["child_backend"] = child.stdout.decode().strip().splitlines()[-1] if child.returncode == 0 else \
            f"unpickling failed: {child.stderr.decode()[-1500:]}"
    print(json.dumps(result))


if __name__ == "__main__":
    main()
