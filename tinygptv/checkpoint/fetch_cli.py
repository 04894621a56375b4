# The `fetch` subcommand's parser and entry point: one official stage downloaded, verified and converted into the
# folder `--model tinygptv-stageN` loads (fetch.py does the work). Imports nothing heavy until the command runs.
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tinygptv.checkpoint.release import release_download_bytes, release_for_stage

EXAMPLES = """examples:
  tinygptv fetch --stage 3                     # ~9 GB download; then tinygptv ask --model tinygptv-stage3 ...
  tinygptv fetch --stage 3 --list              # where each file comes from, its size, sha256 and licence
  tinygptv fetch --stage 4 --out models/tinygptv-stage4
  HF_HUB_OFFLINE=1 tinygptv fetch --stage 3    # from a copied Hugging Face cache and downloads/ folder only

Hub files go to the Hugging Face cache (HF_HUB_CACHE; HF_TOKEN, HF_ENDPOINT and HF_HUB_OFFLINE apply), the LAVIS
files to $TINYGPTV_CACHE/downloads (default ~/.cache/tinygptv/downloads), the model to
$TINYGPTV_CACHE/models/tinygptv-stageN. An interrupted download resumes on the next run; a file whose size or
sha256 differs from the table is renamed <name>.bad-<sha8> and never used."""


def add_fetch_parser(subparsers) -> argparse.ArgumentParser:
    """Add `fetch` to the main parser's sub-parsers."""
    p = subparsers.add_parser(
        "fetch", help="download, verify and convert an official TinyGPT-V stage (--model tinygptv-stageN)",
        description="Download every file an official stage needs - TinyGPT-V_for_StageN.pth and Phi-2 from the\n"
                    "Hugging Face Hub at pinned revisions, EVA-CLIP ViT-g and the BLIP-2 Q-Former from LAVIS's URLs\n"
                    "(resumable) - check each file's size and sha256 against the table in\n"
                    "tinygptv/checkpoint/release.py, and convert them into one model folder (about 16 GB, fp32).\n"
                    "A second run reuses what is there.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", type=int, choices=(1, 2, 3, 4), required=True,
                   help="which released stage (3: the chat model the official demo uses; 4: multi-task, 448 px)")
    p.add_argument("--out", type=Path, default=None,
                   help="model folder to write (default: $TINYGPTV_CACHE/models/tinygptv-stageN, where --model "
                        "tinygptv-stageN finds it)")
    p.add_argument("--list", action="store_true",
                   help="print the stage's files (source, pinned revision, size, sha256, licence) and exit without "
                        "downloading: the list for fetching them by hand")
    p.add_argument("--quiet", action="store_true", help="no progress bars or messages, only errors")
    p.set_defaults(func=cmd_fetch)
    return p


def cmd_fetch(args) -> int:
    release = release_for_stage(args.stage)
    if args.list:
        print(format_release(release))
        return 0
    from tinygptv.checkpoint.fetch import fetch_release  # the command's imports wait for the command (start-up)

    try:
        fetch_release(release, args.out, quiet=args.quiet)
    except KeyboardInterrupt:
        print(f"tinygptv fetch: interrupted; partial downloads are kept and `{release.fetch_command()}` resumes them",
              file=sys.stderr)
        return 130
    return 0


def format_release(release) -> str:
    lines = [f"{release.name}: {len(release.files)} files, about {release_download_bytes(release) / 1e9:.1f} GB"]
    for f in release.files:
        size = f"{f.size:,} bytes" if f.size is not None else (
            f"not recorded (about {f.approx_bytes / 1e9:.2f} GB)" if f.approx_bytes else "not recorded")
        state = "verified" if f.verified else "unverified"
        optional = ", optional" if f.optional else ""
        lines.append(f"  {f.filename}  [{f.role}, {f.licence}, {state}{optional}]")
        lines.append(f"    url    {f.web_url}")
        lines.append(f"    size   {size}")
        lines.append(f"    sha256 {f.sha256 or 'not recorded'}")
    return "\n".join(lines)
