"""Training recipe: LLaVAction's fine-tuning setup (docs/checkpoints.md; upstream
llavaction/train/llava_trainer.py: LLaVATrainer.create_optimizer) on a mesh.

    python -m llavaction_jax train --config configs/train.py \
        --config.model.init_from=ckpt/llava-video-7b --config.data.samples=data/mix.yaml \
        --config.data.shards=shards/ek100 --out runs/llavaction_7b

Defaults follow the authors' 7B run where they apply at any scale: lr 1e-5 (vision tower 2e-6), AdamW
(0.9, 0.999, 1e-8), weight decay 0, cosine with 3% warm-up, clip 1.0, all three parts tunable, 64 frames,
32768 tokens. Global batch 256 there (128 GPUs x 1 x 2 accumulation); set train.batch_size and
train.micro_batches for your mesh. The defaults here train the tiny preset so the recipe runs on a laptop.
"""

import ml_collections

from llavaction_jax.recipes import model_section


def get_config():
    c = ml_collections.ConfigDict()
    # "auto": jax.distributed.initialize() on a detected TPU pod / SLURM / Open MPI job (llavaction_jax/distributed.py)
    c.distributed = "auto"  # or "on" / "off"

    # The model: configs/<preset>.py, or a converted model directory in init_from (python -m llavaction_jax convert
    # from-torch ...). The section lists every model and execution field unset (the source's value); set any here or
    # with --config.model.<field>=value (e.g. remat_policy, attention, loss_chunk_tokens, compute_dtype).
    c.model = model_section(preset="tiny", init_from="")

    c.data = ml_collections.ConfigDict()
    c.data.samples = ""  # upstream data YAML, or a LLaVA JSON / JSONL of samples
    # frame-shard directory (python -m llavaction_jax extract-frames), or several, comma-separated (EK100 clips and
    # LLaVA-Video-178K videos are extracted with different sampling into different folders)
    c.data.shards = ""
    # The batch's frame count: shorter clips are padded and keep their own count (1-fps LLaVA-Video-178K clips), a
    # longer one is a bad sample. 0: the shards' frames_per_clip, else their 1-fps cap (frames_upbound).
    c.data.num_frames = 0
    c.data.max_length = 32768  # upstream model_max_length
    c.data.length_buckets = ()  # () = powers of two up to max_length
    c.data.group_by_modality_length = True  # upstream's length-grouped sampler (its LLaVAction scripts set it)
    c.data.length_group_steps = 1  # steps per length-sorted megabatch: 1 = upstream; more = less padding (ours)
    c.data.tokenizer = ""  # tokenizer directory; "" = init_from's own, else Qwen2's (built offline)
    c.data.pad_id = 151643  # <|endoftext|>
    c.data.add_time_instruction = True
    # EK100 samples stored as upstream's questions get their prompt when loaded (llavaction_jax/ek100/train_prompt.py)
    c.data.perspective = "first_person"  # or "third_person"
    c.data.learn_neighbor_actions = ""  # "prior": 30% of MC prompts name the two previous actions (the final run)
    c.data.ek100_annotations = ""  # folder with EPIC_100_train.csv: the prior-action table ("prior" needs it)
    c.data.action_representation = "GT_random_narration"  # prior actions as narrations, or "official_key"
    c.data.label_space = "ek100"  # "uda": the UDA train files stand in for EPIC_100_train.csv
    c.data.on_bad_sample = "error"  # or "skip" (counted and logged)
    c.data.worker_count = 0  # Grain worker processes per host
    c.data.read_threads = 0  # threads encoding samples (per worker process); 0 = half the cores, 1 to 4
    c.data.seed = 0

    c.optim = ml_collections.ConfigDict()
    c.optim.learning_rate = 1e-5
    c.optim.vision_lr = 2e-6  # mm_vision_tower_lr
    c.optim.projector_lr = ml_collections.FieldReference(None, field_type=float)  # mm_projector_lr (None = base)
    c.optim.tunable_parts = "mm_vision_tower,mm_mlp_adapter,mm_language_model"
    c.optim.weight_decay = 0.0
    c.optim.warmup_ratio = 0.03
    c.optim.max_grad_norm = 1.0

    c.train = ml_collections.ConfigDict()
    c.train.steps = 100  # total optimizer steps (the LR schedule spans these)
    c.train.stop_at_step = 0  # stop (with a checkpoint) at this step, e.g. to fit a job time limit; 0 = never
    c.train.batch_size = 8  # global, over all processes
    c.train.micro_batches = 1  # gradient accumulation (lax.scan)
    # "sample": upstream's weighting (one sample per device, averaged): token mean per sample, then the mean over
    # the samples of the global batch; "token": one token mean per micro-batch (llavaction_jax/losses.py)
    c.train.loss_reduction = "sample"
    c.train.master_dtype = "float32"  # params and optimizer moments, whatever the checkpoint's param_dtype
    c.train.save_dtype = ""  # dtype of output_dir/model; "" = the source's param_dtype
    c.train.seed = 0
    c.train.output_dir = "runs/train"
    c.train.log_every = 10
    c.train.checkpoint_every = 50
    c.train.keep_checkpoints = 3
    c.train.allow_changed_data = False  # resume although data settings changed or the iterator state is missing
    c.train.restart_if_all_broken = False  # start over from step 0 when every checkpoint fails verification
    c.train.async_checkpoint = True
    c.train.save_model = True  # write output_dir/model (our format) at the end
    c.train.peak_flops = 0.0  # per device, for MFU; 0 = known accelerators' table, or measured on CPU
    # Scalars go to output_dir/tensorboard (tensorboardX); a project name also sends them to Weights & Biases
    # (needs `pip install wandb`; refused without it). wandb_run names the run ("" = W&B's own name).
    c.train.wandb_project = ""
    c.train.wandb_run = ""

    c.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": -1, "tensor": 1})
    return c
