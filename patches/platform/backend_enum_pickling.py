"""Let the PFA member of vLLM's AttentionBackendEnum cross into spawned engine processes.

What: pickling `AttentionBackendEnum.PFA` (inside the VllmConfig that `vllm serve` sends to its engine-core
    process) stores a call that registers the member in the receiving process before looking it up by name.
Why: members added at run time exist only in the process that added them. Enum members pickle by value, and a
    spawned engine process unpickles its config before it loads general plugins, so `--attention-backend pfa` fails
    there with "'...PFAAttentionBackend' is not a valid AttentionBackendEnum".
How: a `copyreg` reducer for AttentionBackendEnum (multiprocessing's pickler reads copyreg's table): the PFA
    member reduces to `vllm_pfa.plugin.backend_member("PFA")`; every other member reduces exactly as before.
For: vLLM 0.32.0 (CPU) and 0.30.0 (vllm-ascend 0.30.0rc2's pairing; the same registry module and enum), compared by
    release. Elsewhere not applied unless VLLM_PFA_ALLOW_UNVERIFIED=1: the selection patches refuse PFA at start-up
    there (and say so), before any config is pickled.
Remove when: vLLM loads general plugins before unpickling the engine config, or pickles enum members by name.
"""

import copyreg

from vllm_pfa_patches.platform.selection import BACKEND_NAME
from vllm_pfa_patches.versions import allow_unverified, vllm_release

VERIFIED_VLLM_RELEASES = ("0.30.0", "0.32.0")


def _reduce(member):
    if member.name == BACKEND_NAME:
        from vllm_pfa.plugin import backend_member

        return backend_member, (member.name,)
    return type(member), (member.value,)


def apply() -> bool:
    if vllm_release() not in VERIFIED_VLLM_RELEASES and not allow_unverified():
        return False
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    copyreg.pickle(AttentionBackendEnum, _reduce)  # idempotent: one table entry per type
    return True
