"""LoRA fine-tuning of the released DiffusionGemma 26B-A4B (imported with diffgemma-import) on your chat data, on one
host with 8 GPUs and 8-way expert parallelism, as the public PyTorch recipe does. README "Starting from the
released DiffusionGemma" has the steps and the memory it needs.

Adapters of rank 16 on the attention projections and the dense GeGLU; the experts, router and embeddings stay
frozen (no gradient and no optimizer state for them). Objective: the released model's uniform-state block
diffusion on 256-token canvases, with its SFT form (prompt never corrupted or scored; the response, padded with EOS,
spans as many canvases as it needs). Full fine-tuning: `--config.model.lora_rank=0` (and a bigger mesh: the
optimizer state of 25B parameters does not fit 8 x 80 GB replicated this way).
"""

from diffgemma_jax.config import sibling_config


def get_config():
  c = sibling_config(__file__, "diffusiongemma_26b_a4b")
  c.model.update(lora_rank=16, lora_alpha=32.0, lora_targets=("attention", "mlp"))
  # The frozen base held in bfloat16: the release's weights are bfloat16, so nothing is lost, and the train state
  # falls from 19.82 to 10.00 GiB a GPU (diffgemma-inspect --memory)
  c.train.frozen_dtype = "bfloat16"
  c.init.checkpoint = "runs/diffusiongemma_26b_a4b"  # diffgemma-import --output of the released checkpoint
  c.data.recipe = "jsonl"
  c.data.source = "data/sft/train.jsonl"  # {"messages": [...]} or {"prompt", "response"} per line
  c.data.heldout_source = ""  # empty: a hashed 5% of the records is held out
  c.data.tokenizer = "hf/diffusiongemma-26B-A4B-it/tokenizer.model"  # the released tokenizer
  c.data.chat_template = "diffusiongemma"  # the released model's turn markers <|turn> ... <turn|>
  c.data.dir = "data/sft-diffusiongemma"
  c.train.seq_len = 2048  # prompt + response; a multiple of the 256-token canvas
  c.train.batch_size = 8  # one row per GPU per micro-batch ...
  c.train.grad_accum_steps = 1  # ... raise for a bigger effective batch
  c.train.num_steps = 1000
  c.train.learning_rate = 1e-4
  c.train.warmup_steps = 50
  c.train.weight_decay = 0.0
  c.checkpoint.every_steps = 200
  c.eval.every_steps = 200
  c.eval.batch_size = 8
  c.eval.max_sequences = 256
  c.mesh.shape = (1, 1, 8, 1)  # data x fsdp x expert x tensor: 16 experts per GPU, batch rows over all 8
  return c
