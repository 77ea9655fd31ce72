# The CPU default: a tiny GPT on the embedded Shakespeare corpus (bytes, vocabulary 256),
# at a deliberately HIGH learning rate, training in a few minutes on 2 cores.
out_dir = "out/tiny"
data_dir = "data/shakespeare"

n_layer = 4
n_head = 4
n_embd = 128
block_size = 128
bias = False
dropout = 0.0

max_steps = 600
tokens_per_step = 4096  # 32 sequences of 128 bytes
micro_batch_size = 32
learning_rate = 1e-2
min_lr = 1e-3
warmup_steps = 30
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0

ema_decay = 0.9
lawa_k = 5
lawa_nu = 10
lawa_interval = 50
lawa_online = False
swa_start = 0.75
swa_lr = 1e-3
swa_anneal_steps = 30
swa_every = 2

eval_interval = 50
eval_tokens = 32_768
eval_batch_size = 64
ckpt_interval = 10
resume_interval = 50
keep_resume = 0
log_interval = 10

device = "cpu"
dtype = "float32"
compile = False
