"""asr.sh stage 13: a packed model (stage 12's zip) uploaded to a Hugging Face model repository,
with the user's own login (``huggingface-cli login`` or ``HF_TOKEN``):

    python -m espnet_plugin.recipe.upload --zip exp/asr_x/packed/asr_x.zip --repo user/asr_x

The zip is verified against its checksums and unpacked into ``<zip folder>/hf``, laid out as
ESPnet's model zoo uploads it (README.md at the root, meta.yaml, exp/, data/), then the repository
is created if absent and the folder uploaded in one commit.
"""

import argparse
import logging
import shutil
import zipfile
from pathlib import Path

from espnet_plugin.cli import UserError, run
from espnet_plugin.packed import verify

logger = logging.getLogger(__name__)


def upload(zip_path: Path, repo: str, private: bool) -> str:
    try:
        from huggingface_hub import HfApi
    except ImportError:
        raise UserError("--hf_repo needs huggingface_hub: pip install huggingface_hub") from None
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise UserError(f"--hf_repo {repo!r}: expected <user or organisation>/<name>")
    verify(zip_path)
    folder = zip_path.resolve().parent / "hf"
    shutil.rmtree(folder, ignore_errors=True)  # made from the zip each time
    with zipfile.ZipFile(zip_path) as archive:
        archive.extractall(folder)
    api = HfApi()
    api.create_repo(repo_id=repo, repo_type="model", private=private, exist_ok=True)
    commit = api.upload_folder(repo_id=repo, repo_type="model", folder_path=str(folder),
                               commit_message=f"{zip_path.name}, packed by espnet_plugin")
    return str(getattr(commit, "commit_url", commit))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m espnet_plugin.recipe.upload",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--zip", required=True, type=Path, help="stage 12's packed model")
    parser.add_argument("--repo", required=True, help="<user or organisation>/<name>")
    parser.add_argument("--private", choices=("true", "false"), default="false")
    args = parser.parse_args(argv)
    if not args.zip.is_file():
        raise UserError(f"--zip {args.zip}: no such file; asr.sh stage 12 packs it")
    logger.info(f"uploaded {args.zip} to https://huggingface.co/{args.repo}: "
                f"{upload(args.zip, args.repo, args.private == 'true')}")


if __name__ == "__main__":
    run(main)
