"""Quantize and publish: quantize a model, then push the checkpoint to the Hugging Face Hub.

    python examples/push_to_hub.py USER/REPO [MODEL] [--gptq] [--dry-run]

MODEL defaults to the bundled SmolLM2-135M-Instruct. Without network access or a login
(``huggingface-cli login`` / ``HF_TOKEN``), or with ``--dry-run``, nothing is uploaded: the
files that would be are written to ``out/push-dry-run`` and listed. ``--gptq`` publishes the
GPTQ export (for vLLM and other GPTQ loaders) instead of the hf_signround checkpoint.
"""

import argparse
import logging
import tempfile
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_signround import SignRoundV2Config
from hf_signround.assets import calibration_texts, smollm2_path
from hf_signround.export import export_gptq
from hf_signround.shards import format_size

log = logging.getLogger("push_to_hub")


def can_upload() -> bool:
    """A reachable hub and a valid token."""
    from huggingface_hub import HfApi
    from huggingface_hub.utils import get_token

    if get_token() is None:
        log.info("no Hugging Face token (run `huggingface-cli login` or set HF_TOKEN): dry run")
        return False
    try:
        HfApi().whoami()
    except Exception as err:  # noqa: BLE001 - offline, proxy, revoked token: all mean "cannot upload"
        log.info("the hub is not reachable (%s): dry run", type(err).__name__)
        return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("repo", help="hub repository, USER/REPO")
    parser.add_argument("model", nargs="?", default=None, help="model folder or hub id (default: bundled SmolLM2)")
    parser.add_argument("--gptq", action="store_true", help="publish the GPTQ export")
    parser.add_argument("--dry-run", action="store_true", help="write the files, upload nothing")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    path = args.model or smollm2_path()
    tok = AutoTokenizer.from_pretrained(path)
    cfg = SignRoundV2Config(bits=4, group_size=64, sym=True, iters=0,  # round-to-nearest: quick; iters=200 tunes
                            dataset=calibration_texts(), tokenizer=tok, nsamples=32, seqlen=256)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=cfg)

    upload = not args.dry_run and can_upload()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) if upload else Path("out/push-dry-run")
        if args.gptq:
            export_gptq(model, folder)
        else:
            model.save_pretrained(folder)
        tok.save_pretrained(folder)
        if upload:
            from huggingface_hub import HfApi

            api = HfApi()
            api.create_repo(args.repo, exist_ok=True)
            api.upload_folder(repo_id=args.repo, folder_path=str(folder), commit_message="hf-signround W4G64")
            print(f"uploaded to https://huggingface.co/{args.repo}")
        else:
            print(f"dry run: would upload to {args.repo}:")
            for f in sorted(folder.iterdir()):
                print(f"  {f.name:40s} {format_size(f.stat().st_size):>10}")
    # Without --gptq, `model.push_to_hub(args.repo)` does the same in one call.


if __name__ == "__main__":
    main()
