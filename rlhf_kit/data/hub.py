"""Loading a dataset from the Hugging Face hub, failing fast and in one line when the hub is out of reach.

``datasets.load_dataset`` retries an unreachable endpoint for half a minute and then raises a
multi-line ``ConnectionError``; :func:`load_hub_dataset` probes the endpoint first (a short ``HEAD``
through huggingface_hub's own HTTP session, so proxies and ``HF_ENDPOINT`` apply) and raises
:class:`HubUnreachableError` whose one-line message names the way to work offline.
"""

from __future__ import annotations

#: What the recipes suggest instead of the hub.
OFFLINE_HINT = (
    "use --source default (the HH sample shipped in rlhf_kit) or --source PATH (a downloaded hh-rlhf "
    "folder or *.jsonl.gz file)"
)


class HubUnreachableError(ConnectionError):
    """The hub cannot be reached (or offline mode is on and the dataset is not cached)."""


def hub_endpoint() -> str:
    """The hub URL in use (``HF_ENDPOINT`` or https://huggingface.co)."""
    from huggingface_hub import constants

    return constants.ENDPOINT


def hub_unreachable_reason(endpoint: str | None = None, timeout: float = 5.0) -> str | None:
    """Why ``endpoint`` (default: :func:`hub_endpoint`) cannot be reached within ``timeout`` seconds,
    or ``None`` when it answers at all (any HTTP status counts as reachable)."""
    from huggingface_hub.utils import get_session

    endpoint = endpoint or hub_endpoint()
    try:
        get_session().head(endpoint, timeout=timeout, follow_redirects=False)
    except Exception as e:  # noqa: BLE001 - every transport failure means "unreachable"
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no answer'}"
    return None


def load_hub_dataset(
    name: str, data_dir: str | None = None, probe_timeout: float = 5.0, hint: str = OFFLINE_HINT
):
    """``datasets.load_dataset(name, data_dir=data_dir)``, or :class:`HubUnreachableError` in one line.

    In offline mode (``HF_HUB_OFFLINE=1``) the cache is tried without probing; otherwise the endpoint
    is probed for ``probe_timeout`` seconds first, so an unreachable hub fails in seconds, not after
    the retries of ``datasets``. ``hint`` ends the message (what to do instead).
    """
    from huggingface_hub import constants

    where = f"the Hugging Face hub at {hub_endpoint()}"
    if not constants.HF_HUB_OFFLINE:
        reason = hub_unreachable_reason(timeout=probe_timeout)
        if reason is not None:
            raise HubUnreachableError(f"cannot reach {where} to load {name} ({reason}); {hint}")
    import datasets

    try:
        return datasets.load_dataset(name, data_dir=data_dir)
    except ConnectionError as e:
        mode = (
            "offline mode (HF_HUB_OFFLINE=1) and no cached copy" if constants.HF_HUB_OFFLINE else "no answer"
        )
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise HubUnreachableError(f"cannot load {name} from {where}: {mode} ({detail}); {hint}") from None
