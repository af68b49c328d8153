"""Stage 1 of A-LLMRec as the paper writes it and with the two changes tried here (inputs in units of
their spread, layer-normalised latents), on a finished run's SASRec: the losses of the last epoch and
what the joint space holds (methods/allmrec.py, alignment_diagnostics).

    .venv/bin/python benchmarks/joint_space.py --run RUN_FOLDER [--data DIR] [--epochs 10]

RUN_FOLDER is any `ccfllm allmrec train` output; its SASRec and settings are reused, so only stage 1
runs (about two to three minutes per setting on the 2-core CPU with the cpu preset).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from safetensors.torch import load_file

from ccfllm.cf.sasrec import SASRec
from ccfllm.cli import CF_HISTORY
from ccfllm.config import cf_config, replace_checked
from ccfllm.data import load_collm_split, resolve_data_dir
from ccfllm.data.next_item import next_item_task
from ccfllm.methods.allmrec import item_text_embeddings, joint_space_check
from ccfllm.next_item_config import AllmrecConfig
from ccfllm.next_item_train import train_alignment
from ccfllm.text_encoder import load_sentence_encoder

SETTINGS = (  # name, latent_norm, scale_inputs
    ("raw inputs, free-scale latents (paper, default)", False, False),
    ("raw inputs, normalised latents", True, False),
    ("scaled inputs, normalised latents", True, True),
)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run", type=Path, required=True, help="a finished A-LLMRec run folder")
    parser.add_argument("--data", type=Path, default=None)
    parser.add_argument("--epochs", type=int, default=None, help="stage 1 epochs (default: the run's)")
    args = parser.parse_args()

    record = json.loads((args.run / "config.json").read_text())
    settings = {k: v for k, v in record["config"].items() if k in AllmrecConfig.__dataclass_fields__}
    config = replace_checked(AllmrecConfig(), {**settings, "device": "cpu"})
    dataset = load_collm_split(resolve_data_dir(args.data), max_history=CF_HISTORY)
    task = next_item_task(
        dataset, config.n_candidates, config.seed, config.sasrec_history, config.cold_user_share
    )
    sasrec_config = cf_config("sasrec", dim=config.sasrec_dim, max_history=config.sasrec_history)
    sasrec = SASRec(sasrec_config, int(max(task.sequences)) + 1, task.n_items)
    sasrec.load_state_dict(load_file(args.run / "sasrec.safetensors"))

    print(f"stage 1 on {task.name}: {len(task.splits['train'])} training rows, SASRec from {args.run}")
    header = (
        "| latents | matching | item rec. | text rec. | recommendation | CF spread | text spread "
        "| own title in 10 nearest (chance) | s |"
    )
    rows = [header, "|" + "---|" * 9]
    for name, latent_norm, scale_inputs in SETTINGS:
        encoder = load_sentence_encoder(config.encoder, "cpu")
        started = time.perf_counter()
        result = train_alignment(
            task, sasrec, encoder, latent_dim=config.latent_dim, hidden=config.hidden,
            latent_norm=latent_norm, scale_inputs=scale_inputs, alpha=config.alpha, beta=config.beta,
            lr=config.stage1_lr,
            batch_size=config.stage1_batch, epochs=args.epochs or config.stage1_epochs,
            freeze_text=config.freeze_text, seed=config.seed,
        )  # fmt: skip
        seconds = time.perf_counter() - started
        check = joint_space_check(result.alignment, sasrec, item_text_embeddings(encoder, task))
        last = result.losses[-1]
        rows.append(
            f"| {name} | {last['matching']:.4f} "
            f"| {last['item_reconstruction']:.4f} | {last['text_reconstruction']:.5f} "
            f"| {last['recommendation']:.4f} | {check['item_latent_spread']:.3f} "
            f"| {check['text_latent_spread']:.3f} | {check['own_text_top10']:.2%} "
            f"({check['own_text_top10_chance']:.2%}) | {seconds:.0f} |"
        )
    print("\n".join(rows))


if __name__ == "__main__":
    main()
