"""Causal-LM fine-tuning (the paper's GSM8K experiment, scaled), split by job.

* :mod:`~qsgd_optax.tasks.lm.experiment`: the driver (configuration, model
  loading, checkpoint identity, every (arm, seed) run) and its table;
* :mod:`~qsgd_optax.tasks.lm.loop`: the train loop and evaluation;
* :mod:`~qsgd_optax.tasks.lm.steps`: the loss, the jitted gradient, update
  and eval programs, the schedule and the optimizer;
* :mod:`~qsgd_optax.tasks.lm.sharding`: the ``("data", "fsdp")`` mesh and
  the sharding rules of parameters, optimizer state and batches;
* :mod:`~qsgd_optax.tasks.lm.batching`: padded or packed token batches;
* :mod:`~qsgd_optax.tasks.lm.gsm_data`: GSM-Symbolic-style problems and
  their tokenization;
* :mod:`~qsgd_optax.tasks.lm.llama`: the Llama-architecture model (NNX);
* :mod:`~qsgd_optax.tasks.lm.gguf_loader`: pretrained weights and tokenizer
  from a GGUF file.

Import the submodules directly (``from qsgd_optax.tasks.lm import experiment``).
"""
