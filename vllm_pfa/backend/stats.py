"""Per-process counters of the PFA backend: what went through PFA and what through the existing path."""

import logging
from dataclasses import asdict, dataclass

from vllm_pfa.log import init_logger

logger = init_logger(__name__)


@dataclass
class PFAStats:
    prefill_calls: int = 0  # npu_prompt_flash_attention calls (one per layer per step with prefills)
    prefill_tokens: int = 0  # query tokens those calls computed, summed over layers
    context_tokens: int = 0  # cached context tokens gathered from the paged KV cache for them
    decode_tokens: int = 0  # tokens that went through the platform's existing attention path
    existing_path_prefill_tokens: int = 0  # prefill tokens routed to the existing path (unsupported cache layout)

    def snapshot(self) -> dict[str, int]:
        return asdict(self)

    def reset(self) -> None:
        for name in asdict(self):
            setattr(self, name, 0)

    def log_step(self, num_decode_tokens: int, num_prefill_tokens: int) -> None:
        if logger.isEnabledFor(logging.DEBUG):  # the totals' snapshot costs more than a decode step's planning
            logger.debug("PFA step: %d decode tokens, %d prefill tokens; totals %s",
                         num_decode_tokens, num_prefill_tokens, self.snapshot())


STATS = PFAStats()
