"""The flags of diffusers' training scripts and kohya's sd-scripts, and what to use here.

`keras-minsnr train` answers such a flag with the key to use instead, and
docs/coming_from_diffusers.md prints this table (a test keeps them equal). No Keras
import: the command line checks its arguments with it before loading anything.
"""

# flag (diffusers' spelling; sd-scripts' own where it differs) -> (what to write here, note)
FLAG_MAP = {
    "--snr_gamma": ("--set gamma=G", "weighting=min_snr is the default"),
    "--min_snr_gamma": ("--set gamma=G", "weighting=min_snr is the default"),
    "--max_train_steps": ("--steps N", "optimizer steps"),
    "--train_batch_size": ("--set batch_size=B", "one micro-batch over all devices"),
    "--gradient_accumulation_steps": ("--grad-accum N", ""),
    "--checkpointing_steps": ("--checkpoint-every N", ""),
    "--checkpoints_total_limit": ("--set keep_checkpoints=N", ""),
    "--resume_from_checkpoint": (
        "--resume-from step-NNNNNNNN.keras",
        "the same command without it resumes from the newest checkpoint"),
    "--mixed_precision": ("--set mixed_precision=mixed_bfloat16", "or mixed_float16"),
    "--use_ema": ("--set ema_decay=0.9999", "on by default; 0 turns the EMA off"),
    "--lr_scheduler": (
        "--set lr_schedule=cosine",
        "or constant, linear, cosine_with_restarts, polynomial"),
    "--lr_warmup_steps": ("--set warmup_steps=N", ""),
    "--lr_num_cycles": ("--set lr_num_cycles=N", ""),
    "--lr_power": ("--set lr_power=P", ""),
    "--learning_rate": ("--set learning_rate=LR", ""),
    "--noise_offset": ("--set noise_offset=C", ""),
    "--input_perturbation": ("--set input_perturbation=L", ""),
    "--rank": ("--set lora_rank=R", "docs/lora.md"),
    "--network_dim": ("--set lora_rank=R", "docs/lora.md"),
    "--network_alpha": ("--set lora_alpha=A", ""),
    "--validation_prompts": (
        "--set validation_prompts='[\"a cat\"]' --set validation_every=N", ""),
    "--validation_prompt": (
        "--set validation_prompts='[\"a cat\"]' --set validation_every=N", ""),
    "--validation_steps": ("--set validation_every=N", ""),
    "--report_to": ("--set report_to=wandb", "or tensorboard (the default), all, none"),
    "--resolution": ("--set image_size=S", ""),
    "--random_flip": ("--set data_args.random_flip=true", ""),
    "--cache_latents": (
        "--set encode.source=DATA",
        "latents are encoded once into the cache named by data; docs/recipes.md"),
    "--prediction_type": ("--set prediction_type=v_prediction", "or epsilon, sample"),
    "--seed": ("--set seed=N", ""),
    "--output_dir": ("--output-dir DIR", ""),
    "--dataset_name": (
        "--set data=DIR", "a local Hugging Face dataset: save_to_disk folder or parquet"),
    "--train_data_dir": ("--set data=DIR", "an image or caption folder"),
    "--adam_beta1": ("--set beta_1=B1", ""),
    "--adam_beta2": ("--set beta_2=B2", ""),
    "--adam_weight_decay": ("--set weight_decay=W", ""),
    "--max_grad_norm": ("--set clipnorm=N", ""),
}


def hint_for(argv):
    """The first diffusers / sd-scripts flag in ``argv`` as ``(flag, what to use)``, else
    None. ``--flag=value`` and ``--flag value`` are both recognised."""
    for arg in argv or []:
        flag = arg.split("=", 1)[0]
        if flag in FLAG_MAP:
            use, note = FLAG_MAP[flag]
            return flag, use + (f" ({note})" if note else "")
    return None


def markdown_table():
    """The flag table of docs/coming_from_diffusers.md."""
    lines = ["| diffusers / sd-scripts | keras-minsnr |", "|---|---|"]
    lines += [f"| `{flag}` | `{use}`{' — ' + note if note else ''} |"
              for flag, (use, note) in FLAG_MAP.items()]
    return "\n".join(lines)
