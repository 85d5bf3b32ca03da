"""Upload an exported model directory to the Hugging Face Hub (``huggingface_hub``: ``create_repo`` +
``upload_folder``, one commit, so a failure never leaves a half-uploaded revision).

Before creating anything it checks what can fail without a network round trip and then the token against the
Hub (``whoami``): offline (``HF_HUB_OFFLINE``, no connection) or unauthenticated is one clear error, and nothing has
been created. ``dry_run`` lists what would be uploaded and touches no network.

    python -m llmshearing.hub models/sheared_2.7b --repo-id me/Sheared-2.7B [--private] [--revision main] [--dry-run]
    python scripts/export_hf.py ... --push-to-hub me/Sheared-2.7B              # export, then upload
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

__all__ = ["HubError", "plan_upload", "push_to_hub"]

REQUIRED = ("config.json", "README.md")


class HubError(RuntimeError):
    """The upload cannot happen (offline, not logged in, no permission, bad folder); nothing was uploaded."""


def plan_upload(folder: str | Path) -> list[tuple[str, int]]:
    """(path, bytes) of every file an upload of ``folder`` sends, after checking it is a complete export."""
    folder = Path(folder)
    if not folder.is_dir():
        raise HubError(f"{folder} is not a directory; export a model first (scripts/export_hf.py)")
    missing = [f for f in REQUIRED if not (folder / f).is_file()]
    if not any(folder.glob("*.safetensors")):
        missing.append("*.safetensors")
    if missing:
        raise HubError(f"{folder} is not a complete export (missing {missing}); export it again with "
                       "scripts/export_hf.py")
    from llmshearing.model_card import validate_card

    validate_card(folder / "README.md")
    return sorted((str(p.relative_to(folder)), p.stat().st_size) for p in folder.rglob("*") if p.is_file())


def push_to_hub(folder: str | Path, repo_id: str, private: bool = False, revision: Optional[str] = None,
                dry_run: bool = False, token: Optional[str] = None) -> str:
    """Upload ``folder`` as one commit to ``repo_id`` (created if absent). Returns the commit URL, or the dry run's
    listing.

    Raises:
        HubError: offline, not authenticated, or the folder is not a complete export; raised before any upload.
    """
    files = plan_upload(folder)
    if dry_run:
        total = sum(n for _, n in files)
        return "\n".join([f"would upload {len(files)} files ({total / 1e6:.1f} MB) to {repo_id}"
                          f"{'@' + revision if revision else ''} ({'private' if private else 'public'}):",
                          *(f"  {name}  {n / 1e6:.2f} MB" for name, n in files)])
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        raise HubError("HF_HUB_OFFLINE is set: uploading needs the network; unset it (nothing was uploaded)")
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi(token=token)
    try:
        who = api.whoami()
    except HfHubHTTPError as e:
        raise HubError(f"the Hub refused the token ({e}); log in with `huggingface-cli login` or set HF_TOKEN "
                       "(nothing was uploaded)") from None
    except Exception as e:  # no connection, DNS, proxy, no token at all
        raise HubError(f"cannot reach the Hugging Face Hub or no token is set ({type(e).__name__}: {e}); check the "
                       "network and log in with `huggingface-cli login` or HF_TOKEN (nothing was uploaded)") from None
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, revision=revision,
                                 commit_message=f"llmshearing export ({len(files)} files)")
    except HfHubHTTPError as e:
        raise HubError(f"upload to {repo_id} as {who.get('name')} failed ({e}); the repository has no partial "
                       "commit: fix the cause and run again") from None
    return str(getattr(info, "commit_url", info))


def main(argv: Optional[Sequence[str]] = None) -> int:
    from llmshearing.cli import run

    return run(_main, argv)


def _main(argv: Optional[Sequence[str]] = None) -> int:
    from llmshearing.cli import parser

    p = parser(__doc__, prog="python -m llmshearing.hub")
    p.add_argument("folder", help="an exported model directory")
    p.add_argument("--push-to-hub", "--repo-id", dest="repo_id", required=True, metavar="REPO_ID",
                   help="user-or-org/name on the Hub")
    p.add_argument("--private", action="store_true", help="create a private repository")
    p.add_argument("--revision", default=None, help="branch to upload to (created if absent)")
    p.add_argument("--dry-run", action="store_true", help="list what would be uploaded; no network")
    args = p.parse_args(argv)
    print(push_to_hub(args.folder, args.repo_id, args.private, args.revision, args.dry_run))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
