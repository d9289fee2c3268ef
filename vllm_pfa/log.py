"""Loggers of vllm-pfa, through vLLM's logger."""

from vllm.logger import init_logger as _vllm_init_logger


def init_logger(name: str):
    # vLLM's logging configuration (handler, level, VLLM_LOGGING_LEVEL) covers the "vllm" logger tree only.
    return _vllm_init_logger(f"vllm.{name}")
