"""Loggers of vllm-pfa, through vLLM's logger (a standard logger of the same name where vLLM is not installed: the
operator needs only torch, and the package declares no vLLM dependency)."""

import logging

_said: set[tuple] = set()


def init_logger(name: str) -> logging.Logger:
    # Imported here, not at module level: importing vllm runs platform detection (vLLM 0.30), which loads this
    # package's platform plugin, which needs this module complete.
    try:
        from vllm.logger import init_logger as vllm_init_logger
    except ModuleNotFoundError as exc:
        if exc.name != "vllm":  # vLLM is there but broken: that is not for this package to hide
            raise
        return logging.getLogger(f"vllm.{name}")
    # vLLM's logging configuration (handler, level, VLLM_LOGGING_LEVEL) covers the "vllm" logger tree only.
    return vllm_init_logger(f"vllm.{name}")


def log_once(logger: logging.Logger, level: int, msg: str, *args) -> None:
    """Logs a message once per process. Not vLLM's `*_once` methods: their default scope asks vLLM's distributed
    state, which is not set up when plugins load (the line is dropped), and the plugin's start-up messages must not
    depend on what a vLLM release offers."""
    key = (logger.name, level, msg, args)
    if key not in _said:
        _said.add(key)
        logger.log(level, msg, *args)
