# GPT-2 large (770M) on OpenWebText: the paper's high-learning-rate setting (section 3, Table 1).
# Edit freely; every key can also be overridden on the command line: --key=value.
out_dir = "out/large"
init_from = "auto"  # the same command continues the run after a preemption or a restart
data_dir = "data/openwebtext"
wandb_run_name = "gpt2-large-lr2e-3"

# model: Sophia's / the paper's GPT-2 variant (no biases, attention scaled by 1/layer)
n_layer = 36
n_head = 20
n_embd = 1280
block_size = 1024
vocab_size = 50304  # GPT-2's 50257 padded to a multiple of 64
bias = False
dropout = 0.0
scale_attn_by_inverse_layer_idx = True

# optimisation: 131K tokens per step whatever the number of GPUs
max_steps = 70_000
tokens_per_step = 131_072
micro_batch_size = 4  # per GPU: lower it if out of memory (accumulation makes up the rest)
learning_rate = 2e-3
min_lr = 2e-4
warmup_steps = 2000
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0

# averaging: EMA every step; LAWA over snapshots every 200 steps (nu = 200 or 1000)
ema_decay = 0.9
lawa_k = 5
lawa_nu = 1000
lawa_interval = 1000
swa_start = 0.75
swa_lr = 2e-4
swa_anneal_steps = 1000
swa_every = 10

eval_interval = 1000
eval_tokens = 4_194_304  # 4096 fixed windows of OpenWebText's validation split
eval_batch_size = 32
ckpt_interval = 200
resume_interval = 1000

dtype = "bfloat16"
compile = True
