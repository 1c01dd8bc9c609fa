import torch

# The test models are tiny: one thread is as fast as two for them, and it avoids thread
# hand-offs that make tiny ops crawl when the machine is busy with other work.
torch.set_num_threads(1)
