"""Add the PFA member to vLLM's AttentionBackendEnum on a vLLM whose registry cannot add members.

What: makes `AttentionBackendEnum["PFA"]` (what `--attention-backend pfa` and `attention_config={"backend": "PFA"}`
    parse to) a member whose value is the backend's class path, like any built-in backend.
Why: vLLM 0.30's registry has no `AttentionBackendEnum.register`; it offers only the single `CUSTOM` slot
    (`register_backend(AttentionBackendEnum.CUSTOM, path)`), which vllm-ascend fills with its own backend.
How: adds the member to the enum's member tables (Python's Enum internals), as later vLLMs' `register` does;
    nothing else of the registry changes. vLLMs that have `register` use it instead (vllm_pfa.plugin).
For: verified on vLLM 0.30.0. On another vLLM without `register` the member is added too, so that a PFA selection
    reaches the selection patches, which refuse a stack they were not verified on with an error naming the
    installed and the verified versions (instead of vLLM's "Unknown attention backend: 'PFA'"); where the enum is
    not one this can extend, the plugin's entry points catch the error, say so once and step aside.
Remove when: the oldest supported vLLM has `AttentionBackendEnum.register` (0.32 has it).
"""


def apply(name: str, class_path: str) -> None:
    """Adds member `name` (idempotent)."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum as enum

    if name in enum.__members__:
        return
    member = object.__new__(enum)
    member._name_, member._value_ = name, class_path
    setattr(enum, name, member)
    enum._member_map_[name] = member
    enum._value2member_map_[class_path] = member
    enum._member_names_.append(name)


def withdraw(name: str) -> None:
    """Removes member `name`, however it was added (this backport or vLLM's `register`): where the plugin could not
    install its selection patches, a PFA selection must fail in parsing rather than reach a platform that would run
    its own backend instead."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum as enum

    member = enum._member_map_.pop(name, None)
    if member is None:
        return
    enum._value2member_map_.pop(member.value, None)
    enum._member_names_.remove(name)
    type.__delattr__(enum, name)  # EnumMeta refuses to delete members
