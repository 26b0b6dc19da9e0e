"""Hugging Face Hub ids (`org/name`) for models and datasets, resolved through huggingface_hub and its cache.

Online, the snapshot is downloaded into the cache ($HF_HUB_CACHE, ~/.cache/huggingface/hub) first; with
HF_HUB_OFFLINE=1 the cache alone answers; an id that is neither reachable nor cached is one line saying so
and how to fetch it."""

from __future__ import annotations

import re
from pathlib import Path

from tunelab.errors import TunelabError

# A Hugging Face repository id: "org/name" (letters, digits, '-', '_', '.'), as the Hub names repositories.
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


def snapshot(repo_id: str, revision: str | None, files: list[str], *, repo_type: str = "model",
             field: str = "model.source", revision_field: str = "model.revision") -> Path:
    """The snapshot folder of `repo_id` at `revision` (a branch, tag or commit hash; default main) holding
    the files that match `files` (glob patterns; nothing else is fetched). `field` and `revision_field`
    name the config keys in errors."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    at = f"@{revision}" if revision else ""
    # "runs/chat-2" where runs/ is a local folder is most likely a mistyped path, not a Hub id: say so first
    top = repo_id.split("/", 1)[0]
    path = f" is not a local folder ({top}/ is one: a typo?)" if Path(top).is_dir() else ""
    try:
        return Path(snapshot_download(repo_id, repo_type=repo_type, revision=revision, allow_patterns=files))
    except (RepositoryNotFoundError, RevisionNotFoundError) as e:
        raise TunelabError(f"{field}: {repo_id}{at}{path and path + ';'}: {type(e).__name__.removesuffix('Error').lower()} on the "
                           f"Hugging Face Hub (check the id and {revision_field}; a gated {repo_type} needs "
                           "`hf auth login`)") from None
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:
        why = "HF_HUB_OFFLINE=1 is set" if constants.HF_HUB_OFFLINE else f"the Hub cannot be reached ({str(e).splitlines()[0][:120]})"
        kind = " --repo-type dataset" if repo_type == "dataset" else ""
        rev = f" --revision {revision}" if revision else ""
        local = "folder" if repo_type == "model" else "file or folder"
        raise TunelabError(
            f"{field}: {repo_id}{at}{path and path + ', and'} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and {why}; "
            f"fetch it where the Hub is reachable: `hf download {repo_id}{kind}{rev} "
            f"--include {' '.join(repr(p) for p in files)}`, or give a local {local}") from None
