"""The Hugging Face Hub, through huggingface_hub: an exported generator's folder goes up
(`python -m train.export ... --push-to-hub USER/REPO`) and comes down (`load_generator("USER/REPO")`).

The token is huggingface_hub's own: HF_TOKEN, or the one `hf auth login` stored; it is never written into
any file here. HF_ENDPOINT points both ways at another server (a private Hub, the tests' local one). A push
that has not finished within its time limit (`--hub-timeout`, PUSH_TIMEOUT_S by default) is abandoned and
reported; the Hub commits a folder's files in one commit, so an abandoned push leaves no half-pushed files.
"""

from __future__ import annotations

import threading
from pathlib import Path

from huggingface_hub import HfApi, constants, get_token, snapshot_download
from huggingface_hub.errors import HFValidationError, HfHubHTTPError
from huggingface_hub.utils import validate_repo_id

from train.errors import HubError


def check_repo_id(repo_id: str) -> None:
    """A repository id to push to: USER/REPO (or ORGANISATION/REPO) in the Hub's spelling."""
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise HubError(f"--push-to-hub {repo_id!r} is not a repository id ({str(error).splitlines()[0]}): give "
                       "USER/REPO, e.g. --push-to-hub alice/mnist-dcgan") from None
    if repo_id.count("/") != 1:
        raise HubError(f"--push-to-hub {repo_id!r} names no owner: give USER/REPO, e.g. --push-to-hub alice/{repo_id}")


def token() -> str:
    """The user's Hub token, or a HubError that says how to give one (before any work)."""
    found = get_token()
    if not found:
        raise HubError("--push-to-hub needs a Hugging Face token with write access: set HF_TOKEN, or run "
                       "`hf auth login` once on this machine")
    return found


PUSH_TIMEOUT_S = 300  # the longest a push may take, every request and retry included


def push(folder: Path, repo_id: str, access_token: str, message: str, timeout_s: float = PUSH_TIMEOUT_S) -> str:
    """Upload every file of `folder` to the model repository `repo_id` (made if missing) in one commit; its URL.
    A HubError where the Hub refuses, cannot be reached, or has not finished within `timeout_s`."""
    outcome: dict = {}

    def upload() -> None:  # in a thread: a server that never answers cannot hold the caller past timeout_s
        try:
            api = HfApi(token=access_token)
            api.create_repo(repo_id, repo_type="model", exist_ok=True)
            outcome["url"] = api.upload_folder(repo_id=repo_id, folder_path=folder, repo_type="model",
                                               commit_message=message).commit_url
        except Exception as error:  # noqa: BLE001 - reported below, whatever the HTTP stack raised
            outcome["error"] = error

    worker = threading.Thread(target=upload, name="hub-push", daemon=True)
    worker.start()
    worker.join(timeout_s)
    again = (f"the export in {folder} is complete: push it again with `hf upload {repo_id} {folder}` (or the same "
             "command with a new --out)")
    if worker.is_alive():
        raise HubError(f"the Hub at {constants.ENDPOINT} did not finish the upload to {repo_id} within {timeout_s:g} s "
                       f"(--hub-timeout); nothing was pushed that claims to be done: {again}")
    error = outcome.get("error")
    if isinstance(error, HfHubHTTPError):
        raise HubError(f"the Hub refused the upload to {repo_id} ({str(error).splitlines()[0]}); the export in "
                       f"{folder} is complete: check the token's write access to {repo_id}, then push it again "
                       f"with `hf upload {repo_id} {folder}`")
    if error is not None:
        raise HubError(f"could not reach the Hub at {constants.ENDPOINT} to upload to {repo_id} "
                       f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else 'no answer'}); "
                       f"check HF_ENDPOINT and the network; {again}")
    return outcome["url"]


def looks_like_repo_id(name: str) -> bool:
    """USER/REPO that is no local path: what `load_generator` fetches from the Hub."""
    if Path(name).exists() or name.count("/") != 1:
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def download(repo_id: str, files: list[str]) -> Path:
    """The local folder (huggingface_hub's cache) holding `files` of the model repository `repo_id`."""
    try:
        return Path(snapshot_download(repo_id, repo_type="model", allow_patterns=files))
    except Exception as error:  # noqa: BLE001 - the HTTP stack's own errors too (a closed port, a dropped line)
        raise HubError(f"{repo_id} is neither a local folder nor a Hub model repository this machine can read "
                       f"({str(error).splitlines()[0]}): check the path, or the repository id and your access "
                       "(HF_TOKEN)") from None
